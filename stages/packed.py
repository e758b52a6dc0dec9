"""The packed forward and the packed trainer that sft, redi and provenance share.

Padding is where the time goes on real traces (lengths log-normal around ~1k tokens), so:
rows are packed best-fit into one sequence per worker and step, with no padding at all; attention
is variable-length (one causal block per sample, never a dense mask, never across samples); only
the positions that predict completion tokens reach the LM head. bench/train.py measures the
trainer against TRL's SFTTrainer; docs/training.md is the guide.

    encode -> fit_length -> pack -> packed_row -> collate -> completion_logps
    train_packed(config, loss_fn): one Ray Train worker (cluster/train.py's fit starts them)
    scoring (provenance, no gradient): score_completions -> score_token_ids -> pack ->
      packed_row -> completion_logps_chunked (the LM head a chunk of positions at a time);
      bench/provenance.py measures it against vLLM prompt_logprobs and a padded forward
"""
from __future__ import annotations

import bisect
import json
import os
import time

from pipeline.errors import UserError
from stages.chat import TargetFormat, split_think, target_texts

ATTENTION = "distillery_varlen"  # our attention function's name in transformers' registry


# --- inputs: student check, chat rendering, tokenization ----------------------------------------

def check_student(path: str, stage: str, role: str = "student") -> str:
    """The student (or any `role` model: provenance's teacher) must be something
    AutoModelForCausalLM loads; say so clearly, naming `{stage}.{role}`, when it is not."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not path:
        raise UserError(f"{stage}.{role} is empty: set `{role}:` in the recipe "
                        f"or pass {stage}.{role}=PATH")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{stage}.{role} {path!r}: not a model folder or hub id that transformers "
                        f"can load ({str(e).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{stage}.{role} {path!r}: model type '{config.model_type}' is not a "
                        "causal language model (AutoModelForCausalLM cannot load it)")
    return path


def upstream_drops(version, data_root: str) -> str:
    """'select dropped {...}; prune dropped {...}; …' — which filter emptied the data."""
    from pipeline.store import Store

    store, parts, todo, seen = Store(data_root), [], [version], set()
    while todo:
        v = todo.pop(0)
        if v.ref() in seen:
            continue
        seen.add(v.ref())
        drops = {k: n for k, n in (v.manifest.get("drops") or {}).items() if n}
        parts.append(f"{v.ref()} dropped {drops or 'nothing'} of {v.manifest.get('rows_in')} rows")
        for stage, ver in (v.manifest.get("inputs") or {}).items():
            found = store.find(stage, ver)
            if found is not None:
                todo.append(found)
    return "; ".join(parts)


def encode(tokenizer, prompt: list[dict], trace: str,
           fmt: TargetFormat) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt (with the generation prompt) and of the target: the trace
    as this model writes it after that prompt, ending with its stop token (stages/chat.py,
    target_texts). Training sees exactly what vLLM sees and what the model must generate."""
    prompt_text, target, _ = target_texts(tokenizer, prompt, trace, fmt)
    # The rendered prompt carries its BOS as text already: no special tokens added.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return prompt_ids, completion_ids


def fit_length(prompt_ids, completion_ids, max_length: int, overlong: str):
    """(ids, n_prompt, outcome) with outcome "ok" | "truncated" | a drop reason."""
    if not completion_ids:
        return None, 0, "empty_completion"
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids + completion_ids, len(prompt_ids), "ok"
    if len(prompt_ids) >= max_length:
        return None, 0, "prompt_over_max_length"
    if overlong == "drop":
        return None, 0, "over_max_length"
    return prompt_ids + completion_ids[:max_length - len(prompt_ids)], len(prompt_ids), "truncated"


# --- packing -------------------------------------------------------------------------------------

def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) goes into the fullest bin it still fits.

    O(n log n) with a sorted list of (free space, bin). Real traces fill bins to ~99%: a 4,096-
    token bin takes a 2,900-token trace and then the best-fitting short ones.
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return bins


