"""Training-step benchmark: our packed SFT / REDI step against stock TRL, in one run.

    .venv/bin/python bench/train.py                 # CPU: tiny model, workload scaled down
    .venv/bin/python bench/train.py --gpu --shape qwen2.5-0.5b --tokens-per-step 16384 --cap 4096 \
        --median 1000                               # the issue's H100 workload (not run here)

Workload like real traces: completion lengths log-normal (median --median tokens, sigma 0.8),
capped at --cap, ~--tokens-per-step real tokens per optimizer step, the same conversations for
every variant. Prints real (non-pad) tokens/s of
  (a) TRL SFTTrainer at its best for this data: packing=True, best-fit ("bfd"), + liger kernel
      when installed (GPU only; it needs triton),
  (b) TRL SFTTrainer defaults (padding, batch size chosen for the same tokens/step),
  (c) our sft step (stages/sft.py: packed row, per-sample causal attention, completion-only
      logits), and (c') the same packed row with a dense block-diagonal mask instead,
the ratios c/a and c/b, MFU, and the REDI step vs TRL's DPO step (with its reference model) on
the same pairs. Variants run in interleaved rounds and the median step time counts: the machine
is shared, so single timings are noisy; on CPU a step's time is the process's CPU seconds / threads
(what the step would take with the cores to itself). Single process, no DeepSpeed: the step,
not the launch. The workload line prints the actual token lengths (one reasoning line is ~28
tokens with the tiny tokenizer, so --median 250 gives a median near 450 tokens).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Peak fp32 FLOP/s of this machine's 2 cores (AVX-512: 2 FMA units x 16 lanes x 2 flops x
# ~2.45 GHz = 157 GFLOP/s per core) — a nominal figure for MFU, not a measurement.
CPU_PEAK = 2 * 157e9
GPU_PEAK = 989e12  # H100 SXM dense bf16


def conversations(n: int, median: int, cap: int, seed: int = 0):
    """Arithmetic 'traces' whose token lengths are log-normal around `median`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        target = min(cap - 40, max(8, int(rng.lognormvariate(math.log(median), 0.8))))
        lines = max(1, target // 16)  # one reasoning line is ~16 tokens with this tokenizer
        body = "\n".join(f"{a} + {b}: step {k}, add the digits and carry" for k in range(lines))
        out.append(([{"role": "user", "content": f"Compute {a} + {b}."}],
                    [{"role": "assistant",
                      "content": f"<think>\n{body}\n</think>\nThe answer is \\boxed{{{a + b}}}."}]))
    return out


class StepTimer:
    """A TrainerCallback that records each optimizer step's time.

    On CPU it records this process's CPU seconds (all threads) divided by the threads used:
    on a shared machine wall time mostly measures the neighbours, CPU time measures the work.
    On GPU, wall time.
    """

    def __init__(self, cpu: bool):
        self.times, self.t0, self.cpu = [], None, cpu

    def now(self):
        if self.cpu:
            import torch

            return time.process_time() / torch.get_num_threads()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = self.now()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(self.now() - self.t0)

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


class CountingCollator:
    """Wraps a collator and counts real tokens: attention_mask ones, or all tokens when the
    batch is padding-free (one packed row, position_ids restart per sample)."""

    def __init__(self, inner):
        self.inner, self.real = inner, []

    def __call__(self, items):
        batch = self.inner(items)
        mask = batch.get("attention_mask")
        self.real.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch


def build_model(args, attn):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation=attn, dtype=dtype)
    return model.to("cuda" if args.gpu else "cpu")


def common_args(args, out, **kw):
    return dict(output_dir=out, max_steps=args.steps, learning_rate=1e-5, logging_steps=10**6,
                save_strategy="no", report_to=[], use_cpu=not args.gpu, bf16=args.gpu,
                dataloader_num_workers=0, seed=0, disable_tqdm=True, **kw)


