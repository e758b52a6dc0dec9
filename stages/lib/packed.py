"""The packed forward that sft, redi, provenance and the trainer (stages/lib/trainer.py) share.

Padding is where the time goes on real traces (lengths log-normal around ~1k tokens), so:
rows are packed best-fit into one sequence per worker and step, with no padding at all; attention
is variable-length (one causal block per sample, never a dense mask, never across samples); only
the positions that predict completion tokens reach the LM head. bench/train.py measures the
trainer against TRL's SFTTrainer; docs/training.md is the guide.

    encode -> fit_length -> pack -> packed_row -> collate -> completion_logps
    scoring (provenance, no gradient): score_completions -> score_token_ids -> pack ->
      packed_row -> completion_logps_chunked (the LM head a chunk of positions at a time);
      bench/provenance.py measures it against vLLM prompt_logprobs and a padded forward
"""
from __future__ import annotations

import bisect

from stages.lib.chat import TargetFormat, split_think, target_texts
from stages.lib.lm_head import completion_logps as head_logps

ATTENTION = "distillery_varlen"  # our attention function's name in transformers' registry


# --- inputs: chat rendering, tokenization -------------------------------------------------------

def encode(tokenizer, prompt: list[dict], trace: str,
           fmt: TargetFormat) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt (with the generation prompt) and of the target: the trace
    as this model writes it after that prompt, ending with its stop token (stages/lib/chat.py,
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
    (tests/test_gpu.py checks it against the CPU path). CPU: one fused SDPA call per sample —
    per-sample cost is L_i², where a dense block-diagonal mask over the packed row costs (sum L_i)²
    (bench/train.py measures both) — or, for many short samples of similar length, ONE causal SDPA
    call over the samples right-padded to the longest (a pad key only follows a sample's real
    tokens, so causality alone hides it): n * L_max² work for one call instead of n calls. That is
    taken while n * L_max² <= 3 * sum(L_i²): the demo teacher's rows of 32 traces (L_max ~93, mean
    ~62: 32 * 93² / (32 * 62²) ~ 2.2) take the one call, faster with the same loss and gradients
    (docs/performance.md); real long-CoT rows (one 4,000-token trace beside 500-token ones: ratio
    ~13) keep the per-sample calls.
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


def completion_logps(model, batch, chunk: int = 1024, weights=None):
    """Log-probability of every completion token of a packed row: [K] (K = len(batch["keep"])),
    with gradients when grad mode is on (training: sft, redi) and without (scoring).

    Only the K completion positions reach the LM head (`logits_to_keep`), and the head runs on
    `chunk` of them at a time, forward and backward (stages/lib/lm_head.py): the [K, vocab]
    logits never exist at once — 1,024 x 152k vocab x 4 B = 0.6 GB per chunk, where all K = 32k
    positions of a packed row would be 19.9 GB a copy. chunk=0 computes all K at once (the
    unchunked reference the tests and bench/train_memory.py compare against).

    `weights` [K]: a loss linear in the log-probs passes its per-token coefficients (up to one
    scale), and the head's gradients are taken in the forward's chunk loop: 3 head matmuls, as
    unchunked, instead of 4 (stages/lib/lm_head.py HeadLogps).
    """
    def forward():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                     max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"],
                     logits_to_keep=batch["keep"], use_cache=False)

    return head_logps(model, forward, batch["targets"], chunk, weights)


def completion_logps_chunked(model, batch, chunk: int = 1024):
    """Scoring's name for completion_logps (one chunk loop for training and scoring)."""
    return completion_logps(model, batch, chunk)


def onednn_linears(model):
    """CPU fp32 inference: every nn.Linear of `model` runs as a oneDNN matmul on weights packed
    once (what torch.compile's freezing does), in place; returns the model. No gradient.

    Why: torch's fp32 F.linear goes to MKL sgemm, which on an AMD EPYC reaches ~2/5 of what
    oneDNN does with a prepacked weight (docs/performance.md), and the linears are ~60% of a
    scoring forward. The same values to ~1e-6.
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
                      max_length: int, tokens_per_row: int, chunk: int = 1024,
                      score_ids=None) -> list[dict]:
    """Per completion, the log-prob of each of its tokens after its (rendered) prompt.

    Returns [{"offsets": [(start, end)] characters of each scored token in the completion text,
    "logps": [float], "truncated": bool}]. Prompt and completion are tokenized apart (as
    `encode` does for training), the completion with the tokenizer's offset mapping; a pair longer
    than max_length is scored on the completion's first max_length - len(prompt) tokens
    (truncated; nothing at all when the prompt alone fills max_length).

    score_ids: what turns the [(token ids, prompt length)] into log-probs; None is
    score_token_ids. provenance passes stages/lib/topk.py's TopkScorer, which also keeps the
    teacher's top-k from the same forward.
    """
    prompts = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    comps = tokenizer(completions, add_special_tokens=False, return_offsets_mapping=True)
    out, seqs = [], []
    for p_ids, c_ids, offsets in zip(prompts, comps["input_ids"], comps["offset_mapping"]):
        room = max(0, max_length - len(p_ids))
        out.append({"offsets": [tuple(o) for o in offsets[:room]], "logps": [],
                    "truncated": len(c_ids) > room})
        seqs.append((p_ids + c_ids[:room], len(p_ids)))
    scored = (score_ids(seqs) if score_ids is not None
              else score_token_ids(model, seqs, tokens_per_row, chunk))
    for entry, logps in zip(out, scored):
        entry["logps"] = logps
    return out


def score_traces(model, tokenizer, messages: list[list[dict]], traces: list[str],
                 fmt: TargetFormat, max_length: int, tokens_per_row: int,
                 chunk: int = 1024, score_ids=None) -> list[dict]:
    """score_completions of each trace in this model's own form after its own prompt (what it
    would generate: stages/lib/chat.py, target_texts), with the offsets mapped back onto `traces`.

    Teacher and student thus score the same trace, each as it would write it: a student whose
    prompt opens `<think>` is not asked to predict an opening tag it never writes. A token of
    the reasoning or the answer gets its characters in the trace; a tag the trace has too
    (`</think>`) gets the trace's tag; anything else (a tag the trace lacks, the stop token) the
    empty range at the edge of the part before it (no sentence contains it; the completion mean
    counts it). score_ids: as score_completions'.
    """
    prompts, targets, spans = [], [], []
    for m, trace in zip(messages, traces):
        prompt, target, parts = target_texts(tokenizer, m, trace, fmt)
        prompts.append(prompt)
        targets.append(target)
        spans.append(parts)
    scored = score_completions(model, tokenizer, prompts, targets, max_length, tokens_per_row,
                               chunk, score_ids)
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