def packed_row(seqs: list[tuple[list[int], int]]) -> dict:
    """One padding-free training row from [(token ids, prompt length)].

    input_ids / position_ids: the samples back to back, positions restarting at 0 per sample.
    cu_seqlens: sample boundaries [0, L0, L0+L1, …] for the variable-length attention.
    keep: the positions whose next token is a completion token of the same sample (position t
      predicts token t+1), targets: those next tokens, keep_seq: which sample each belongs to.
    """
    import numpy as np

    lengths = [len(ids) for ids, _ in seqs]
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lengths)
    input_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in seqs])
    position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    keep = np.concatenate([np.arange(cu[s] + n_prompt - 1, cu[s + 1] - 1, dtype=np.int64)
                           for s, (_, n_prompt) in enumerate(seqs)])
    keep_seq = np.concatenate([np.full(len(ids) - n_prompt, s, dtype=np.int64)
                               for s, (ids, n_prompt) in enumerate(seqs)])
    return {"input_ids": input_ids, "position_ids": position_ids, "cu_seqlens": cu,
            "keep": keep, "targets": input_ids[keep + 1], "keep_seq": keep_seq,
            "max_seqlen": int(max(lengths)), "n_seqs": len(seqs)}


def collate(items: list[dict]) -> dict:
    """Batch size 1: a packed row already is the worker's whole micro-batch."""
    import torch

    (row,) = items
    # torch.tensor copies: rows come from Ray's object store as read-only arrays
    batch = {k: torch.tensor(row[k]) for k in ("cu_seqlens", "keep", "targets", "keep_seq")}
    batch["input_ids"] = torch.tensor(row["input_ids"])[None]
    batch["position_ids"] = torch.tensor(row["position_ids"])[None]
    batch["max_seqlen"] = row["max_seqlen"]
    batch["n_seqs"] = row["n_seqs"]
    return batch


# --- the model side: variable-length attention, completion log-probs ------------------------------

def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Causal attention within each packed sample; no dense mask, nothing across samples.

    query [1, heads, T, d], key/value [1, kv_heads, T, d] -> ([1, T, heads, d], None), the
    transformers attention-function contract. GPU: torch's flash varlen kernel over cu_seqlens
    (not measured in this repo yet). CPU: one fused SDPA call per sample — per-sample cost is
    L_i², where a dense block-diagonal mask over the packed row costs (sum L_i)²
    (bench/train.py measures both) — or, for many short samples of similar length, ONE causal
    SDPA call over the samples right-padded to the longest (a pad key only follows a sample's
    real tokens, so causality alone hides it): n * L_max² work for one call instead of n calls.
    That is taken while n * L_max² <= 3 * sum(L_i²): the demo teacher's rows of 32 traces
    (L_max ~93, mean ~62: ratio ~2.2) train 0.143 vs 0.152 s a step (concise-only rows 0.098
    vs 0.115), the same loss and gradients to 6e-8 (2026-12-01); real long-CoT rows (one
    4,000-token trace beside 500-token ones: ratio ~13) keep the per-sample calls.
    """
    import torch
    import torch.nn.functional as F

    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1),
                          value[0].transpose(0, 1), cu_seq_lens_q, cu_seq_lens_q,
                          max_length_q, max_length_q, scale=scaling, window_size=(-1, 0),
                          enable_gqa=True)
        return out[None], None
    lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    n, longest = lengths.numel(), int(max_length_q)
    if n > 1 and n * longest ** 2 <= 3 * int((lengths.long() ** 2).sum()):
        seq_of = torch.repeat_interleave(torch.arange(n, device=query.device), lengths)
        pos = torch.arange(query.shape[2], device=query.device) - cu_seq_lens_q[:-1].long()[seq_of]

        def padded(x):  # [1, h, T, d] -> [n, h, longest, d], sample i's tokens first in row i
            out = x.new_zeros(n, x.shape[1], longest, x.shape[3])
            out[seq_of, :, pos] = x[0].transpose(0, 1)
            return out

        out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value),
                                             is_causal=True, scale=scaling, enable_gqa=True)
        return out[seq_of, :, pos][None], None
    bounds = cu_seq_lens_q.tolist()
    outs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                           is_causal=True, scale=scaling, enable_gqa=True)
            for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention)


def completion_logps(model, batch, chunk: int = 1024):
    """Log-probability of every completion token of a packed row: [K] (K = len(batch["keep"])),
    with gradients when grad mode is on (training: sft, redi) and without (scoring).

    Only the K completion positions reach the LM head (`logits_to_keep`), and the head runs on
    `chunk` of them at a time, forward and backward (stages/lib/lm_head.py): the [K, vocab]
    logits never exist at once — 1,024 x 152k vocab x 4 B = 0.6 GB per chunk, where all K = 32k
    positions of a packed row would be 19.9 GB a copy. chunk=0 computes all K at once (the
    unchunked reference the tests and bench/train_memory.py compare against).
    """
    from stages.lib.lm_head import completion_logps as head_logps

    def forward():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                     max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"],
                     logits_to_keep=batch["keep"], use_cache=False)

    return head_logps(model, forward, batch["targets"], chunk)


def completion_logps_chunked(model, batch, chunk: int = 1024):
    """Scoring's name for completion_logps (one chunk loop for training and scoring)."""
    return completion_logps(model, batch, chunk)


