"""Scoring benchmark: provenance's packed forward against the stock ways to score text, one run.

    .venv/bin/python bench/provenance.py                  # CPU: tiny model, 400 traces
    .venv/bin/python bench/provenance.py --traces 64 --median 60 --rounds 1   # a quick check
    .venv/bin/python bench/provenance.py --gpu --shape qwen2.5-0.5b --median 1000 \
        --cap 4096 --traces 512 --tokens-per-row 32768 --batch 8     # the issue's GPU shape

The same variable-length traces (log-normal lengths around --median tokens, capped at --cap, as
bench/train.py builds them), the same model and the same token ids for every variant. Prints
scored (completion) tokens per second of
  (a) vLLM `prompt_logprobs=0` with max_tokens=1, detokenize=False, warmed up first;
  (b) a padded transformers forward (sdpa, --batch traces per forward, right-padded to the
      longest) + log_softmax over the full vocabulary + gather;
  (c) ours: stages/lib/packed.py's score_token_ids (best-fit packed rows of --tokens-per-row tokens,
      no padding, per-sample causal attention, the LM head --chunk positions at a time; on CPU
      in fp32 the linears run as prepacked oneDNN matmuls, onednn_linears, as the stage does);
and c / max(a, b). Every variant runs in --dtype (default bf16 on GPU, fp32 on CPU; vLLM's own
CPU default runs an fp32 model in bf16, so the dtype is always passed). The three agree on the log-probs (the max |difference| is printed). The
variants run in interleaved rounds (after one warm-up call each); the median wall time counts.
Run it on an otherwise idle machine: on 2 cores that others use, give --threads 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def vllm_scorer(args, seqs):
    """(a): the engine, warmed up; returns (score function, shutdown)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # engine in this process: no IPC hop
    os.environ.setdefault("TMPDIR", tempfile.mkdtemp(prefix="bench-vllm-"))
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, seed=0,
              max_model_len=args.cap + 8, enforce_eager=not args.gpu,
              **({"gpu_memory_utilization": 0.5} if args.gpu else {}))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    prompts = [{"prompt_token_ids": ids} for ids, _ in seqs]
    llm.generate(prompts[:16], params, use_tqdm=False)       # warm-up: the cold path is slow

    def score():
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [[o.prompt_logprobs[t][ids[t]].logprob for t in range(n, len(ids))]
                for o, (ids, n) in zip(outs, seqs)]

    return score, lambda: llm.llm_engine.engine_core.shutdown()


