r"""Token distillation losses: a student's next-token distribution q against its teacher's p.

Every loss takes logits of shape (..., V) (for a VAR: (B, L, V), one row per position of the multi-scale
sequence), computes in fp32 from log-softmaxes (so extreme but finite logits give finite values and
gradients), and returns the mean over positions of a per-position value. Each is 0 when the student's
logits equal the teacher's.

    fkl        KL(p || q) = sum_v p_v (log p_v - log q_v)       forward: mass-covering
    rkl        KL(q || p)                                        reverse: mode-seeking
    js         JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2
    logit_mse  mean_v (z^p_v - z^q_v)^2                          on the raw logits
    topkld     TopKLD, two readings (below)

TopKLD (arXiv 2501.06218) "balances implicit and explicit knowledge"; the paper's formula is not public,
so what follows is a RECONSTRUCTION (genfast's, from the abstract and the ICLR reviews; see
shared/reference/quantization.md section 1). Let H = T_K be the teacher's K most likely tokens at a
position (K = the top-k the sampler draws from: the tokens it can emit, the "explicit" knowledge) and
T the rest (the tail, never sampled: the "implicit" knowledge). P = p(H), Q = q(H); p_H, q_H are p and
q restricted to H and renormalised, p_T, q_T likewise on T; Bern(x) is the two-point distribution
(x, 1 - x) over {head, tail}.

  reading "head_tail" (A), tail weight lambda:

      L_A = KL(Bern(P) || Bern(Q)) + P * KL(p_H || q_H) + lambda * (1 - P) * KL(p_T || q_T)

  The first term makes the head/tail split itself learned (how much mass the student leaves to tokens
  the sampler cuts off). By the chain rule of KL, L_A = KL(p || q) exactly when lambda = 1; lambda > 1
  weights the tail (implicit knowledge) up, lambda < 1 down, relative to forward KL.

  reading "direction" (B), tail weight alpha:

      L_B = KL(Bern(P) || Bern(Q)) + Q * KL(q_H || p_H) + alpha * (1 - P) * KL(p_T || q_T)

  Reverse KL on the head, forward KL on the tail. Why this way round: the head is what the sampler
  emits, and a mode-seeking reverse KL penalises the student for putting mass on head tokens the
  teacher finds unlikely (those are sampled, and cost image quality), rather than for missing some of
  the teacher's head mass; the tail is never sampled, so there only the teacher's shape of the
  distribution matters, which mass-covering forward KL transfers (the dark knowledge), and it stays
  well-behaved where the student's tail probabilities are tiny. Each term is >= 0 and all vanish only
  when q = p. The Bern term and the mass weights are as in reading A (each region's KL weighted by the
  mass of the distribution it averages over).

K >= the vocabulary size leaves no tail and is an error (it names the vocabulary size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "READINGS", "distill_loss", "forward_kl", "js_divergence", "logit_mse", "reverse_kl",
           "topkld"]

LOSSES = ("topkld", "fkl", "rkl", "js", "logit_mse")
READINGS = ("head_tail", "direction")


def _log_probs(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher and student logits must have the same shape, got {tuple(teacher_logits.shape)} "
                         f"and {tuple(student_logits.shape)}")
    if teacher_logits.ndim < 1 or teacher_logits.shape[-1] < 2:
        raise ValueError(f"logits must be (..., V) with a vocabulary V >= 2, got {tuple(teacher_logits.shape)}")
    return F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-position KL(a || b) from log-probabilities (a_v = 0 contributes 0)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q), mean over positions."""
    lp, lq = _log_probs(teacher_logits, student_logits)
    return _kl(lp, lq).mean()


def reverse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(q || p), mean over positions."""
    lp, lq = _log_probs(teacher_logits, student_logits)
    return _kl(lq, lp).mean()


def js_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log, so at most log 2), mean over positions."""
    lp, lq = _log_probs(teacher_logits, student_logits)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return (0.5 * _kl(lp, lm) + 0.5 * _kl(lq, lm)).mean()


