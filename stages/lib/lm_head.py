"""The LM head a chunk of positions at a time: per-token target log-probs, with gradients, without
ever holding the full-vocabulary logits of a packed row.

Why: a packed row of K completion tokens has [K, vocab] logits. At Qwen2.5's 151,936-row
vocabulary one fp32 copy is K x 151,936 x 4 B = 0.61 MB a token: 5.0 GB at K = 8,192, 19.9 GB
at 32,768, and the unchunked loss holds about three copies at once (logits, softmax, gradient;
docs/performance.md measures it). Here the head runs on `chunk` positions at a time (1,024:
0.62 GB of fp32 logits per chunk), forward and backward, whatever K is.

    completion_logps(model, forward, targets, chunk, weights=None) -> [K] log-probs of `targets`
      `forward()` runs the model with logits_to_keep = the K positions (stages/lib/packed.py);
      `weights`: a loss linear in the log-probs (sft, redi) passes d(loss)/d(logps) up to a scale

How: for the duration of `forward()` the model's own LM-head module returns, instead of logits,
the log-probs of the targets of the positions it is given (`HeadLogps`, a custom autograd
function). Given `weights`, each chunk's logits give, in the forward, both the log-probs and the
head's share of the gradients (3 head matmuls, as unchunked); backward scales them. Without, it
keeps only [K] log-sum-exps and recomputes each chunk's logits in backward (4 matmuls), for any
use of the log-probs. The model's forward, and everything wrapped around it, runs as before:

- ZeRO-3: DeepSpeed partitions every parameter and gathers a module's weights in hooks on that
  module's call (pre-forward: all-gather; a hook on its outputs all-gathers again before their
  backward; a hook on its inputs releases after it). The head module is still *called* by the
  model's forward, so those hooks gather its weight around our forward and around our backward,
  as they do for a plain nn.Linear, and the weight's gradient (full shape, returned from our
  backward) goes to ZeRO's reduce-scatter like any other. The fused path takes that gradient
  while the forward's gather holds the weight and keeps it (vocab x H in the weight's dtype:
  151,936 x 1,536 x 2 B = 0.47 GB for the 1.5B student's bf16 head) until backward returns
  it. Tied embeddings: the head's weight is the embedding's parameter, gathered by whichever
  module runs. tests/test_lm_head.py checks loss and gradients, both paths, under ZeRO-2 and
  ZeRO-3 on 2 gloo ranks against the unchunked computation.
- A model that does anything to the logits after its head (Gemma-2's final-logit soft-capping,
  Cohere's logit_scale, Granite's logits_scaling) is not covered: the config keys are checked
  first, and any other post-processing shows as a model output that is not the tensor our head
  returned. Both fall back to the unchunked computation, with a warning (once per reason).
  Scaling the head's *input* (MiniCPM) is covered: the head sees the scaled hidden states.
- Without gradients (scoring) the head's own forward runs on each chunk, so a replaced head
  module (stages/lib/packed.py onednn_linears) keeps its speed.
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

    Two ways to get the gradients, the same log-probs forward:

    - `weights` None (recompute): forward keeps hidden [K, H] (the model keeps it anyway) and the
      [K] log-sum-exps. Backward, per chunk: recompute the logits z, p = exp(z - lse) in place,
      then with g the incoming gradient, dL/dz = g * (onehot(target) - p), again in place;
      dL/dhidden = dz @ W and dL/dW += dz.T @ hidden (accumulated in fp32 over the chunks; a bf16
      model gets it cast back). Any downstream use of the log-probs. Cost: 4 [K, H] x [H, vocab]
      matmuls where autograd's unchunked head does 3 (the logits are computed twice).
    - `weights` [K] given (fused): the caller promises that the gradient its loss sends to the
      log-probs is c * weights for one scalar c (true of any loss linear in the log-probs: SFT's
      token mean, REDI's per-sample means; c absorbs the trainer's loss scaling and gradient
      accumulation). Forward then takes d(sum weights * logps) for hidden, W and bias in the same
      chunk loop that computes the log-probs — 3 matmuls, as unchunked — and backward only
      scales them by c. It keeps dL/dhidden [K, H] and dL/dW [vocab, H] (in the weight's dtype)
      from forward to backward. Backward checks the promise (|g - c w| <= 1e-5 max |g|, O(K));
      a gradient that breaks it is computed the recompute way instead, so the result is right
      whatever the caller does with the log-probs, only slower (6 matmuls).
    """

    _fn = None

    @classmethod
    def apply(cls, hidden, weight, bias, targets, chunk: int, weights=None):
        if cls._fn is None:
            cls._fn = _build_function()
        return cls._fn.apply(hidden, weight, bias, targets, chunk, weights)


