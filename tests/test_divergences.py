"""stages/lib/divergences.py against independent computations.

Every divergence with k = V (the top-k covers the vocabulary, so both tails are empty) against a
dense computation over the whole vocabulary, values and gradients; forward / reverse KL with
k < V against hand arithmetic with the tail bucket; dropped ids; gradients reach the student
and not the teacher; TAID's schedule against a loop of its formula; on-policy distillation's
advantages and importance-sampling loss against hand arithmetic on a recorded batch.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from stages.lib.divergences import (
    DIVERGENCES,
    TaidSchedule,
    divergence,
    sampled_rkl_advantages,
    sampled_rkl_loss,
)

TOL = 1e-5
PARAMS = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1}),
          ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skew_kl", {"alpha": 0.1}),
          ("skew_rkl", {"alpha": 0.1}), ("skew_kl", {"alpha": 0.3}), ("taid", {"t": 0.4}),
          ("taid", {"t": 0.85})]


def _dense(name: str, zs: torch.Tensor, zt: torch.Tensor, beta=0.5, alpha=0.1, t=None):
    """The divergence over the full vocabulary from student / teacher logits, float64, [N]."""
    ls, lt = torch.log_softmax(zs.double(), -1), torch.log_softmax(zt.double(), -1)
    q, p = ls.exp(), lt.exp()

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return kl(p, q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_rkl":
        return kl(q, (1 - alpha) * p + alpha * q)
    assert name == "taid"
    pt = torch.softmax((1 - t) * zs.double().detach() + t * zt.double(), -1)  # raw logits
    return (pt * (pt.log() - ls)).sum(-1)


def _logits(n=6, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g) * 2.0
    zt = torch.randn(n, v, generator=g) * 3.0 + 1.0  # teacher's logits: another constant shift
    return zs, zt


def test_names():
    assert DIVERGENCES == ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "taid")
    ls = torch.log_softmax(torch.zeros(1, 4), -1)
    ids, lp = torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.2]]))
    with pytest.raises(ValueError):
        divergence("kl", ls, ids, lp)
    with pytest.raises(ValueError):
        divergence("taid", ls, ids, lp)  # t missing


@pytest.mark.parametrize("name,kw", PARAMS)
def test_full_vocab_equals_dense(name, kw):
    """k = V, the ids in the teacher's descending order: value and student-logit gradient."""
    zs, zt = _logits()
    zs.requires_grad_(True)
    lt = torch.log_softmax(zt, -1)
    ids = torch.argsort(lt, dim=-1, descending=True)
    got = divergence(name, torch.log_softmax(zs, -1), ids, lt.gather(-1, ids), **kw)
    assert got.dtype == torch.float32 and got.shape == (6,)
    (grad,) = torch.autograd.grad(got.sum(), zs)

    zs64 = zs.detach().double().requires_grad_(True)
    want = _dense(name, zs64, zt, **kw)
    (want_grad,) = torch.autograd.grad(want.sum(), zs64)
    assert torch.allclose(got.double(), want.detach(), atol=TOL, rtol=0), (got, want)
    assert torch.allclose(grad.double(), want_grad, atol=TOL, rtol=0)
    assert want.min() > 1e-3  # the example is not trivially 0


def _hand_example():
    """V = 5, k = 2. Student q = (.4, .3, .15, .1, .05); teacher top-2: id 2 -> .5, id 0 -> .3.

    Support (id 2, id 0, tail): p = (.5, .3, .2), q = (.15, .4, .45).
    """
    q = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    ids = torch.tensor([[2, 0]])
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    p_s, q_s = (0.5, 0.3, 0.2), (0.15, 0.4, 0.45)
    return q.log(), ids, lp, p_s, q_s


