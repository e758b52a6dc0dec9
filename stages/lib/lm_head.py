"""The LM head a chunk of positions at a time: per-token target log-probs, with gradients, without
ever holding the full-vocabulary logits of a packed row.

Why: a packed row of K completion tokens has [K, vocab] logits. At Qwen2.5's 151,936-row
vocabulary one fp32 copy is K x 151,936 x 4 B = 0.61 MB a token: 5.0 GB at K = 8,192, 19.9 GB
at 32,768, and the unchunked loss holds about three copies at once (logits, softmax, gradient;
docs/performance.md measures it). Here the head runs on `chunk` positions at a time (1,024:
0.62 GB of fp32 logits per chunk), forward and backward, whatever K is.

    completion_logps(model, forward, targets, chunk) -> [K] log-probs of `targets`
      `forward()` runs the model with logits_to_keep = the K positions (stages/packed.py)

How: for the duration of `forward()` the model's own LM-head module returns, instead of logits,
the log-probs of the targets of the positions it is given (`HeadLogps`, a custom autograd
function that keeps only [K] log-sum-exps and recomputes each chunk's logits in backward). The
model's forward, and everything wrapped around it, runs exactly as before:

- ZeRO-3: DeepSpeed partitions every parameter and gathers a module's weights in hooks on that
  module's call (pre-forward: all-gather; a hook on its outputs all-gathers again before their
  backward; a hook on its inputs releases after it). The head module is still *called* by the
  model's forward, so those hooks gather its weight around our forward and around our backward,
  as they do for a plain nn.Linear, and the weight's gradient (full shape, returned from our
  backward) goes to ZeRO's reduce-scatter like any other. Tied embeddings: the head's weight is
  the embedding's parameter, gathered by whichever module runs. tests/test_lm_head.py checks
  loss and gradients under ZeRO-2 and ZeRO-3 on 2 gloo ranks against the unchunked computation.
- A model that does anything to the logits after its head (Gemma-2's final-logit soft-capping,
  Cohere's logit_scale, Granite's logits_scaling) is not covered: the config keys are checked
  first, and any other post-processing shows as a model output that is not the tensor our head
  returned. Both fall back to the unchunked computation, with a warning (once per reason).
  Scaling the head's *input* (MiniCPM) is covered: the head sees the scaled hidden states.
- Without gradients (scoring) the head's own forward runs on each chunk, so a replaced head
  module (stages/packed.py onednn_linears) keeps its speed.
"""
from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024  # positions per LM-head call: 1,024 x 151,936 x 4 B = 0.62 GB fp32 logits

# Config keys (the text config's) whose models change the logits after the head's matmul.
POST_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                  "lm_head_multiplier")

_warned: set[str] = set()
_post_processing: set[type] = set()  # model classes seen to transform the head's output


def unchunked_reason(model, grad: bool) -> str | None:
    """Why `model`'s head cannot run chunked (None when it can)."""
    import torch

    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for key in POST_HEAD_KEYS:
            if getattr(text, key, None) not in (None, 1, 1.0):
                return f"{type(model).__name__} has {key}={getattr(text, key)!r}"
    if _model_class(model) in _post_processing:
        return f"{_model_class(model).__name__} transforms the LM head's output"
    head = model.get_output_embeddings()
    if head is None:
        return f"{type(model).__name__} has no output embeddings"
    if grad and not isinstance(head, torch.nn.Linear):
        return f"its LM head is a {type(head).__name__}, not one nn.Linear"
    return None


def _model_class(model) -> type:
    return type(getattr(model, "module", model))  # a DeepSpeed engine wraps the model