def onednn_linears(model):
    """CPU fp32 inference: every nn.Linear of `model` runs as a oneDNN matmul on weights packed
    once (what torch.compile's freezing does), in place; returns the model. No gradient.

    Why: torch's fp32 F.linear goes to MKL sgemm, which on this AMD EPYC reaches ~77 GFLOP/s per
    core; oneDNN with a prepacked weight ~191 (5,500 x 256 @ 256 x 1,024, one thread, measured),
    and the linears are ~60% of a scoring forward. The same values to ~1e-6.
    """
    import torch

    class OneDNNLinear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.out_features = linear.out_features
            self.weight = linear.weight  # kept for get_output_embeddings() and tied weights
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
            self.bias = None if linear.bias is None else linear.bias.detach()

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, OneDNNLinear(child))
    return model


def score_token_ids(model, seqs: list[tuple[list[int], int]], tokens_per_row: int,
                    chunk: int = 1024) -> list[list[float]]:
    """[(token ids, prompt length)] -> per sequence, the log-prob of each token after its prompt.

    The sequences are packed best-fit into rows of tokens_per_row tokens (at least the longest
    sequence; no padding) and each row runs through completion_logps_chunked. A sequence with no
    token after its prompt gets []. bench/provenance.py times exactly this.
    """
    import torch

    out: list[list[float]] = [[] for _ in seqs]
    todo = [i for i, (ids, n_prompt) in enumerate(seqs) if len(ids) > n_prompt]
    capacity = max([tokens_per_row] + [len(seqs[i][0]) for i in todo])
    device = next(model.parameters()).device
    for b in pack([len(seqs[i][0]) for i in todo], capacity):
        members = [todo[j] for j in b]
        row = packed_row([seqs[i] for i in members])
        batch = {k: torch.as_tensor(row[k], device=device)
                 for k in ("cu_seqlens", "keep", "targets")}
        batch["input_ids"] = torch.as_tensor(row["input_ids"], device=device)[None]
        batch["position_ids"] = torch.as_tensor(row["position_ids"], device=device)[None]
        batch["max_seqlen"] = row["max_seqlen"]
        logps = completion_logps_chunked(model, batch, chunk).tolist()
        at = 0
        for i in members:  # packed_row keeps the order of its samples
            n = len(seqs[i][0]) - seqs[i][1]
            out[i] = logps[at:at + n]
            at += n
    return out


def score_completions(model, tokenizer, prompt_texts: list[str], completions: list[str],
                      max_length: int, tokens_per_row: int, chunk: int = 1024) -> list[dict]:
    """Per completion, the log-prob of each of its tokens after its (rendered) prompt.

    Returns [{"offsets": [(start, end)] characters of each scored token in the completion text,
    "logps": [float], "truncated": bool}]. Prompt and completion are tokenized apart (as
    `encode` does for training), the completion with the tokenizer's offset mapping; a pair longer
    than max_length is scored on the completion's first max_length - len(prompt) tokens
    (truncated; nothing at all when the prompt alone fills max_length).
    """
    prompts = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    comps = tokenizer(completions, add_special_tokens=False, return_offsets_mapping=True)
    out, seqs = [], []
    for p_ids, c_ids, offsets in zip(prompts, comps["input_ids"], comps["offset_mapping"]):
        room = max(0, max_length - len(p_ids))
        out.append({"offsets": [tuple(o) for o in offsets[:room]], "logps": [],
                    "truncated": len(c_ids) > room})
        seqs.append((p_ids + c_ids[:room], len(p_ids)))
    for entry, logps in zip(out, score_token_ids(model, seqs, tokens_per_row, chunk)):
        entry["logps"] = logps
    return out


