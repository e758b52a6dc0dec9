"""The teacher's top-k next-token distribution at the completion positions of a packed row, the
LM head a chunk of positions at a time (stage `distributions`; an online teacher can call it too).

    teacher_topk(model, batch, k, vocab, chunk) -> {"ids" [K, k] int32, "logps" [K, k] fp32,
      "token_logp" [K], "tail" [K], "dropped" [K] int32, "padded_mass" [K]}

`batch` is a packed row on the model's device (stages/lib/packed.py packed_row, as tensors);
K = len(batch["keep"]), the positions that predict completion tokens. The model's forward runs
once with logits_to_keep = those K positions, but its LM head only hands back its input (the
[K, H] hidden states); the head then runs on `chunk` positions at a time, so [K, vocab] logits
never exist at once (1,024 x 152k vocab x 4 B = 0.62 GB of fp32 logits a chunk, where a
32k-position row would be 19.9 GB). A model that changes its logits after the head (Gemma-2's
soft-capping: stages/lib/lm_head.py unchunked_reason) gets its own full logits, with a warning.

Log-probs are raw: temperature 1, the full softmax over the first `vocab` ids (the student's
vocabulary). Ids >= vocab (a teacher's padded embedding rows: Qwen2.5-7B has 152,064 rows, the
1.5B 151,936) are left out of the softmax, which is the teacher's distribution renormalised over
the student's ids: top-k + tail then sum to 1 over what the student can predict. `dropped` counts,
per position, the entries the teacher's full-vocabulary top-k would have spent on such ids;
`padded_mass` is the probability the position put on them (both 0 without padded ids).
"""
from __future__ import annotations

import contextlib
import logging

from stages.lib.lm_head import module_forward, unchunked_reason
from stages.lib.packed import pack, packed_row

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _head_returns_input(head, captured: list):
    """Within the block, calling `head` returns its input unchanged (kept in `captured`)."""

    def forward(x, *args, **kwargs):
        captured.append(x)
        return x

    with module_forward(head, forward):
        yield


def _forward(model, batch, **kwargs):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                 max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"],
                 logits_to_keep=batch["keep"], use_cache=False, **kwargs)


def teacher_topk(model, batch, k: int, vocab: int, chunk: int = 1024) -> dict:
    """The top-k of the teacher's next-token distribution over ids < `vocab` at every completion
    position of the packed row `batch` (module docstring). No gradient."""
    import torch

    head = model.get_output_embeddings()
    reason = unchunked_reason(model, grad=False)
    with torch.no_grad():
        if reason is None:
            captured: list = []
            with _head_returns_input(head, captured):
                _forward(model, batch)
            hidden = captured[-1].reshape(-1, captured[-1].shape[-1])   # [K, H]
            project = head
        else:
            log.warning("distributions: %s; computing the full-vocabulary logits of every "
                        "completion position at once (K x vocab x 4 B)", reason)
            hidden = _forward(model, batch).logits.reshape(-1, model.config.vocab_size)
            project = None
        targets = batch["targets"]
        n = hidden.shape[0]
        out = {"ids": torch.empty(n, k, dtype=torch.int32, device=hidden.device),
               "logps": torch.empty(n, k, dtype=torch.float32, device=hidden.device),
               "token_logp": torch.empty(n, dtype=torch.float32, device=hidden.device),
               "tail": torch.empty(n, dtype=torch.float32, device=hidden.device),
               "dropped": torch.zeros(n, dtype=torch.int32, device=hidden.device),
               "padded_mass": torch.zeros(n, dtype=torch.float32, device=hidden.device)}
        for a in range(0, n, chunk):
            z = hidden[a:a + chunk]
            z = (project(z) if project is not None else z).float()     # [chunk, teacher vocab]
            if z.shape[1] > vocab:  # padded rows: what the full top-k would have spent on them
                full = z.topk(k, dim=-1).indices
                out["dropped"][a:a + chunk] = (full >= vocab).sum(dim=-1).to(torch.int32)
                pad_lse = torch.logsumexp(z[:, vocab:], dim=-1)
                out["padded_mass"][a:a + chunk] = (pad_lse - torch.logsumexp(z, dim=-1)).exp()
                z = z[:, :vocab]
            values, ids = z.topk(k, dim=-1)                               # descending
            picked = z.gather(1, targets[a:a + chunk, None])[:, 0]
            # log-sum-exp in place (values[:, 0] is the row max): one [chunk, vocab] buffer
            top = values[:, 0]
            lse = z.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
            logps = values - lse[:, None]
            out["ids"][a:a + chunk] = ids.to(torch.int32)
            out["logps"][a:a + chunk] = logps
            out["token_logp"][a:a + chunk] = picked - lse
            # 1 - sum of k probabilities: fp32 rounding can take it a few 1e-7 below 0
            out["tail"][a:a + chunk] = (1.0 - logps.exp().sum(dim=-1)).clamp_(min=0.0)
            del z
    return out


def packed_topk(model, seqs: list[tuple[list[int], int]], k: int, vocab: int,
                tokens_per_row: int, chunk: int = 1024) -> list[dict]:
    """[(token ids, prompt length)], each with at least one token after its prompt -> per
    sequence teacher_topk's arrays (numpy) for its n tokens after the prompt: "ids" [n, k],
    "logps" [n, k], "token_logp", "tail", "dropped", "padded_mass" [n]. Sequences are packed
    best-fit into rows of tokens_per_row tokens (at least the longest; no padding), each row one
    teacher_topk call."""
    import torch

    out: list[dict] = [{} for _ in seqs]
    capacity = max([tokens_per_row] + [len(ids) for ids, _ in seqs])
    device = next(model.parameters()).device
    for b in pack([len(ids) for ids, _ in seqs], capacity):
        row = packed_row([seqs[i] for i in b])
        batch = {key: torch.as_tensor(row[key], device=device)
                 for key in ("cu_seqlens", "keep", "targets")}
        batch["input_ids"] = torch.as_tensor(row["input_ids"], device=device)[None]
        batch["position_ids"] = torch.as_tensor(row["position_ids"], device=device)[None]
        batch["max_seqlen"] = row["max_seqlen"]
        got = {key: t.cpu().numpy() for key, t in teacher_topk(model, batch, k, vocab,
                                                                chunk).items()}
        at = 0
        for i in b:  # packed_row keeps the order of its samples
            m = len(seqs[i][0]) - seqs[i][1]
            out[i] = {key: a[at:at + m] for key, a in got.items()}
            at += m
    return out
