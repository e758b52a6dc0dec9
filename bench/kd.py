"""kd-step benchmark: our kd step against our sft step and TRL's GKDTrainer, and the kd loss's
memory against a full-vocabulary loss, in one run.

    .venv/bin/python bench/kd.py                       # CPU: tiny models, a few minutes
    .venv/bin/python bench/kd.py --skip-memory --rounds 3

Workload: bench/train.py's variable-length traces (completion lengths log-normal, median
--median tokens, sigma 0.8, capped at --cap), ~--tokens-per-step real tokens per optimizer step.
Student and teacher are random-init tiny models sharing one tokenizer (bench/train.py's shape:
hidden 256; the tiny tokenizer's 540 ids): the student 4 layers (4.07M parameters), the teacher
--teacher-layers, by default 20 (19.8M: 4.9x the student, as Qwen2.5-7B is to the recipe's 1.5B
student; GKD pays the teacher's forward every step, kd once, in the capture). --teacher-layers 4
is GKD's most favourable case, a teacher as small as the student. Prints

  (a) kd step (stages/kd.py: packed row, stored top-k teacher, forward KL, kd_ratio 0.5, the
      chunked LM-head loss) / sft step (stages/sft.py) on the same packed rows   target <= 1.3
  (b) kd real tokens/s / TRL GKDTrainer's (trl.experimental.gkd, offline: lmbda=0, seq_kd off;
      its best settings found here: beta=0 = plain forward KL, the cheapest of its losses and
      the same divergence as ours; batch size giving the same tokens per step; samples grouped
      by length to cut padding; dropout off) on the same conversations          target >= 3
      Also printed: the teacher's one-off capture (stages/lib/topk.py, the distributions
      stage's computation) in tokens/s, and kd's rate with that capture charged to a single
      epoch (its worst case: every further epoch reuses the capture).
  (c) peak memory of the kd loss over one packed row / that of a full-vocabulary loss over the
      same row, on bench/train_memory.py's big-vocabulary model (2 layers, hidden 256,
      vocabulary 151,936; --memory-tokens completion tokens of 1,024-token samples after
      32-token prompts), one process per variant (peak RSS = ru_maxrss):     target <= 0.25
        kd:       kd_token_losses as the stage runs it (1,024-position chunks, top-k teacher)
        kd-dense: the same loss with the student's [K, V] logits at once (chunk=0)
        full:     GKD's loss on the same row: the student's and an in-process teacher's [K, V]
                  logits (logits_to_keep = the K completion positions, which GKD does not do:
                  it keeps every position) and TRL's generalized_jsd_loss at beta=0
      The loss's memory = peak RSS - RSS with the models and the row loaded.

Step times as bench/train.py takes them: CPU seconds of this process / threads (on a shared
machine wall time measures the neighbours), the median after 2 warm-up steps, variants in
interleaved rounds. Single process, no DeepSpeed: the step, not the launch.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train import (CountingCollator, StepTimer, build_model, common_args,  # noqa: E402
                         conversations)
from stages.kd import collate_kd, kd_batch_loss  # noqa: E402
from stages.lib.packed import (ATTENTION, collate, encode, pack, packed_row,  # noqa: E402
                               register_attention)
from stages.lib.topk_loss import KdLoss, kd_token_losses  # noqa: E402
from stages.lib.trainer import packed_trainer_class  # noqa: E402
from stages.sft import sft_loss  # noqa: E402

VOCAB = 151936
PROMPT, COMPLETION = 32, 1024  # tokens per sample of the memory row (bench/train_memory.py's)


def packed_trainer(args, rows, loss_fn, collate_fn):
    """(step times, real tokens per step) of our packed trainer with `loss_fn`."""
    from transformers import TrainingArguments

    register_attention()
    trainer = packed_trainer_class(loss_fn)(
        model=build_model(args, ATTENTION),
        args=TrainingArguments(**common_args(args, tempfile.mkdtemp(),
                                             per_device_train_batch_size=1),
                               remove_unused_columns=False),
        train_dataset=rows, data_collator=collate_fn)
    timer = StepTimer(cpu=not args.gpu)
    trainer.add_callback(timer)
    trainer.train()
    return timer.times, [len(r["input_ids"]) for r in rows][:len(timer.times)]


def trl_gkd(args, convs, lengths):
    """(step times, real tokens per step) of TRL's GKDTrainer, offline (module docstring)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    ds = datasets.Dataset.from_list([{"messages": p + c, "length": n}
                                     for (p, c), n in zip(convs, lengths)])
    cfg = GKDConfig(**common_args(args, tempfile.mkdtemp(),
                                  per_device_train_batch_size=max(
                                      1, round(args.tokens_per_step / args.mean_len)),
                                  train_sampling_strategy="group_by_length"),
                    lmbda=0.0, beta=0.0, seq_kd=False, max_length=2 * args.cap,
                    disable_dropout=True)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, attn_implementation="sdpa")
    trainer = GKDTrainer(model=build_model(args, "sdpa"), teacher_model=teacher, args=cfg,
                         train_dataset=ds, processing_class=tok)
    timer, counter = StepTimer(cpu=not args.gpu), CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.add_callback(timer)
    trainer.train()
    return timer.times, counter.real