PROPORTIONAL_TOL = 1e-5  # |g - c w| / max |g|: fp32 rounding of the loss's own arithmetic is ~1e-7


def _grad_scale(grad, weights):
    """c with grad == c * weights (to PROPORTIONAL_TOL), or None when there is none."""
    import torch

    if grad.numel() == 0:  # no targets here (a sequence-parallel slice of prompt tokens only)
        return 0.0
    top = grad.abs().max()
    if top == 0:
        return 0.0
    ww = torch.dot(weights, weights)
    if ww == 0:
        return None
    c = torch.dot(grad, weights) / ww
    if (grad - c * weights).abs().max() > PROPORTIONAL_TOL * top:
        return None
    return c.item()


def _build_function():
    import torch
    import torch.nn.functional as F

    def head_grads(hidden, weight, bias, targets, g, chunk, need, probs_of):
        """(dL/dhidden, dL/dW fp32, dL/dbias fp32) for dL/dlogps = g, chunk by chunk;
        probs_of(a) gives the softmax of chunk a's logits in fp32, a buffer of its own."""
        need_h, need_w, need_b = need
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if need_b and bias is not None else None
        for a in range(0, hidden.shape[0], chunk):
            h, gc, t = hidden[a:a + chunk], g[a:a + chunk], targets[a:a + chunk]
            z = probs_of(a).mul_(-gc[:, None])                              # -g * softmax
            z[torch.arange(len(t), device=z.device), t] += gc              # + g * onehot
            if grad_b is not None:
                grad_b += z.sum(0)
            dz = z.to(weight.dtype)
            if grad_h is not None:
                torch.mm(dz, weight, out=grad_h[a:a + chunk])
            if grad_w is not None:
                if dz.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), h)
                else:
                    grad_w += (dz.t() @ h).float()
            del z, dz
        return grad_h, grad_w, grad_b

    def recomputed_probs(hidden, weight, bias, lse, chunk):
        def probs_of(a):
            z = F.linear(hidden[a:a + chunk], weight, bias).float()         # [chunk, vocab]
            return z.sub_(lse[a:a + chunk, None]).exp_()
        return probs_of

    class _HeadLogps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, chunk, weights):
            need = tuple(ctx.needs_input_grad[:3])
            ctx.chunk, ctx.fused = chunk, None
            if weights is None:
                logps, lse = chunk_logps(lambda h: F.linear(h, weight, bias), hidden, targets,
                                         chunk)
            else:
                # One pass: each chunk's logits give its log-probs and, with the weights as the
                # incoming gradient, its share of the three gradients, before the next chunk.
                n = hidden.shape[0]
                logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
                lse = torch.empty(n, dtype=torch.float32, device=hidden.device)

                def probs_of(a):  # the log-probs of chunk a on the way to its softmax
                    z = F.linear(hidden[a:a + chunk], weight, bias).float()  # [chunk, vocab]
                    picked = z.gather(1, targets[a:a + chunk, None])[:, 0]
                    top = z.amax(dim=-1)
                    total = z.sub_(top[:, None]).exp_().sum(dim=-1)
                    lse[a:a + chunk] = total.log() + top
                    logps[a:a + chunk] = picked - lse[a:a + chunk]
                    return z.div_(total[:, None])

                w = weights.to(torch.float32)
                gh, gw, gb = head_grads(hidden, weight, bias, targets, w, chunk, need, probs_of)
                ctx.fused = (w, gh, None if gw is None else gw.to(weight.dtype),
                             None if gb is None else gb.to(bias.dtype))
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            return logps

        @staticmethod
        def backward(ctx, grad):
            grad = grad.float()
            if ctx.fused is not None:
                w, gh, gw, gb = ctx.fused
                c = _grad_scale(grad, w)
                if c is not None:
                    return (*(None if x is None else (x if c == 1 else x * c)
                              for x in (gh, gw, gb)), None, None, None)
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            gh, gw, gb = head_grads(hidden, weight, bias, targets, grad, ctx.chunk,
                                    ctx.needs_input_grad[:3],
                                    recomputed_probs(hidden, weight, bias, lse, ctx.chunk))
            return (gh, None if gw is None else gw.to(weight.dtype),
                    None if gb is None else gb.to(bias.dtype), None, None, None)

    return _HeadLogps