def test_tail_bucket_by_hand():
    ls, ids, lp, p_s, q_s = _hand_example()
    fkl = (0.5 * math.log(0.5 / 0.15) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.45))
    rkl = (0.15 * math.log(0.15 / 0.5) + 0.4 * math.log(0.4 / 0.3) + 0.45 * math.log(0.45 / 0.2))
    assert divergence("forward_kl", ls, ids, lp).item() == pytest.approx(fkl, abs=1e-6)
    assert divergence("reverse_kl", ls, ids, lp).item() == pytest.approx(rkl, abs=1e-6)
    assert divergence("jsd", ls, ids, lp, beta=0.0).item() == pytest.approx(fkl, abs=1e-6)
    assert divergence("jsd", ls, ids, lp, beta=1.0).item() == pytest.approx(rkl, abs=1e-6)
    # beta = 0.5 on the same support
    m = [(a + b) / 2 for a, b in zip(p_s, q_s)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(p_s, m)) \
        + 0.5 * sum(b * math.log(b / c) for b, c in zip(q_s, m))
    assert divergence("jsd", ls, ids, lp, beta=0.5).item() == pytest.approx(js, abs=1e-6)
    # skew forward KL, alpha = 0.1
    sk = sum(a * math.log(a / (0.1 * a + 0.9 * b)) for a, b in zip(p_s, q_s))
    assert divergence("skew_kl", ls, ids, lp).item() == pytest.approx(sk, abs=1e-6)
    # TAID, t = 0.5: p_t proportional to sqrt(p q) over the support
    w = [math.sqrt(a * b) for a, b in zip(p_s, q_s)]
    pt = [x / sum(w) for x in w]
    td = sum(a * math.log(a / b) for a, b in zip(pt, q_s))
    assert divergence("taid", ls, ids, lp, t=0.5).item() == pytest.approx(td, abs=1e-6)


def test_low_precision_inputs_give_fp32():
    ls, ids, lp, _, _ = _hand_example()
    ref = divergence("forward_kl", ls, ids, lp)
    got = divergence("forward_kl", ls.bfloat16(), ids.int(), lp.half())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), abs=2e-2)


@pytest.mark.parametrize("name,kw", PARAMS)
def test_dropped_ids_are_excluded(name, kw):
    ls, ids, lp, _, _ = _hand_example()
    padded_ids = torch.tensor([[-1, 2, -1, 0], [-1, -1, -1, -1]])
    padded_lp = torch.tensor([[7.0, lp[0, 0], -float("inf"), lp[0, 1]], [1.0, 2.0, 3.0, 4.0]])
    s = torch.cat([ls, ls]).requires_grad_(True)
    got = divergence(name, s, padded_ids, padded_lp, **kw)
    want = divergence(name, ls, ids, lp, **kw)
    assert got[0].item() == pytest.approx(want.item(), abs=1e-6)
    assert got[1].item() == pytest.approx(0.0, abs=1e-6)  # nothing left: p = q = (tail = 1)
    (grad,) = torch.autograd.grad(got.sum(), s)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name,kw", PARAMS)
def test_gradients_reach_student_only(name, kw):
    zs, zt = _logits(n=4, v=30, seed=1)
    zs.requires_grad_(True)
    lt = torch.log_softmax(zt, -1)
    top = torch.topk(lt, 5, dim=-1)
    ids = top.indices.clone()
    ids[0, 3] = -1  # a dropped entry
    teacher = top.values.clone().requires_grad_(True)
    loss = divergence(name, torch.log_softmax(zs, -1), ids, teacher, **kw).sum()
    loss.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    outside = torch.ones_like(zs.grad, dtype=torch.bool).scatter_(1, top.indices, False)
    assert (zs.grad[outside] != 0).all()  # through the tail bucket: q_tail = 1 - sum q_k
    assert teacher.grad is None