def _warn(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("LM head: %s; computing the full-vocabulary logits of every completion "
                    "position at once (memory grows with the row: K x vocab x 4 B per copy)",
                    reason)


def chunk_logps(project, hidden, targets, chunk: int):
    """(log-probs [K], log-sum-exps [K]) of `targets` under `project(hidden[a:b])` logits, one
    chunk of positions at a time, in fp32 (bf16 logits lose ~2 digits of a log-prob). The one
    chunk loop: scoring calls it with the head module, HeadLogps with F.linear."""
    import torch

    n = hidden.shape[0]
    logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for a in range(0, n, chunk):
        z = project(hidden[a:a + chunk]).float()                          # [chunk, vocab]
        picked = z.gather(1, targets[a:a + chunk, None])[:, 0]
        # log-sum-exp in place: torch.logsumexp would allocate a second [chunk, vocab] buffer
        top = z.amax(dim=-1)
        lse[a:a + chunk] = z.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
        logps[a:a + chunk] = picked - lse[a:a + chunk]
        del z
    return logps, lse


class HeadLogps:
    """torch.autograd.Function: log-probs [K] of `targets` under logits = hidden @ weight.T + bias.

    Forward keeps hidden [K, H] (the model keeps it anyway) and the [K] log-sum-exps. Backward,
    per chunk: recompute the logits z, p = exp(z - lse) in place, then with g the incoming
    gradient, dL/dz = g * (onehot(target) - p), again in place; dL/dhidden = dz @ W and
    dL/dW += dz.T @ hidden (accumulated in fp32 over the chunks; a bf16 model gets it cast
    back). Cost: one more [K, H] x [H, vocab] matmul than autograd's (the recomputed logits:
    4 instead of 3), for peak logits memory of one chunk.
    """

    _fn = None

    @classmethod
    def apply(cls, hidden, weight, bias, targets, chunk: int):
        if cls._fn is None:
            cls._fn = _build_function()
        return cls._fn.apply(hidden, weight, bias, targets, chunk)


def _build_function():
    import torch
    import torch.nn.functional as F

    class _HeadLogps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, chunk):
            logps, lse = chunk_logps(lambda h: F.linear(h, weight, bias), hidden, targets, chunk)
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.chunk = chunk
            return logps

        @staticmethod
        def backward(ctx, grad):
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
                if need_b and bias is not None else None
            grad = grad.float()
            for a in range(0, hidden.shape[0], ctx.chunk):
                h, g, t = hidden[a:a + ctx.chunk], grad[a:a + ctx.chunk], targets[a:a + ctx.chunk]
                z = F.linear(h, weight, bias).float()                      # [chunk, vocab]
                z.sub_(lse[a:a + ctx.chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax
                z[torch.arange(len(t), device=z.device), t] += g           # + g * onehot
                if grad_b is not None:
                    grad_b += z.sum(0)
                dz = z.to(weight.dtype)
                if grad_h is not None:
                    torch.mm(dz, weight, out=grad_h[a:a + ctx.chunk])
                if grad_w is not None:
                    if dz.dtype == torch.float32:
                        grad_w.addmm_(dz.t(), h)
                    else:
                        grad_w += (dz.t() @ h).float()
            return (grad_h,
                    None if grad_w is None else grad_w.to(weight.dtype),
                    None if grad_b is None else grad_b.to(bias.dtype),
                    None, None)

    return _HeadLogps


@contextlib.contextmanager
def _head_returns_logps(head, targets, chunk: int, produced: list):
    """Within the block, calling `head` on [..., K, H] returns the [..., K] log-probs of
    `targets`; the tensors it returned go into `produced`."""
    import torch

    own = head.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook)
    original = head.forward

    def forward(x, *args, **kwargs):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != targets.shape[0]:
            raise ValueError(f"LM head got {flat.shape[0]} positions for {targets.shape[0]} "
                             "targets: run the model with logits_to_keep = the target positions")
        if torch.is_grad_enabled() and (flat.requires_grad or head.weight.requires_grad):
            out = HeadLogps.apply(flat, head.weight, head.bias, targets, chunk)
        else:
            out = chunk_logps(original, flat, targets, chunk)[0]
        out = out.view(x.shape[:-1])
        produced.append(out)
        return out

    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def completion_logps(model, forward, targets, chunk: int = DEFAULT_CHUNK):
    """Log-probs [K] of `targets` (with gradients when grad mode is on): `forward()` runs `model`
    (a transformers causal LM, or a DeepSpeed engine around one) with logits_to_keep = the K
    positions that predict them. The LM head runs `chunk` positions at a time; a model whose
    logits are more than one linear layer's output gets the unchunked computation (a warning),
    and so does chunk=0 (silently: the reference the tests and the benchmark compare with)."""
    import torch
    import torch.nn.functional as F

    reason = unchunked_reason(model, torch.is_grad_enabled()) if chunk else None
    if chunk and reason is None:
        produced: list = []
        with _head_returns_logps(model.get_output_embeddings(), targets, chunk, produced):
            out = forward()
        if len(produced) == 1 and out.logits is produced[0]:
            return out.logits.reshape(-1)
        _post_processing.add(_model_class(model))
        reason = (f"{_model_class(model).__name__} transforms the LM head's output "
                  "(its logits are not the head's)")
        del out, produced
    if reason:
        _warn(reason)
    out = forward()
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    return -F.cross_entropy(logits.float(), targets, reduction="none")
