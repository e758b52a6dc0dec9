"""The LM head and a top-k divergence a chunk of positions at a time: per-position losses
(1 - kd_ratio) CE + kd_ratio D with gradients, without the full-vocabulary logits of a packed
row. kd trains with it (stages/kd.py, kd_ratio from its config) and so does opd's loss topk
(stages/opd.py, kd_ratio 1: the divergence alone, weighted by opd's mask).

    kd_token_losses(model, batch, KdLoss(divergence, kd_ratio, ...), chunk=CHUNK)
      -> (loss [K], CE [K], D [K]) at the K completion positions of a packed row; `batch` is
         stages/lib/packed.py collate's row plus the teacher's `topk_ids` / `topk_logps` [K, k]

When the model's forward calls its LM head with the K completion positions, the head computes
the loss terms `CHUNK` positions at a time, each chunk under torch.utils.checkpoint (backward
recomputes that chunk's logits). The head module is still *called* by the model's forward, so
DeepSpeed ZeRO-3's hooks gather its weight around the call and again before its backward
(stages/lib/lm_head.py's docstring says why that suffices). D is one of
stages/lib/divergences.py's DIVERGENCES on the teacher's top-k support plus a tail bucket.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from stages.lib.divergences import divergence
from stages.lib.lm_head import module_forward, unchunked_reason

log = logging.getLogger(__name__)

# Positions per LM-head chunk: 1,024 x 151,936 (Qwen2.5) x 4 B = 0.62 GB of fp32 logits, and the
# log-softmax beside it another 0.62 GB, whatever the packed row's length.
CHUNK = 1024


@dataclass(frozen=True)
class KdLoss:
    """What one position's loss is: (1 - kd_ratio) CE + kd_ratio D, D = `divergence` with its
    beta (jsd), alpha (skew_*) and t (taid)."""
    divergence: str
    kd_ratio: float
    beta: float = 0.5
    alpha: float = 0.1
    t: float | None = None


def token_terms(logits, targets, teacher_ids, teacher_logps, spec: KdLoss):
    """(loss [n], CE [n], D [n]) of n positions from their logits [n, V], in fp32. The loss
    carries the gradient; D is detached (it is logged); CE keeps its gradient, for a loss that
    also needs the token log-probs -CE (opd's REDI term; kd only logs it)."""
    import torch

    logps = torch.log_softmax(logits.float(), dim=-1)
    ce = -logps.gather(1, targets[:, None].long())[:, 0]
    d = divergence(spec.divergence, logps, teacher_ids, teacher_logps,
                   beta=spec.beta, alpha=spec.alpha, t=spec.t)
    return (1.0 - spec.kd_ratio) * ce + spec.kd_ratio * d, ce, d.detach()


@contextlib.contextmanager
def _head_returns_losses(head, batch, spec: KdLoss, chunk: int, produced: list):
    """Within the block, calling `head` on the [..., K, H] hidden states of the K completion
    positions returns their [..., K] losses (token_terms), `chunk` positions at a time; each
    call's (losses, CE, D) go into `produced`."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    targets, ids, lps = batch["targets"], batch["topk_ids"], batch["topk_logps"]

    def chunk_terms(h, weight, bias, t, i, lp):
        return token_terms(F.linear(h, weight, bias), t, i, lp, spec)

    def forward(x, *args, **kwargs):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != targets.shape[0]:
            raise ValueError(f"LM head got {flat.shape[0]} positions for {targets.shape[0]} "
                             "targets: run the model with logits_to_keep = the target positions")
        grad = torch.is_grad_enabled()
        parts = []
        for a in range(0, flat.shape[0], chunk):
            args = (flat[a:a + chunk], head.weight, head.bias, targets[a:a + chunk],
                    ids[a:a + chunk], lps[a:a + chunk])
            # backward recomputes the chunk's [chunk, V] logits instead of keeping them
            parts.append(checkpoint(chunk_terms, *args, use_reentrant=False) if grad
                         else chunk_terms(*args))
        losses, ce, d = (torch.cat(p) for p in zip(*parts))
        out = losses.view(x.shape[:-1])
        produced.append((out, ce, d))
        return out

    with module_forward(head, forward):
        yield


def kd_token_losses(model, batch, spec: KdLoss, chunk: int = CHUNK):
    """(loss [K], CE [K], D [K]) at the K completion positions of a packed row (collate's batch
    plus the teacher's topk_ids / topk_logps), the LM head `chunk` positions at a time; chunk=0
    or a head that is more than one linear layer (lm_head.unchunked_reason) computes the full
    [K, V] logits at once (a warning for the latter)."""
    import torch

    def forward():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                     max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"],
                     logits_to_keep=batch["keep"], use_cache=False)

    reason = unchunked_reason(model, torch.is_grad_enabled()) if chunk else None
    if chunk and reason is None:
        produced: list = []
        with _head_returns_losses(model.get_output_embeddings(), batch, spec, chunk, produced):
            out = forward()
        if len(produced) == 1 and out.logits is produced[0][0]:
            losses, ce, d = produced[0]
            return losses.reshape(-1), ce, d
        reason = "the model transforms its LM head's output (its logits are not the head's)"
        del out, produced
    if reason:
        log.warning("top-k loss: %s; computing the full-vocabulary logits of every completion "
                    "position at once (K x vocab x 4 B per copy)", reason)
    logits = forward().logits
    return token_terms(logits.reshape(-1, logits.shape[-1]), batch["targets"],
                       batch["topk_ids"], batch["topk_logps"], spec)