def _taid_loop(losses, total, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """TAID's schedule written out: returns t after each step."""
    t, m, prev, out = t_start, 0.0, None, []
    for step, j in enumerate(losses):
        if prev is not None:
            rel = (prev - j) / (prev + 1e-15)
            m = beta * m + (1 - beta) * rel
            lin = t_start + (t_end - t_start) * step / total
            sig = torch.sigmoid(torch.tensor(m, dtype=torch.float64)).item()
            t = min(t_end, max(lin, t + alpha * sig * (1 - t)))
        prev = j
        out.append(t)
    return out


LOSSES = [5.0, 4.0, 3.2, 2.7, 2.5, 2.45, 2.6, 2.9, 3.3, 3.8]


@pytest.mark.parametrize("total,alpha", [(10_000, 0.05), (10_000, 5e-4), (6, 5e-4), (6, 0.3)])
def test_taid_schedule(total, alpha):
    sched = TaidSchedule(total_steps=total, alpha=alpha)
    assert sched.t == 0.4
    got = [sched.update(step, torch.tensor(j, dtype=torch.float64))
           for step, j in enumerate(LOSSES)]
    want = _taid_loop(LOSSES, total, alpha=alpha)
    assert got == pytest.approx(want, abs=1e-12)
    for step, t in enumerate(got):
        lin = 0.4 + 0.6 * step / total
        assert t <= 1.0 and t >= min(lin, 1.0) - 1e-12
    assert all(b >= a for a, b in zip(got, got[1:]))
    if total == 10_000 and alpha == 0.05:  # the adaptive branch is the one taken
        assert got[-1] > 0.4 + 0.6 * 9 / total + 0.1
    if total == 6:  # past total_steps the linear floor caps at t_end
        assert got[-1] == 1.0


def test_taid_schedule_resume():
    full = TaidSchedule(total_steps=20, alpha=0.05)
    first = TaidSchedule(total_steps=20, alpha=0.05)
    got = [full.update(s, j) for s, j in enumerate(LOSSES)]
    for s, j in enumerate(LOSSES[:5]):
        first.update(s, j)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = TaidSchedule(total_steps=20, alpha=0.05)
    resumed.load_state_dict(state)
    assert [resumed.update(s, j) for s, j in enumerate(LOSSES) if s >= 5] == got[5:]
    fresh = TaidSchedule(total_steps=20)
    fresh.load_state_dict(json.loads(json.dumps(TaidSchedule(total_steps=20).state_dict())))
    assert fresh.prev_loss is None and fresh.t == 0.4


# A recorded batch of 2 sequences x 4 sampled tokens; the last two of row 2 are padding, holding
# values that would poison the loss (inf / nan) if they were not excluded.
OLD = [[-0.5, -1.2, -2.0, -0.1], [-0.3, -3.0, 9.9, 9.9]]
TEACHER = [[-0.7, -1.0, -2.5, -0.1], [-0.2, -2.0, -float("inf"), float("nan")]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]
# A = log pi_T - log pi_S at the 6 real tokens
A_HAND = [[-0.2, 0.2, -0.5, 0.0], [0.1, 1.0]]


def test_sampled_rkl_advantages():
    old = torch.tensor(OLD, requires_grad=True)
    a = sampled_rkl_advantages(old, torch.tensor(TEACHER))
    assert not a.requires_grad
    assert a[0].tolist() == pytest.approx(A_HAND[0], abs=1e-6)
    assert a[1, :2].tolist() == pytest.approx(A_HAND[1], abs=1e-6)


def test_sampled_rkl_loss_by_hand():
    old = torch.tensor(OLD)
    shift = torch.tensor([[0.1, 0.0, -0.2, 0.3], [0.0, 0.5, 7.0, 7.0]])
    new = (old + shift).requires_grad_(True)
    loss = sampled_rkl_loss(new, old, torch.tensor(TEACHER), torch.tensor(MASK))
    hand = -(math.exp(0.1) * -0.2 + 1.0 * 0.2 + math.exp(-0.2) * -0.5 + math.exp(0.3) * 0.0
             + 1.0 * 0.1 + math.exp(0.5) * 1.0) / 6
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    loss.backward()
    assert torch.isfinite(new.grad).all()
    assert new.grad[1, 2:].tolist() == [0.0, 0.0]
    # at new = old the loss is -sum A / sum mask
    mask = torch.tensor(MASK, dtype=torch.bool)
    at_old = sampled_rkl_loss(old, old, torch.tensor(TEACHER), mask)
    assert at_old.item() == pytest.approx(-(-0.2 + 0.2 - 0.5 + 0.0 + 0.1 + 1.0) / 6, abs=1e-6)


def test_sampled_rkl_gradient_at_ratio_one():
    """d loss / d new at new = old equals that of -sum A new / sum mask: -A / 6 at real tokens."""
    old = torch.tensor(OLD)
    new = old.clone().requires_grad_(True)
    sampled_rkl_loss(new, old, torch.tensor(TEACHER), torch.tensor(MASK)).backward()
    want = torch.tensor([[0.2, -0.2, 0.5, 0.0], [-0.1, -1.0, 0.0, 0.0]]) / 6
    assert torch.allclose(new.grad, want, atol=1e-7, rtol=0)
    # and the same through the surrogate written with the hand advantages
    a = torch.tensor([A_HAND[0], A_HAND[1] + [0.0, 0.0]])
    new2 = old.clone().requires_grad_(True)
    (-(a * new2 * torch.tensor(MASK)).sum() / 6).backward()
    assert torch.allclose(new.grad, new2.grad, atol=1e-7, rtol=0)