def capture(args, samples):
    """(teacher top-k per sample, CPU seconds / threads): the distributions stage's teacher
    pass over the samples, rows of tokens_per_step tokens."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.topk import packed_topk

    register_attention()
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, attn_implementation=ATTENTION)
    vocab = teacher.config.vocab_size
    t0 = time.process_time()
    with torch.no_grad():
        got = packed_topk(teacher, samples, args.k, vocab, args.tokens_per_step)
    return got, (time.process_time() - t0) / torch.get_num_threads()


# --- (c) the loss's memory, one process per variant ---------------------------------------------

def memory_child(args) -> dict:
    import resource

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from bench.train_memory import samples as memory_samples

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    torch.set_num_threads(os.cpu_count())
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation=ATTENTION,
                                                 dtype=torch.float32).train()
    seqs = memory_samples(args.memory_tokens, VOCAB)
    row = packed_row(seqs)
    n = len(row["targets"])
    # a top-k teacher of the stored form: k random ids, fp16 log-probs of a random distribution
    # over the k ids plus a tail (what the loss reads; the values do not change its memory)
    rng = np.random.default_rng(0)
    row["topk_ids"] = rng.integers(0, VOCAB, (n, args.k), dtype=np.int32)
    logits = rng.normal(size=(n, args.k + 1))
    row["topk_logps"] = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
                         )[:, :args.k].astype(np.float16)
    batch = collate_kd([row])
    spec = KdLoss("forward_kl", 0.5)
    teacher = None
    if args.child == "full":
        teacher = AutoModelForCausalLM.from_pretrained(args.model_dir,
                                                       attn_implementation=ATTENTION,
                                                       dtype=torch.float32).eval()
    loaded = rss_mb()
    if args.child in ("kd", "kd-dense"):
        losses, _, _ = kd_token_losses(model, batch, spec, chunk=1024 if args.child == "kd" else 0)
        loss = losses.mean()
    else:
        from trl.experimental.gkd import GKDTrainer

        def logits_of(m):
            return m(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                     max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"],
                     logits_to_keep=batch["keep"], use_cache=False).logits

        with torch.no_grad():
            t_logits = logits_of(teacher)
        loss = GKDTrainer.generalized_jsd_loss(logits_of(model), t_logits, beta=0.0)
    loss.backward()
    return {"variant": args.child, "completion_tokens": n, "row_tokens": len(row["input_ids"]),
            "k": args.k, "peak_rss_mb": round(rss_mb(), 1), "loaded_mb": round(loaded, 1),
            "loss_mb": round(rss_mb() - loaded, 1), "loss": round(float(loss), 4)}


def memory(args) -> dict:
    from bench.train_memory import build_model as build_vocab_model

    if not args.model_dir:
        args.model_dir = os.path.join(tempfile.gettempdir(), "distillery-bench-vocab151936")
    build_vocab_model(args.model_dir)
    out = {}
    for v in ("kd", "kd-dense", "full"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--model-dir",
               args.model_dir, "--memory-tokens", str(args.memory_tokens), "--k", str(args.k)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        out[v] = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                  {"error": (r.stderr.strip().splitlines() or ["?"])[-1]})
        print(f"  memory {v:8s} {json.dumps(out[v])}", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--median", type=int, default=250, help="median trace tokens")
    parser.add_argument("--cap", type=int, default=1024, help="max length")
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--traces", type=int, default=160)
    parser.add_argument("--k", type=int, default=32, help="teacher top-k")
    parser.add_argument("--teacher-layers", type=int, default=20,
                        help="the teacher's depth (the student has 4 layers)")
    parser.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-tokens", type=int, default=2048,
                        help="completion tokens of the memory row (c)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--model-dir", default="", help="(c)'s big-vocabulary model folder")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.gpu = False
    if args.child:
        print(json.dumps(memory_child(args)), flush=True)
        return

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from pipeline.apps.tiny_model import build_tiny_model
    from stages.lib.chat import target_format

    torch.set_num_threads(os.cpu_count())
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    args.model = build_tiny_model(tempfile.mkdtemp(prefix="bench-student-"), seed=0)
    args.teacher = build_tiny_model(tempfile.mkdtemp(prefix="bench-teacher-"),
                                    layers=args.teacher_layers, seed=1)
    tok = AutoTokenizer.from_pretrained(args.model)
    convs = conversations(args.traces, args.median, args.cap)
    fmt = target_format(tok, args.model, "", "chat", "think", "bench")
    # traces shortened to --cap tokens by whole reasoning lines, so that no trainer truncates:
    # every variant sees the same complete conversations
    samples = []
    for i, (p, c) in enumerate(convs):
        lines = c[-1]["content"].split("\n")   # <think>, reasoning lines, </think>, answer
        while True:
            pi, ci = encode(tok, p, "\n".join(lines), fmt)
            if len(pi) + len(ci) <= args.cap or len(lines) <= 4:
                break
            over = len(pi) + len(ci) - args.cap
            del lines[max(2, len(lines) - 2 - -(-over // 20)):-2]  # ~28 tokens a line
        convs[i] = (p, [{"role": "assistant", "content": "\n".join(lines)}])
        samples.append((pi + ci, len(pi)))
    lengths = [len(ids) for ids, _ in samples]
    args.mean_len = statistics.mean(lengths)
    print(f"workload: {len(samples)} traces, tokens median {statistics.median(lengths):.0f} "
          f"mean {args.mean_len:.0f} max {max(lengths)} (cap {args.cap}); "
          f"~{args.tokens_per_step} tokens/step; k={args.k}; "
          f"teacher {args.teacher_layers} layers; "
          f"{torch.get_num_threads()} threads",
          flush=True)

    got, capture_s = capture(args, samples)
    n_completion = sum(len(ids) - n for ids, n in samples)
    capture_rate = sum(lengths) / capture_s
    print(f"capture: {n_completion} completion positions, top-{args.k}, {capture_s:.2f} CPU s "
          f"({capture_rate:.0f} tokens/s)", flush=True)
    bins = pack(lengths, args.tokens_per_step)
    random.Random(0).shuffle(bins)
    rows = []
    for b in bins:
        row = packed_row([samples[i] for i in b])
        row["topk_ids"] = np.concatenate([got[i]["ids"] for i in b])
        row["topk_logps"] = np.concatenate([got[i]["logps"] for i in b]).astype(np.float16)
        rows.append(row)

    kd_loss = functools.partial(kd_batch_loss, spec=KdLoss("forward_kl", 0.5), taid=None)
    variants = (("sft", lambda: packed_trainer(args, rows, sft_loss, collate)),
                ("kd", lambda: packed_trainer(args, rows, kd_loss, collate_kd)),
                ("gkd", lambda: trl_gkd(args, convs, lengths)))
    results = {k: ([], []) for k, _ in variants}
    for r in range(args.rounds):
        for key, fn in variants:
            times, real = fn()
            results[key][0].extend(times[2:])            # 2 warm-up steps (allocator, threads)
            results[key][1].extend(real[2:len(times)])
            print(f"  round {r} {key}: {statistics.median(times[2:]):.3f} s/step", flush=True)

    rate, step = {}, {}
    names = {"sft": "our sft step (packed)", "kd": f"our kd step (packed, top-{args.k})",
             "gkd": "TRL GKDTrainer (lmbda=0, beta=0, grouped)"}
    print(f"\n{'variant':44s} {'s/step':>8s} {'real tok/step':>13s} {'real tok/s':>10s}")
    for key, (times, real) in results.items():
        step[key], tokens = statistics.median(times), statistics.mean(real)
        rate[key] = tokens / step[key]
        print(f"{names[key]:44s} {step[key]:8.3f} {tokens:13.0f} {rate[key]:10.0f}")
    with_capture = 1 / (1 / rate["kd"] + 1 / capture_rate)
    print(f"\n(a) kd step / sft step = {step['kd'] / step['sft']:.2f}x   (target <= 1.3)")
    print(f"(b) kd tok/s / GKD tok/s = {rate['kd'] / rate['gkd']:.2f}x   (target >= 3); "
          f"with the capture charged to one epoch: {with_capture / rate['gkd']:.2f}x")

    if not args.skip_memory:
        print(f"\n(c) loss memory, vocabulary {VOCAB}, {args.memory_tokens} completion tokens",
              flush=True)
        mem = memory(args)
        if all("loss_mb" in mem[v] for v in mem):
            for v in ("kd", "kd-dense"):
                print(f"    {v} / full: loss {mem[v]['loss_mb'] / mem['full']['loss_mb']:.3f}x,"
                      f" peak RSS {mem[v]['peak_rss_mb'] / mem['full']['peak_rss_mb']:.3f}x")
            print("    (target: kd / full loss memory <= 0.25)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