def padded_scores(model, seqs, batch: int, device):
    """(b): batches of `batch` traces in the data's order, right-padded, full log_softmax."""
    import torch

    out = []
    for a in range(0, len(seqs), batch):
        group = seqs[a:a + batch]
        width = max(len(ids) for ids, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for i, (s, _) in enumerate(group):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        lp = logits.float().log_softmax(-1)                        # [B, width, vocab]
        for i, (s, n) in enumerate(group):
            target = torch.tensor(s[n:], device=device)
            out.append(lp[i, n - 1:len(s) - 1].gather(1, target[:, None])[:, 0].tolist())
    return out


def main():
    from pipeline.apps.tiny_model import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model folder or hub id (default: tiny)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--shape", default="", choices=["", *SHAPES],
                        help="without --model: a random-init model of "
                        "this real shape (pipeline/apps/tiny_model.py SHAPES: qwen2.5-0.5b)")
    parser.add_argument("--traces", type=int, default=400)
    parser.add_argument("--median", type=int, default=250, help="median trace tokens")
    parser.add_argument("--cap", type=int, default=1024, help="max tokens per trace")
    parser.add_argument("--batch", type=int, default=8, help="(b): traces per padded forward")
    parser.add_argument("--tokens-per-row", type=int, default=8192, help="(c): packed row size")
    parser.add_argument("--chunk", type=int, default=1024, help="(c): LM-head positions per chunk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads of every variant (1 on a machine others are using: "
                             "2 OpenMP threads on 2 busy cores wait on each other, ~4x slower)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="",
                        help="every variant's dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--wall", action="store_true",
                        help="CPU: time wall-clock, not the process's CPU seconds / threads")
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.chat import target_format
    from stages.lib.packed import (ATTENTION, encode, onednn_linears, register_attention,
                               score_token_ids)
    from train import conversations

    torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    if not args.model:
        from pipeline.apps.tiny_model import build_tiny_model

        args.model = build_tiny_model(tempfile.mkdtemp(prefix="bench-model-"),
                                      **(SHAPES[args.shape] if args.shape else {}))
    tok = AutoTokenizer.from_pretrained(args.model)
    seqs = []
    fmt = target_format(tok, args.model, "", "chat", "think", "bench")
    for p, c in conversations(args.traces, args.median, args.cap):
        pi, ci = encode(tok, p, c[-1]["content"], fmt)
        seqs.append((pi + ci[:args.cap - len(pi)], len(pi)))
    lengths = [len(ids) for ids, _ in seqs]
    scored = sum(len(ids) - n for ids, n in seqs)
    print(f"workload: {len(seqs)} traces, tokens median {statistics.median(lengths):.0f} mean "
          f"{statistics.mean(lengths):.0f} max {max(lengths)} (cap {args.cap}); {scored} scored "
          f"(completion) tokens; {'GPU' if args.gpu else 'CPU'}, {args.dtype}, "
          f"{args.threads} threads", flush=True)

    device = "cuda" if args.gpu else "cpu"
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    variants, shutdown = {}, None
    if not args.skip_vllm:
        variants["a"], shutdown = vllm_scorer(args, seqs)
    torch.set_num_threads(args.threads)  # vLLM's CPU worker sets its own count on start
    stock = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                 attn_implementation="sdpa").to(device).eval()
    variants["b"] = lambda: padded_scores(stock, seqs, args.batch, device)
    register_attention()
    ours = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                attn_implementation=ATTENTION).to(device).eval()
    if not args.gpu and dtype == torch.float32:
        ours = onednn_linears(ours)   # as the stage's CPU pool does (cluster/scoring.py)
    variants["c"] = lambda: score_token_ids(ours, seqs, args.tokens_per_row, args.chunk)

    # CPU: this process's CPU seconds / threads (what a round takes with the cores to itself;
    # on a shared machine wall time mostly measures the neighbours), as bench/train.py does.
    # vLLM's engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so it counts too.
    if args.gpu or args.wall:
        clock = time.perf_counter
    else:
        clock = lambda: time.process_time() / args.threads  # noqa: E731
    # Interleaved rounds (a, b, c, a, b, c, ...) after one warm-up call each: a neighbour's
    # load lands on every variant alike; the median round counts.
    results = {k: ([], None) for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        for r in range(args.rounds):
            for k, fn in variants.items():
                sync()
                t = clock()
                out = fn()
                sync()
                results[k] = (results[k][0] + [clock() - t], out)
                print(f"  round {r} ({k}): {results[k][0][-1]:.3f} s", flush=True)
    if shutdown is not None:
        shutdown()

    names = {"a": "vLLM prompt_logprobs (warm, detokenize=False)",
             "b": f"transformers padded forward + log_softmax (batch {args.batch})",
             "c": "ours: packed rows, varlen attention, chunked LM head"}
    rate = {k: scored / statistics.median(times) for k, (times, _) in results.items()}
    unit = "wall s" if args.gpu or args.wall else "cpu s/thr"
    print(f"\n{'variant':56s} {unit:>9s} {'scored tok/s':>13s}")
    for k, (times, _) in results.items():
        print(f"({k}) {names[k]:52s} {statistics.median(times):9.3f} {rate[k]:13.0f}")
    ref = results["c"][1]
    for k in ("a", "b"):
        if k in results:
            diff = max(abs(x - y) for got, want in zip(results[k][1], ref)
                       for x, y in zip(got, want))
            print(f"max |({k}) - (c)| log-prob: {diff:.2e}")
    best = max(rate[k] for k in ("a", "b") if k in rate)
    print(f"\nc / max(a, b) = {rate['c'] / best:.2f}"
          + ("" if "a" in rate else "   (vLLM skipped: c / b)"))
    sys.stdout.flush()
    os._exit(0)   # vllm-cpu can abort at interpreter exit after a shutdown (docs/stack.md)


if __name__ == "__main__":
    main()
