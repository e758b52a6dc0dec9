"""Training memory at a real vocabulary: the chunked LM-head loss against today's unchunked one and
TRL's SFTTrainer, one packed row, loss + backward, in one run.

    .venv/bin/python bench/train_memory.py                       # 2k, 8k, 16k completion tokens
    .venv/bin/python bench/train_memory.py --tokens 2048 --variants chunked,today

Model: 2 layers, hidden 256 (head_dim 64), intermediate 1024, random init, Qwen2.5's vocabulary
of 151,936 rows (pipeline/apps/tiny_model.py, vocab_to), tied embeddings, fp32 on CPU. Row: samples
of 1,024 completion tokens after a 32-token prompt, back to back, so a row of N completion
tokens holds N / 1,024 samples and N + 32 N / 1,024 tokens. Variants, each in its own process
(peak RSS = that process's ru_maxrss, model load included; "step" = loss + backward, no
optimizer):
  today:   stages/lib/packed.py completion_logps with chunk=0 — the K completion positions
           through the LM head at once (logits_to_keep), fp32 cross-entropy: what training
           did before
  chunked: completion_logps as sft and redi run it now (stages/lib/lm_head.py, 1,024 positions
           a chunk, the loss's per-token weights given: the head's gradients taken in the
           forward's chunk loop, 3 head matmuls as today's)
  recompute: the same chunks without weights (any use of the log-probs, e.g. a future kd
           loss): the logits recomputed in backward, 4 head matmuls
  trl:     TRL's SFTTrainer, padding_free=True, the same samples as one flattened row;
           trainer.compute_loss + backward. TRL 1.16 always computes the loss with its own
           chunked log-prob LM head (trl/trainer/utils.py add_fused_lm_head, torch tiles on CPU;
           its Triton kernel and liger-kernel need a GPU: liger is not installed here). Its
           attention is ours (the same varlen function, given the row's cu_seqlens): sdpa would
           build a dense T x T block-diagonal mask, which measures attention, not the loss.
Step time is the process's CPU seconds / threads (bench/train.py: on a shared machine wall time
measures the neighbours), the median of the timed steps after one warm-up step; wall time is
printed beside it. A configuration whose expected peak exceeds the memory available now is not
run (today's 16k: ~2x its 8k peak) and is printed as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 151936
PROMPT, COMPLETION = 32, 1024  # tokens per sample


def build_model(model_dir: str) -> str:
    from pipeline.apps.tiny_model import build_tiny_model

    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_tiny_model(model_dir, layers=2, hidden=256, heads=4, kv_heads=2, intermediate=1024,
                         max_position=32768, vocab_to=VOCAB)
    return model_dir


def samples(tokens: int, vocab: int):
    """[(ids, prompt length)]: tokens / 1,024 samples of 32 prompt + 1,024 completion tokens."""
    import random

    rng = random.Random(0)
    n = max(1, tokens // COMPLETION)
    return [([rng.randrange(5, vocab) for _ in range(PROMPT + COMPLETION)], PROMPT)
            for _ in range(n)]


def cpu_now():
    import torch

    return time.process_time() / torch.get_num_threads()


def rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.packed import (ATTENTION, collate, completion_logps, packed_row,
                                   register_attention)

    torch.set_num_threads(args.threads or os.cpu_count())
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation=ATTENTION,
                                                 dtype=torch.float32)
    seqs = samples(int(args.tokens), model.config.vocab_size)
    if args.child == "trl":
        step = trl_step(args, model, seqs)
    else:
        batch = collate([packed_row(seqs)])
        chunk = 0 if args.child == "today" else 1024
        # sft_loss on one worker: -sum(logps) / K, every token's weight -1 (up to the 1 / K)
        weights = torch.full(batch["targets"].shape, -1.0) if args.child == "chunked" else None

        def step():
            model.zero_grad(set_to_none=True)
            loss = -completion_logps(model, batch, chunk, weights).mean()
            loss.backward()
            return loss.item()

    loaded = rss_mb()
    cpu, wall, losses = [], [], []
    for _ in range(args.steps + 1):   # the first step warms up
        c0, w0 = cpu_now(), time.perf_counter()
        losses.append(step())
        cpu.append(cpu_now() - c0)
        wall.append(time.perf_counter() - w0)
    timed = slice(1, None) if args.steps else slice(None)
    return {"variant": args.child, "completion_tokens": len(seqs) * COMPLETION,
            "row_tokens": len(seqs) * (PROMPT + COMPLETION), "vocab": model.config.vocab_size,
            "peak_rss_mb": round(rss_mb(), 1), "after_load_mb": round(loaded, 1),
            "step_cpu_s": round(statistics.median(cpu[timed]), 3),
            "step_wall_s": round(statistics.median(wall[timed]), 3), "loss": losses[-1],
            "threads": torch.get_num_threads()}


# The recipe's student, Qwen2.5-Math-1.5B: its decoder layer's shape, for the bytes per token
# that docs/training.md's token budget is derived from (one layer's activations do not depend on
# the vocabulary or the depth).
STUDENT_LAYER = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                     num_key_value_heads=2, head_dim=128)


def layers_child(args) -> dict:
    """Peak RSS of one step of a random-init model with `args.layers` decoder layers of the
    student's shape (vocabulary 4,096: the head is measured by the other variants), with or
    without gradient checkpointing. bytes/token/layer = the difference between two depths."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stages.lib.packed import (ATTENTION, collate, completion_logps, packed_row,
                                   register_attention)

    torch.set_num_threads(args.threads or os.cpu_count())
    register_attention()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=4096, num_hidden_layers=args.layers, tie_word_embeddings=True,
                         max_position_embeddings=32768, **STUDENT_LAYER)
    config._attn_implementation = ATTENTION
    model = Qwen2ForCausalLM(config).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = collate([packed_row(samples(int(args.tokens), 4096))])
    params = sum(p.numel() for p in model.parameters())
    loaded = rss_mb()
    c0 = cpu_now()
    (-completion_logps(model, batch).mean()).backward()
    return {"variant": "layers", "layers": args.layers, "checkpointing": bool(args.checkpointing),
            "row_tokens": len(batch["input_ids"][0]), "params": params,
            "peak_rss_mb": round(rss_mb(), 1), "after_load_mb": round(loaded, 1),
            "step_cpu_s": round(cpu_now() - c0, 2)}


