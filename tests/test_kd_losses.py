"""Token distillation losses (genfast.training.kd_losses): zero exactly at q == p, the textbook divergences,
TopKLD's two readings against a by-hand computation, the chain rule of KL, finite gradients, clear errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from genfast.training.kd_losses import (
    LOSSES,
    distill_loss,
    forward_kl,
    js_divergence,
    logit_mse,
    reverse_kl,
    topkld,
)

V = 12
VARIANTS = [("fkl", {}), ("rkl", {}), ("js", {}), ("logit_mse", {}),
            ("topkld", dict(top_k=3, reading="head_tail", tail_weight=1.0)),
            ("topkld", dict(top_k=3, reading="head_tail", tail_weight=4.0)),
            ("topkld", dict(top_k=5, reading="direction", tail_weight=0.5))]


def _logits(seed, shape=(2, 5, V), scale=2.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_each_loss_is_zero_at_the_teacher_and_positive_elsewhere(name, options):
    p = _logits(0)
    assert distill_loss(name, p, p.clone(), **options).item() == pytest.approx(0.0, abs=1e-6)
    for seed in (1, 2):
        assert distill_loss(name, p, _logits(seed), **options).item() > 1e-3
    # a student that differs at one position only still pays (mean over positions, not a cancelling sum)
    q = p.clone()
    q[1, 3] = q[1, 3].flip(-1)
    assert distill_loss(name, p, q, **options).item() > 1e-4


def test_forward_reverse_and_js_are_the_textbook_divergences():
    p, q = _logits(0), _logits(1)
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    # kl_div(input=log b, target=log a) sums a (log a - log b): KL(a || b)
    kl = lambda log_a, log_b: F.kl_div(log_b, log_a, log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(forward_kl(p, q), kl(lp, lq))
    torch.testing.assert_close(reverse_kl(p, q), kl(lq, lp))
    lm = ((lp.exp() + lq.exp()) / 2).log()
    torch.testing.assert_close(js_divergence(p, q), 0.5 * kl(lp, lm) + 0.5 * kl(lq, lm))
    assert 0 < js_divergence(p, q * 50).item() <= math.log(2) + 1e-6  # JS is bounded by log 2
    torch.testing.assert_close(logit_mse(p, q), ((p - q) ** 2).mean())


def _by_hand(p_logits, q_logits, k, reading, weight):
    """TopKLD per the docstring, one position at a time with explicit index sets and probabilities."""
    total, n = 0.0, 0
    for zp, zq in zip(p_logits.reshape(-1, V).double(), q_logits.reshape(-1, V).double()):
        p, q = zp.softmax(-1), zq.softmax(-1)
        head = set(zp.argsort(descending=True)[:k].tolist())
        H, T = sorted(head), sorted(set(range(V)) - head)
        P, Q = p[H].sum(), q[H].sum()

        def kl(a, b):
            return (a * (a / b).log()).sum()

        bern = P * (P / Q).log() + (1 - P) * ((1 - P) / (1 - Q)).log()
        head_term = P * kl(p[H] / P, q[H] / Q) if reading == "head_tail" else Q * kl(q[H] / Q, p[H] / P)
        total += bern + head_term + weight * (1 - P) * kl(p[T] / (1 - P), q[T] / (1 - Q))
        n += 1
    return total / n


@pytest.mark.parametrize(("reading", "k", "weight"), [("head_tail", 3, 2.5), ("head_tail", 1, 0.0),
                                                       ("direction", 4, 1.0), ("direction", 11, 3.0)])
def test_topkld_matches_its_formula_computed_by_hand(reading, k, weight):
    p, q = _logits(3), _logits(4)
    got = topkld(p, q, k, reading, weight)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_by_hand(p, q, k, reading, weight).item(), rel=1e-5)


def test_head_tail_reading_with_unit_tail_weight_is_forward_kl_the_chain_rule():
    for seed, k in ((5, 1), (6, 4), (7, V - 1)):
        p, q = _logits(seed), _logits(seed + 100)
        torch.testing.assert_close(topkld(p, q, k, "head_tail", 1.0), forward_kl(p, q), rtol=1e-5, atol=1e-6)
    # and it is not forward KL for another weight, nor is the direction reading
    assert not torch.allclose(topkld(p, q, 4, "head_tail", 2.0), forward_kl(p, q))
    assert not torch.allclose(topkld(p, q, 4, "direction", 1.0), forward_kl(p, q))


def test_the_head_is_the_teachers_top_k():
    """Moving the student's mass between two tail tokens changes only the tail term; with tail weight 0 and the
    head's and tail's masses unchanged, the loss does not move."""
    p = torch.tensor([[4.0, 3.0, 2.0, 0.0, -1.0, -2.0]])
    q = torch.tensor([[3.0, 3.5, 1.0, -0.5, 0.5, -1.0]])
    swapped = q.clone()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]  # tokens 3 and 4 are in the teacher's tail for K = 3
    for reading in ("head_tail", "direction"):
        assert topkld(p, q, 3, reading, 0.0).item() == pytest.approx(topkld(p, swapped, 3, reading, 0.0).item())
        assert topkld(p, q, 3, reading, 1.0).item() != pytest.approx(topkld(p, swapped, 3, reading, 1.0).item())


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_gradients_stay_finite_with_extreme_logits(name, options):
    p = _logits(8, scale=1.0)
    p[0, 0] = torch.linspace(-1e4, 1e4, V)  # a teacher certain of one token: the tail's mass underflows to 0
    q = _logits(9, scale=1.0)
    q[0, 1] = torch.linspace(1e4, -1e4, V)  # a student certain of another
    q.requires_grad_(True)
    loss = distill_loss(name, p, q, **options)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_bad_arguments_are_refused_clearly():
    p, q = _logits(0), _logits(1)
    with pytest.raises(ValueError, match=f"vocabulary has {V} tokens"):
        topkld(p, q, V)
    with pytest.raises(ValueError, match="integer >= 1"):
        topkld(p, q, 0)
    with pytest.raises(ValueError, match="reading must be one of"):
        topkld(p, q, 3, reading="both")
    with pytest.raises(ValueError, match="tail_weight"):
        topkld(p, q, 3, tail_weight=-1)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(p, q[..., :-1])
    with pytest.raises(ValueError, match="loss must be one of"):
        distill_loss("kl", p, q)
    with pytest.raises(ValueError, match="needs top_k"):
        distill_loss("topkld", p, q)
    for name in set(LOSSES) - {"topkld"}:
        with pytest.raises(ValueError, match="no effect"):
            distill_loss(name, p, q, top_k=3)