def score_traces(model, tokenizer, messages: list[list[dict]], traces: list[str],
                 fmt: TargetFormat, max_length: int, tokens_per_row: int,
                 chunk: int = 1024) -> list[dict]:
    """score_completions of each trace in this model's own form after its own prompt (what it
    would generate: stages/chat.py, target_texts), with the offsets mapped back onto `traces`.

    Teacher and student thus score the same trace, each as it would write it: a student whose
    prompt opens `<think>` is not asked to predict an opening tag it never writes. A token of
    the reasoning or the answer gets its characters in the trace; a tag the trace has too
    (`</think>`) gets the trace's tag; anything else (a tag the trace lacks, the stop token) the
    empty range at the edge of the part before it (no sentence contains it; the completion mean
    counts it).
    """
    prompts, targets, spans = [], [], []
    for m, trace in zip(messages, traces):
        prompt, target, parts = target_texts(tokenizer, m, trace, fmt)
        prompts.append(prompt)
        targets.append(target)
        spans.append(parts)
    scored = score_completions(model, tokenizer, prompts, targets, max_length, tokens_per_row,
                               chunk)
    for entry, trace, target, parts in zip(scored, traces, targets, spans):
        segments = _trace_segments(trace, len(target), parts, fmt.tags)
        mapped, edge = [], 0  # offsets stay in order: sentences are found by bisection
        for a, b in entry["offsets"]:
            ts, te, ss, se, kind = next(g for g in segments
                                        if g[0] <= a < g[1] or g == segments[-1])
            if kind == "part":
                mapped.append((ss + a - ts, ss + min(b, te) - ts))
            else:
                text = target[a:b].strip()
                at = trace.find(text, max(ss, edge), se) if text else -1
                mapped.append((at, at + len(text)) if at >= 0 else (max(ss, edge),) * 2)
            edge = mapped[-1][1]
        entry["offsets"] = mapped
    return scored


def _trace_segments(trace: str, target_len: int, parts, tags: str):
    """[(target start, end, trace start, end, "part" | "gap")] in order: the reasoning and the
    answer (substrings of the trace: split_think strips them) and the gaps around them."""
    reasoning, final = split_think(trace, tags)
    source = {"reasoning": trace.find(reasoning) if reasoning else 0,
              "final": trace.rfind(final) if final else len(trace)}
    segments, t_at, s_at = [], 0, 0
    for s, e, part in parts:
        src = max(source[part], s_at)
        segments.append((t_at, s, s_at, src, "gap"))
        segments.append((s, e, src, src + e - s, "part"))
        t_at, s_at = e, src + e - s
    segments.append((t_at, target_len, s_at, len(trace), "gap"))
    return segments