def logit_mse(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the raw logits (mean over the vocabulary, then over positions)."""
    _log_probs(teacher_logits, student_logits)  # the shape checks
    return F.mse_loss(student_logits.float(), teacher_logits.float())


def _masked_lse(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log of the mass of the tokens in `mask`, per position."""
    return logp.masked_fill(~mask, float("-inf")).logsumexp(-1)


def _region_kl(log_a: torch.Tensor, log_b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                           torch.Tensor]:
    """(KL(a_R || b_R) of the renormalised restrictions to region R = mask, log a(R), log b(R))."""
    la, lb = _masked_lse(log_a, mask), _masked_lse(log_b, mask)
    # tokens outside R are set to 0 before exp(): their renormalised log-probabilities can be huge positive
    # numbers (a head token measured against a tiny tail mass), and an inf there would poison the gradient
    zero = torch.zeros_like(log_a)
    ra = torch.where(mask, log_a - la.unsqueeze(-1), zero)
    rb = torch.where(mask, log_b - lb.unsqueeze(-1), zero)
    kl = (ra.exp() * (ra - rb)).sum(-1)  # outside R: exp(0) * (0 - 0) = 0
    return kl, la, lb


def check_top_k(top_k, vocab: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k (TopKLD's K) must be an integer >= 1, got {top_k!r}")
    if top_k >= vocab:
        raise ValueError(f"top_k (TopKLD's K) = {top_k} leaves no tail: the vocabulary has {vocab} tokens, so K must "
                         f"be at most {vocab - 1} (use the top-k the sampler draws from)")
    return top_k


def topkld(teacher_logits: torch.Tensor, student_logits: torch.Tensor, top_k: int, reading: str = "direction",
           tail_weight: float = 1.0) -> torch.Tensor:
    """TopKLD as reconstructed in the module docstring: reading "head_tail" (A, tail_weight = lambda) or
    "direction" (B, tail_weight = alpha); K = top_k, the teacher's top-k tokens per position. Mean over positions."""
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    if isinstance(tail_weight, bool) or not isinstance(tail_weight, (int, float)) or not tail_weight >= 0 \
            or not math.isfinite(tail_weight):
        raise ValueError(f"tail_weight must be a finite number >= 0, got {tail_weight!r}")
    lp, lq = _log_probs(teacher_logits, student_logits)
    check_top_k(top_k, lp.shape[-1])
    head = torch.zeros_like(lp, dtype=torch.bool).scatter(-1, lp.topk(top_k, dim=-1).indices, True)
    tail = ~head
    if reading == "head_tail":
        head_kl, log_P, log_Q = _region_kl(lp, lq, head)
        head_term = log_P.exp() * head_kl
    else:
        head_kl, log_Q, log_P = _region_kl(lq, lp, head)
        head_term = log_Q.exp() * head_kl
    tail_kl, log_1mP, log_1mQ = _region_kl(lp, lq, tail)
    # KL(Bern(P) || Bern(Q)), every log from a logsumexp: no log(1 - P) of a rounded P
    bern = log_P.exp() * (log_P - log_Q) + log_1mP.exp() * (log_1mP - log_1mQ)
    return (bern + head_term + tail_weight * log_1mP.exp() * tail_kl).mean()


def distill_loss(name: str, teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, top_k: int | None = None,
                 reading: str = "direction", tail_weight: float = 1.0) -> torch.Tensor:
    """The loss `name` (one of LOSSES); top_k / reading / tail_weight are TopKLD's and refused for the others
    when they would have no effect."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    if name == "topkld":
        if top_k is None:
            raise ValueError("topkld needs top_k (K, the top-k the sampler draws from)")
        return topkld(teacher_logits, student_logits, top_k, reading, tail_weight)
    if top_k is not None or reading != "direction" or tail_weight != 1.0:
        raise ValueError(f"top_k, reading and tail_weight are TopKLD's; they have no effect on {name!r}: drop them")
    fn = {"fkl": forward_kl, "rkl": reverse_kl, "js": js_divergence, "logit_mse": logit_mse}[name]
    return fn(teacher_logits, student_logits)