def trl_sft(args, convs, best: bool):
    """(step times, real tokens per step) of TRL's SFTTrainer."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    ds = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in convs])
    mean_len = args.mean_len
    if best:
        # packed rows of `cap` tokens; tokens_per_step / cap rows per step
        cfg = SFTConfig(**common_args(args, tempfile.mkdtemp(),
                                      per_device_train_batch_size=max(1, args.tokens_per_step
                                                                      // args.cap),
                                      use_liger_kernel=args.liger),
                        packing=True, packing_strategy="bfd", max_length=args.cap)
    else:
        cfg = SFTConfig(**common_args(args, tempfile.mkdtemp(),
                                      per_device_train_batch_size=max(
                                          1, round(args.tokens_per_step / mean_len))),
                        max_length=args.cap)
    trainer = SFTTrainer(model=build_model(args, "sdpa"), args=cfg, train_dataset=ds,
                         processing_class=tok)
    timer, counter = StepTimer(cpu=not args.gpu), CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.add_callback(timer)
    trainer.train()
    return timer.times, counter.real


def our_sft(args, rows, attention: str):
    """(step times, real tokens per step) of our packed step (stages/sft.py).

    attention "varlen": ours, one causal SDPA per sample. "sdpa" (c'): the same packed row
    through stock sdpa, where transformers detects the packing from position_ids and builds a
    dense block-diagonal causal mask over the whole row (T x T) — the dense-mask path.
    """
    from transformers import TrainingArguments

    from stages.lib.packed import ATTENTION, collate, register_attention
    from stages.lib.trainer import packed_trainer_class
    from stages.sft import sft_loss

    register_attention()
    trainer_cls = packed_trainer_class(sft_loss)
    trainer = trainer_cls(model=build_model(args, ATTENTION if attention == "varlen" else attention),
                          args=TrainingArguments(**common_args(args, tempfile.mkdtemp(),
                                                               per_device_train_batch_size=1),
                                                 remove_unused_columns=False),
                          train_dataset=rows, data_collator=collate)
    timer = StepTimer(cpu=not args.gpu)
    trainer.add_callback(timer)
    trainer.train()
    return timer.times, [len(r["input_ids"]) for r in rows][:len(timer.times)]


def pairs_data(tok, convs_good, convs_bad):
    from stages.lib.chat import target_format
    from stages.lib.packed import encode

    fmt = target_format(tok, "bench", "", "chat", "think", "bench")
    out = []
    for (p, c), (_, r) in zip(convs_good, convs_bad):
        pi, ci = encode(tok, p, c[-1]["content"], fmt)
        _, ri = encode(tok, p, r[-1]["content"], fmt)
        out.append((p, c, r, pi, ci, ri))
    return out


def our_redi(args, pairs):
    import functools

    from transformers import TrainingArguments

    from stages.redi import CollapseWatch, redi_batch_loss
    from stages.lib.packed import ATTENTION, collate, packed_row, register_attention
    from stages.lib.trainer import packed_trainer_class

    register_attention()
    k = args.pairs_per_step
    rows = [packed_row([s for _, _, _, pi, ci, ri in pairs[i:i + k]
                        for s in ((pi + ci, len(pi)), (pi + ri, len(pi)))])
            for i in range(0, len(pairs) - k + 1, k)]
    loss = functools.partial(redi_batch_loss, alpha=0.8, watch=CollapseWatch(0.05))
    trainer = packed_trainer_class(loss)(
        model=build_model(args, ATTENTION),
        args=TrainingArguments(**common_args(args, tempfile.mkdtemp(),
                                             per_device_train_batch_size=1),
                               remove_unused_columns=False),
        train_dataset=rows, data_collator=collate)
    timer = StepTimer(cpu=not args.gpu)
    trainer.add_callback(timer)
    trainer.train()
    return timer.times


def trl_dpo(args, pairs):
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    ds = datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r}
                                     for p, c, r, *_ in pairs])
    cfg = DPOConfig(**common_args(args, tempfile.mkdtemp(),
                                  per_device_train_batch_size=args.pairs_per_step),
                    max_length=2 * args.cap)
    trainer = DPOTrainer(model=build_model(args, "sdpa"), args=cfg, train_dataset=ds,
                         processing_class=tok)
    timer = StepTimer(cpu=not args.gpu)
    trainer.add_callback(timer)
    trainer.train()
    return timer.times


def flops_per_token(config, context: float) -> float:
    """6 x params (forward + backward matmuls; the tied LM head counted once as a matmul)
    + causal attention 6 x layers x hidden x context (QK^T and AV, fwd+bwd, half the square)."""
    d, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size
    params = L * per_layer + config.vocab_size * d
    return 6 * params + 6 * L * d * context


def main():
    from pipeline.apps.tiny_model import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model folder (default: build the tiny one)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--shape", default="", choices=["", *SHAPES],
                        help="without --model: a random-init model of "
                        "this real shape (pipeline/apps/tiny_model.py SHAPES: qwen2.5-0.5b)")
    parser.add_argument("--liger", action="store_true", help="TRL best with liger (GPU)")
    parser.add_argument("--median", type=int, default=250, help="median trace tokens")
    parser.add_argument("--cap", type=int, default=1024, help="max length")
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from stages.lib.chat import target_format
    from stages.lib.packed import encode, pack, packed_row

    if not args.gpu:
        torch.set_num_threads(os.cpu_count())
    if not args.model:
        from pipeline.apps.tiny_model import build_tiny_model

        args.model = build_tiny_model(tempfile.mkdtemp(prefix="bench-model-"),
                                      **(SHAPES[args.shape] if args.shape else {}))
    tok = AutoTokenizer.from_pretrained(args.model)
    convs = conversations(400, args.median, args.cap)
    fmt = target_format(tok, args.model, "", "chat", "think", "bench")
    samples = []
    for p, c in convs:
        pi, ci = encode(tok, p, c[-1]["content"], fmt)
        samples.append((pi + ci[:args.cap - len(pi)], len(pi)))
    lengths = [len(ids) for ids, _ in samples]
    args.mean_len = statistics.mean(lengths)
    bins = pack(lengths, args.tokens_per_step)
    random.Random(0).shuffle(bins)
    rows = [packed_row([samples[i] for i in b]) for b in bins]
    print(f"workload: {len(samples)} traces, tokens median {statistics.median(lengths):.0f} "
          f"mean {args.mean_len:.0f} max {max(lengths)} (cap {args.cap}); "
          f"~{args.tokens_per_step} tokens/step; {'GPU' if args.gpu else 'CPU'}, "
          f"{torch.get_num_threads()} threads", flush=True)

    results = {k: ([], []) for k in ("a", "b", "c", "c'")}
    for r in range(args.rounds):
        for key, fn in (("a", lambda: trl_sft(args, convs, best=True)),
                        ("b", lambda: trl_sft(args, convs, best=False)),
                        ("c", lambda: our_sft(args, rows, "varlen")),
                        ("c'", lambda: our_sft(args, rows, "sdpa"))):
            times, real = fn()
            # the first 2 steps of each run warm up (allocator, threads); real tokens of the
            # same steps
            results[key][0].extend(times[2:])
            results[key][1].extend(real[2:len(times)])
            print(f"  round {r} {key}: {statistics.median(times[2:]):.3f} s/step", flush=True)

    config = AutoConfig.from_pretrained(args.model)
    peak = GPU_PEAK if args.gpu else CPU_PEAK
    rate = {}
    names = {"a": "TRL best (packing=True bfd" + (" + liger" if args.liger else ", no liger") + ")",
             "b": "TRL defaults (padding)", "c": "ours (packed, per-sample causal attention)",
             "c'": "ours, dense block-diagonal mask"}
    print(f"\n{'variant':48s} {'s/step':>8s} {'real tok/step':>13s} {'real tok/s':>10s} {'MFU':>6s}")
    for key, (times, real) in results.items():
        step = statistics.median(times)
        tokens = statistics.mean(real)
        rate[key] = tokens / step
        # attention context: mean sample length (causal, per sample) for every variant
        mfu = rate[key] * flops_per_token(config, args.mean_len / 2) / peak
        print(f"{names[key]:48s} {step:8.3f} {tokens:13.0f} {rate[key]:10.0f} {mfu:6.1%}")
    dense = rate["c'"]
    print(f"\nc/a = {rate['c'] / rate['a']:.2f}x   c/b = {rate['c'] / rate['b']:.2f}x   "
          f"c/c' = {rate['c'] / dense:.2f}x")

    good = conversations(200, args.median, args.cap, seed=1)
    bad = conversations(200, args.median, args.cap, seed=2)
    pairs = pairs_data(tok, good, bad)
    redi, dpo = [], []
    for r in range(args.rounds):
        redi.extend(our_redi(args, pairs)[2:])
        dpo.extend(trl_dpo(args, pairs)[2:])
    print(f"\nREDI step (ours, {args.pairs_per_step} pairs, one packed forward, no reference): "
          f"{statistics.median(redi):.3f} s")
    print(f"TRL DPO step ({args.pairs_per_step} pairs, padded, + reference forward):      "
          f"{statistics.median(dpo):.3f} s")
    print(f"REDI / DPO = {statistics.median(redi) / statistics.median(dpo):.2f}x")


if __name__ == "__main__":
    main()