def global_sum(value: float):
    """Sum of a number over all workers (a no-op on one)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(float(value), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.item()


# --- the worker: one Ray Train process -----------------------------------------------------------

def packed_trainer_class(loss_fn):
    """A transformers Trainer whose step is `loss_fn(model, packed_row) -> (loss, metrics)`.

    Metrics are averaged over each logging window and land in the logs (TensorBoard) and the
    manifest's lists. bench/train.py times exactly this class.
    """
    import collections

    from transformers import Trainer

    class PackedTrainer(Trainer):
        metrics = collections.defaultdict(list)
        tokens = 0            # input tokens this session on this worker (no padding to count)
        calls = 0             # optimizer steps this session (one packed row per step)
        started = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.started is None:
                PackedTrainer.started = time.perf_counter()
            PackedTrainer.tokens += inputs["input_ids"].numel()
            PackedTrainer.calls += 1
            loss, metrics = loss_fn(model, inputs)
            for k, v in metrics.items():
                self.metrics[k].append(v)
            return loss

        def log(self, logs, start_time=None):
            if "loss" in logs:
                for k, vs in self.metrics.items():
                    logs[k] = sum(vs) / len(vs)
                self.metrics.clear()
            super().log(logs, start_time)

    return PackedTrainer


# Gradient checkpointing ("auto") above this many tokens in a packed row: from there the decoder
# layers' saved activations outgrow everything else a worker holds (docs/training.md derives it
# from the measured bytes per token).
CHECKPOINT_ABOVE = 8192


def gradient_checkpointing(setting, rows) -> bool:
    """resources.<stage>.gradient_checkpointing: true / false, or "auto" = on when the longest
    packed row exceeds CHECKPOINT_ABOVE tokens."""
    if setting == "auto":
        return max(len(r["input_ids"]) for r in rows) > CHECKPOINT_ABOVE
    return bool(setting)


def train_packed(config: dict, loss_fn) -> None:
    """Build the trainer for packed rows, train (resuming if a checkpoint exists), save, report.

    `loss_fn(model, batch) -> (loss, {metric: float})` (see packed_trainer_class).
    """
    from cluster.train import (deepspeed_for_worker, finish, last_checkpoint, peak_memory_mb,
                               progress_callback, worker_env)

    worker_env(config)
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    register_attention()
    rows = ray.get(config["rows"])
    checkpoint_dir = os.path.join(config["out_dir"], "checkpoints")
    use_gpu = config["use_gpu"]
    checkpointing = gradient_checkpointing(config.get("gradient_checkpointing", "auto"), rows)
    args = TrainingArguments(
        output_dir=checkpoint_dir,
        # each decoder layer recomputed in backward from its saved input (non-reentrant
        # torch.utils.checkpoint: the reentrant one needs inputs that require grad)
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        per_device_train_batch_size=1,           # one packed row per worker per step
        gradient_accumulation_steps=1,
        num_train_epochs=config["epochs"],
        max_steps=config["max_steps"] or -1,
        learning_rate=config["learning_rate"],
        lr_scheduler_type=config["lr_scheduler"],
        warmup_steps=config["warmup_ratio"],     # a float < 1 is a fraction of the steps
        weight_decay=config["weight_decay"],
        max_grad_norm=config["max_grad_norm"],
        bf16=use_gpu,                            # CPU trains in fp32
        use_cpu=not use_gpu,
        deepspeed=config["deepspeed"],
        seed=config["seed"],
        logging_steps=config["logging_steps"],
        save_strategy="steps" if config["save_steps"] else "no",
        save_steps=config["save_steps"] or 500,
        save_total_limit=1,
        report_to=[] if config["report_to"] == "none" else [config["report_to"]],
        remove_unused_columns=False,
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
    )
    deepspeed_for_worker(config)
    model = AutoModelForCausalLM.from_pretrained(
        config["model_path"], attn_implementation=ATTENTION,
        dtype=torch.bfloat16 if use_gpu else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])

    PackedTrainer = packed_trainer_class(loss_fn)
    trainer = PackedTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                            processing_class=tokenizer, callbacks=[progress_callback(config["stage"])])
    resume = last_checkpoint(checkpoint_dir)
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - (PackedTrainer.started or time.perf_counter())
    tokens = global_sum(PackedTrainer.tokens)
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [round(h["loss"], 5) for h in history]
    stats = {
        "steps": trainer.state.global_step,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "steps_this_run": PackedTrainer.calls,   # after a resume: steps - resumed_from_step
        # the history of a resumed run includes the logs restored from the checkpoint
        "logged_steps": [h["step"] for h in history],
        "loss": losses,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": round(sum(losses) / len(losses), 5) if losses else None,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "train_s": round(elapsed, 2),
        "peak_memory_mb": peak_memory_mb(use_gpu),
        "workers": int(os.environ.get("WORLD_SIZE", "1")),
        "gradient_checkpointing": checkpointing,
    }
    for key in config["metric_lists"]:
        stats[key.replace("/", "_")] = [round(h[key], 5) for h in history if key in h]
    stop_on_end_of_turn(model, tokenizer, config["end_of_turn"])
    # The saved config must name an attention every loader has, not our registry entry.
    model.config._attn_implementation = "sdpa"
    finish(trainer, tokenizer, config["out_dir"], checkpoint_dir, stats)


def stop_on_end_of_turn(model, tokenizer, end_of_turn: str) -> None:
    """The saved generation config's EOS ids include the token every target ended with: vLLM
    and transformers' generate stop on those ids, so the student stops where it was taught to
    (a ChatML template on a base model: eos <|endoftext|>, end of turn <|im_end|>)."""
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if eot is not None and eot not in ids:
        model.generation_config.eos_token_id = ids + [eot] if ids else eot


def worker_config(cfg, ctx, model_path: str, rows, end_of_turn: str) -> dict:
    """What every worker gets: the schedule knobs, where to write, the packed rows (by ref) and
    the stop token the targets end with (saved as the model's EOS: stop_on_end_of_turn)."""
    import ray

    ctx.ensure_ray()
    return {
        "model_path": model_path, "out_dir": ctx.out_dir, "rows": ray.put(rows),
        "epochs": cfg.epochs, "max_steps": cfg.max_steps, "learning_rate": cfg.learning_rate,
        "warmup_ratio": cfg.warmup_ratio, "lr_scheduler": cfg.lr_scheduler,
        "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "seed": cfg.seed,
        "save_steps": cfg.save_steps, "logging_steps": cfg.logging_steps,
        "report_to": cfg.report_to, "metric_lists": [], "end_of_turn": end_of_turn,
    }


def read_stats(ctx) -> dict:
    with open(os.path.join(ctx.out_dir, "train_stats.json"), encoding="utf-8") as f:
        return json.load(f)
