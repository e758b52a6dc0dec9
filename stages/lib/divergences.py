"""Divergences between a teacher and a student next-token distribution, for logit distillation
from stored teacher top-k (kd) and on-policy distillation (opd). Pure torch; every result is
computed in fp32 whatever the input dtype.

Top-k support with a tail bucket. The teacher was stored as its k largest log-probs per position
(ids + log-probs, temperature 1). Both distributions are compared on the support
S = (the k ids, one tail bucket):

    p = (p_1 .. p_k, p_tail),  p_tail = 1 - sum_i p_i
    q = (q_1 .. q_k, q_tail),  q_i = exp(student_logps[id_i]),  q_tail = 1 - sum_i q_i

Both tails are floored at TAIL_EPS so that log p_tail and log q_tail are finite (reverse KL
needs log p_tail where the teacher's k ids hold all its mass); a bucket at the floor on both
sides (k = V) is empty and is dropped from the support. An id of -1 marks a dropped entry: it is
in neither distribution. The student side is gathered from its full-vocabulary log-softmax, so
q_tail is the student's real mass outside the k ids and gradients reach every vocabulary entry
through it.

    divergence(name, student_logps [N, V], teacher_ids [N, k], teacher_logps [N, k],
               *, beta=0.5, alpha=0.1, t=None) -> [N] loss per position

On-policy, sampled tokens only (Thinking Machines' on-policy distillation):

    sampled_rkl_advantages(student_logps, teacher_logps) -> A = -(log pi_S - log pi_T)
    sampled_rkl_loss(new_logps, old_logps, teacher_logps, mask) -> scalar

TaidSchedule: the adaptive interpolation parameter t of TAID (SakanaAI/TAID), updated per step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # torch is imported where it runs: `import stages` (the CLI) stays light
    import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "taid")

# Floor of both tail buckets. fp32 sums of k probabilities near 1 carry ~1e-7 of rounding, so a
# tail below ~1e-6 is noise; the floor keeps log(tail) finite and its gradient bounded.
TAIL_EPS = 1e-6


class TopkSupport(NamedTuple):
    """Teacher and student log-probs on the support (k ids + tail bucket), fp32, [N, k + 1].

    `lp` (teacher) carries no gradient; `lq` (student) does. `valid` is False at dropped ids;
    there `lp` and `lq` hold 0 (finite, so masked terms never turn a gradient into NaN).
    """
    lp: torch.Tensor
    lq: torch.Tensor
    valid: torch.Tensor


def topk_support(student_logps: torch.Tensor, teacher_ids: torch.Tensor,
                 teacher_logps: torch.Tensor) -> TopkSupport:
    """Build p and q over S = (teacher's k ids, tail bucket).

    student_logps [N, V]: log-softmax of the student's logits for N positions.
    teacher_ids [N, k] int32/int64: the teacher's top-k ids; -1 marks a dropped entry.
    teacher_logps [N, k]: teacher log-probs of those ids (temperature 1).

        p_i = exp(teacher_logps_i),        log p_tail = log1p(-min(sum_i p_i, 1 - TAIL_EPS))
        q_i = exp(student_logps[id_i]),    log q_tail = log1p(-min(sum_i q_i, 1 - TAIL_EPS))

    The sums run over valid entries only. The min() clamp floors each tail at TAIL_EPS and
    passes no gradient where it binds. Where both tails sit at the floor (k = V, or the k ids
    hold all the mass of both) the bucket is empty and leaves the support; every divergence then
    equals its dense value over the k ids.
    """
    import torch

    valid = teacher_ids >= 0
    ids = teacher_ids.clamp(min=0).long()
    zero = torch.zeros((), dtype=torch.float32, device=student_logps.device)
    lq_k = torch.where(valid, student_logps.gather(-1, ids).float(), zero)
    lp_k = torch.where(valid, teacher_logps.detach().float(), zero)
    q_sum = torch.where(valid, lq_k.exp(), zero).sum(-1)
    p_sum = torch.where(valid, lp_k.exp(), zero).sum(-1)
    lq_tail = torch.log1p(-q_sum.clamp(max=1.0 - TAIL_EPS))
    lp_tail = torch.log1p(-p_sum.clamp(max=1.0 - TAIL_EPS))
    # A tail at the floor in both distributions is empty: it leaves the support.
    tail_valid = (p_sum < 1.0 - TAIL_EPS) | (q_sum < 1.0 - TAIL_EPS)
    lq = torch.cat([lq_k, torch.where(tail_valid, lq_tail, zero).unsqueeze(-1)], dim=-1)
    lp = torch.cat([lp_k, torch.where(tail_valid, lp_tail, zero).unsqueeze(-1)], dim=-1)
    return TopkSupport(lp, lq, torch.cat([valid, tail_valid.unsqueeze(-1)], dim=-1))


def _kl(la: torch.Tensor, lb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_i a_i (log a_i - log b_i) over the valid support entries, [N]."""
    import torch

    terms = la.exp() * (la - lb)
    return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) from log a and log b, exact at w = 0 (log b) and w = 1 (log a)."""
    import torch

    if w <= 0.0:
        return lb
    if w >= 1.0:
        return la
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def forward_kl(s: TopkSupport) -> torch.Tensor:
    """Forward KL(p || q) = sum_S p (log p - log q), [N]."""
    return _kl(s.lp, s.lq, s.valid)


def reverse_kl(s: TopkSupport) -> torch.Tensor:
    """Reverse KL(q || p) = sum_S q (log q - log p), [N]."""
    return _kl(s.lq, s.lp, s.valid)


def jsd(s: TopkSupport, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence as TRL's GKD defines it, [N]:

        M = beta p + (1 - beta) q,   JSD_beta = beta KL(p || M) + (1 - beta) KL(q || M)

    At beta = 0 it returns forward KL(p || q) and at beta = 1 reverse KL(q || p), as TRL does
    (the formula itself tends to 0 at both ends; TRL special-cases them).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(s)
    if beta == 1.0:
        return reverse_kl(s)
    lm = _log_mix(s.lp, s.lq, beta)
    return beta * _kl(s.lp, lm, s.valid) + (1.0 - beta) * _kl(s.lq, lm, s.valid)


def skew_kl(s: TopkSupport, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(p || alpha p + (1 - alpha) q), [N]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    return _kl(s.lp, _log_mix(s.lp, s.lq, alpha), s.valid)


def skew_rkl(s: TopkSupport, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q || (1 - alpha) p + alpha q), [N]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    return _kl(s.lq, _log_mix(s.lq, s.lp, alpha), s.valid)


def taid(s: TopkSupport, t: float | torch.Tensor) -> torch.Tensor:
    """TAID (SakanaAI/TAID): forward KL(p_t || q) to the interpolated target, [N]:

        p_t = softmax((1 - t) sg(z_S) + t z_T)

    On the top-k support, log-probs stand in for logits: log-softmax differs from the logits by
    a per-position constant c, and softmax((1 - t)(z_S - c_S) + t (z_T - c_T)) equals
    softmax((1 - t) z_S + t z_T) because the constant (1 - t) c_S + t c_T cancels. So

        p_t,i = exp((1 - t) sg(log q_i) + t log p_i) / sum_j exp(...)   over S incl. the tail

    p_t carries no gradient (student side stop-gradient, teacher detached). SakanaAI's code
    returns the cross-entropy -sum p_t log q = KL(p_t || q) + H(p_t); the gradient in q is the
    same, the value differs by H(p_t).
    """
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach().float()
    elif t is None or not 0.0 <= t <= 1.0:
        raise ValueError(f"taid needs t in [0, 1], got {t}")
    z = (1.0 - t) * s.lq.detach() + t * s.lp
    z = z.masked_fill(~s.valid, float("-inf"))
    lpt = torch.where(s.valid, torch.log_softmax(z, dim=-1), torch.zeros_like(z))
    return _kl(lpt, s.lq, s.valid)


def divergence(name: str, student_logps: torch.Tensor, teacher_ids: torch.Tensor,
               teacher_logps: torch.Tensor, *, beta: float = 0.5, alpha: float = 0.1,
               t: float | torch.Tensor | None = None) -> torch.Tensor:
    """Per-position loss [N] of divergence `name` (one of DIVERGENCES) on the top-k support.

    `beta` is jsd's mixture weight, `alpha` skew_kl/skew_rkl's, `t` taid's interpolation
    (TaidSchedule.t; required for taid). The caller sums or weights the positions.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; one of {', '.join(DIVERGENCES)}")
    s = topk_support(student_logps, teacher_ids, teacher_logps)
    if name == "forward_kl":
        return forward_kl(s)
    if name == "reverse_kl":
        return reverse_kl(s)
    if name == "jsd":
        return jsd(s, beta)
    if name == "skew_kl":
        return skew_kl(s, alpha)
    if name == "skew_rkl":
        return skew_rkl(s, alpha)
    return taid(s, t)