@contextlib.contextmanager
def _head_returns_logps(head, targets, chunk: int, produced: list, weights=None):
    """Within the block, calling `head` on [..., K, H] returns the [..., K] log-probs of
    `targets` (HeadLogps, fused when `weights` are given); the tensors it returned go into
    `produced`."""
    import torch

    original = head.forward

    def forward(x, *args, **kwargs):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != targets.shape[0]:
            raise ValueError(f"LM head got {flat.shape[0]} positions for {targets.shape[0]} "
                             "targets: run the model with logits_to_keep = the target positions")
        if torch.is_grad_enabled() and (flat.requires_grad or head.weight.requires_grad):
            out = HeadLogps.apply(flat, head.weight, head.bias, targets, chunk, weights)
        else:
            out = chunk_logps(original, flat, targets, chunk)[0]
        out = out.view(x.shape[:-1])
        produced.append(out)
        return out

    with module_forward(head, forward):
        yield


@contextlib.contextmanager
def module_forward(module, forward):
    """Within the block, `module` runs `forward` instead of its own. The model's forward still
    *calls* the module, so every hook on it runs as before (ZeRO-3 gathers its weight around the
    call and before its backward); an instance-level forward it already had (an accelerate hook)
    comes back afterwards."""
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _same_tensor(logits, ours) -> bool:
    """The model returned our head's output: that tensor, or an alias of it (same storage, shape
    and dtype). ZeRO-3's post-forward hook hands a module's outputs on through an autograd
    function that returns `output.detach()` (to gather the weight again before their backward),
    so the model's logits are a new tensor object over our log-probs' storage. Any
    post-processing that is not in place (soft-capping, scaling) makes new storage."""
    return logits is ours or (logits.shape == ours.shape and logits.dtype == ours.dtype
                              and logits.data_ptr() == ours.data_ptr())


def completion_logps(model, forward, targets, chunk: int = DEFAULT_CHUNK, weights=None):
    """Log-probs [K] of `targets` (with gradients when grad mode is on): `forward()` runs `model`
    (a transformers causal LM, or a DeepSpeed engine around one) with logits_to_keep = the K
    positions that predict them. The LM head runs `chunk` positions at a time; a model whose
    logits are more than one linear layer's output gets the unchunked computation (a warning),
    and so does chunk=0 (silently: the reference the tests and the benchmark compare with).

    `weights` [K]: the loss's gradient with respect to the log-probs is proportional to them
    (a loss linear in the log-probs, e.g. SFT's -sum / n: all equal). The head's gradients are
    then taken in the forward's chunk loop (HeadLogps, fused: 3 head matmuls instead of 4);
    a loss that turns out not to match them still gets exact gradients, recomputed."""
    import torch
    import torch.nn.functional as F

    reason = unchunked_reason(model, torch.is_grad_enabled()) if chunk else None
    if chunk and reason is None:
        produced: list = []
        with _head_returns_logps(model.get_output_embeddings(), targets, chunk, produced,
                                 weights):
            out = forward()
        if len(produced) == 1 and _same_tensor(out.logits, produced[0]):
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