def activations(args) -> None:
    """Activation bytes per token per decoder layer of the student's shape, fp32 on this CPU,
    with and without gradient checkpointing: (peak at 3 layers - peak at 1 layer - the 2 extra
    layers' weights and gradients) / (2 x row tokens)."""
    tokens = int(args.tokens.split(",")[0])
    out = {}
    for ckpt in (0, 1):
        for layers in (1, 3):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "layers", "--tokens",
                   str(tokens), "--layers", str(layers), "--checkpointing", str(ckpt),
                   "--model-dir", args.model_dir]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                           .stdout.strip().splitlines()[-1])
            print(f"  {json.dumps(r)}", flush=True)
            out[ckpt, layers] = r
        one, three = out[ckpt, 1], out[ckpt, 3]
        weights = (three["params"] - one["params"]) * 8 / 2**20   # fp32 weight + its gradient
        per = (three["peak_rss_mb"] - one["peak_rss_mb"] - weights) * 2**20 / 2 / one["row_tokens"]
        print(f"gradient checkpointing {'on ' if ckpt else 'off'}: {per / 1024:.1f} KiB per token "
              f"per layer (fp32; {one['row_tokens']}-token row; layer weights+grads "
              f"{weights / 2:.0f} MiB a layer subtracted)", flush=True)