@dataclasses.dataclass
class TaidSchedule:
    """TAID's adaptive t (SakanaAI/TAID `update_t`), one update per optimizer step:

        delta  = (J_prev - J) / (J_prev + 1e-15)           relative loss decrease
        m      = beta m + (1 - beta) delta                 momentum, beta = 0.99
        t_lin  = t_start + (t_end - t_start) step / total_steps
        t      = min(t_end, max(t_lin, t + alpha sigmoid(m) (1 - t)))

    The first update (J_prev unset) only stores J. t starts at t_start and never decreases.
    `state_dict()` / `load_state_dict()` carry (t, m, prev_loss) across a resume.
    """
    total_steps: int
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    t: float = dataclasses.field(init=False)
    m: float = dataclasses.field(init=False, default=0.0)
    prev_loss: float | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_start < 1.0:
            raise ValueError(f"TAID t_start must be in [0, 1), got {self.t_start}")
        if not 0.0 < self.t_end <= 1.0:
            raise ValueError(f"TAID t_end must be in (0, 1], got {self.t_end}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"TAID alpha must be in [0, 1], got {self.alpha}")
        if self.total_steps <= 0:
            raise ValueError(f"TAID total_steps must be positive, got {self.total_steps}")
        self.t = self.t_start

    def update(self, step: int, loss: float | torch.Tensor) -> float:
        """Fold in the loss J of `step` (the optimizer steps done so far) and return the new t."""
        loss = float(loss)
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.m = self.beta * self.m + (1.0 - self.beta) * delta
        t_lin = self.t_start + (self.t_end - self.t_start) * step / self.total_steps
        sig = 1.0 / (1.0 + math.exp(-self.m))
        self.t = min(self.t_end, max(t_lin, self.t + self.alpha * sig * (1.0 - self.t)))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "m": self.m, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.t = float(state["t"])
        self.m = float(state["m"])
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else float(prev)


def sampled_rkl_advantages(student_logps: torch.Tensor,
                           teacher_logps: torch.Tensor) -> torch.Tensor:
    """Per-token advantage of on-policy distillation (tinker-cookbook), detached, fp32:

        A_t = -(log pi_S(y_t) - log pi_T(y_t))

    on the student's own sampled tokens y_t; no discount, no baseline. -A_t is the one-sample
    estimate of the reverse KL at position t.
    """
    return -(student_logps.detach().float() - teacher_logps.detach().float())


def sampled_rkl_loss(new_logps: torch.Tensor, old_logps: torch.Tensor,
                     teacher_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Importance-sampling policy-gradient loss of on-policy distillation (tinker-cookbook's
    loss_fn "importance_sampling"), a scalar:

        ratio_t = exp(new_t - sg(old_t)),   A_t = sampled_rkl_advantages(old_t, teacher_t)
        loss    = -sum_t mask_t ratio_t A_t / sum_t mask_t

    new: the current policy's log-probs of the sampled tokens (with gradient); old: the
    sampling policy's; teacher: the teacher's log-probs of the same tokens. Masked positions
    contribute nothing, whatever values they hold. At new = old (ratio 1) the gradient is

        sum_t mask_t (log pi_S(y_t) - log pi_T(y_t)) grad log pi_S(y_t) / sum_t mask_t,

    the score-function (REINFORCE) gradient of the sampled reverse-KL estimate
    E_{y ~ pi_S} [log pi_S(y) - log pi_T(y)] (its other term, E[grad log pi_S], has mean 0).
    """
    import torch

    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=new_logps.device)
    adv = torch.where(keep, sampled_rkl_advantages(old_logps, teacher_logps), zero)
    log_ratio = torch.where(keep, new_logps.float() - old_logps.detach().float(), zero)
    terms = torch.where(keep, log_ratio.exp() * adv, zero)
    return -terms.sum() / keep.sum().clamp(min=1).float()