def trl_step(args, model, seqs):
    """TRL's SFTTrainer, padding_free=True: its collator flattens the batch into one row with
    position_ids restarting per sample; its compute_loss runs its fused chunked LM head."""
    import tempfile

    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [{"input_ids": ids, "completion_mask": [0] * n + [1] * (len(ids) - n)}
            for ids, n in seqs]
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(seqs),
                    padding_free=True, max_length=None, completion_only_loss=True,
                    use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                    dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(seqs))])
    assert batch["input_ids"].shape == (1, sum(len(ids) for ids, _ in seqs)), "not padding-free"
    # our varlen attention, as for the other variants: it needs the row's sample boundaries
    lengths = torch.tensor([len(ids) for ids, _ in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(lengths.max()),
                 max_length_k=int(lengths.max()))
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.item()

    return step


def run_child(args, variant: str, tokens: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--tokens", str(tokens),
           "--model-dir", args.model_dir, "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"variant": variant, "completion_tokens": tokens,
                "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,8192,16384",
                        help="completion tokens per packed row, comma-separated")
    parser.add_argument("--variants", default="today,chunked,recompute,trl")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--model-dir", default="", help="where the model is (built if missing)")
    parser.add_argument("--activations", action="store_true",
                        help="instead: activation bytes per token per decoder layer of the "
                        "student's shape (Qwen2.5-Math-1.5B), with and without checkpointing, "
                        "at the first --tokens")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.model_dir:
        import tempfile

        args.model_dir = os.path.join(tempfile.gettempdir(), "distillery-bench-vocab151936")
    build_model(args.model_dir)
    if args.child:
        print(json.dumps(layers_child(args) if args.child == "layers" else child(args)),
              flush=True)
        return
    if args.activations:
        activations(args)
        return

    import psutil

    variants = args.variants.split(",")
    print(f"model: 2 layers, hidden 256, vocab {VOCAB}; rows of 1,024-token completions after "
          f"32-token prompts; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    results, peak = {}, {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        for v in variants:
            # a peak grows about linearly with the row: scale this variant's last measured one,
            # and do not start a configuration this machine cannot hold now
            guess = peak.get(v, (None, None))
            free = psutil.virtual_memory().available / 2**20
            if guess[0] and guess[1] * tokens / guess[0] > 0.9 * free:
                expect = guess[1] * tokens / guess[0] / 1024
                results[tokens, v] = {"skipped": f"expected ~{expect:.0f} "
                                      f"GB > {free / 1024:.0f} GB available"}
            else:
                results[tokens, v] = run_child(args, v, tokens)
                if "peak_rss_mb" in results[tokens, v]:
                    peak[v] = (tokens, results[tokens, v]["peak_rss_mb"])
            r = results[tokens, v]
            print(f"  {tokens:6d} {v:9s} {json.dumps(r)}", flush=True)

    print(f"\n{'tokens':>6s} {'variant':9s} {'peak RSS MB':>11s} {'step CPU s':>10s} "
          f"{'wall s':>7s} {'peak/today':>10s} {'speed/today':>11s} {'peak/TRL':>8s} "
          f"{'speed/TRL':>9s}")
    for (tokens, v), r in results.items():
        if "peak_rss_mb" not in r:
            print(f"{tokens:6d} {v:9s} {r.get('skipped') or r.get('error')}")
            continue
        cols = []
        for ref in ("today", "trl"):
            b = results.get((tokens, ref), {})
            if "peak_rss_mb" in b:
                cols += [f"{r['peak_rss_mb'] / b['peak_rss_mb']:.3f}",
                         f"{b['step_cpu_s'] / r['step_cpu_s']:.3f}"]
            else:
                cols += ["-", "-"]
        print(f"{tokens:6d} {v:9s} {r['peak_rss_mb']:11.0f} {r['step_cpu_s']:10.2f} "
              f"{r['step_wall_s']:7.2f} {cols[0]:>10s} {cols[1]:>11s} {cols[2]:>8s} "
              f"{cols[3]:>9s}")
    print("speed = reference step time / this step time (> 1: faster); peak = this / reference")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
