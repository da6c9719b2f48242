"""Sampling a VARModel scale by scale: classifier-free guidance, top-k / top-p, decoding.

Guidance uses DiTPipeline's convention, logits = u + g_k (c - u) with c / u the conditional / null-class
logits, so guidance_scale 1 is the plain conditional model. VAR writes (1 + t) c - t u with
t = cfg * k / (K - 1), a ramp over the scale index k; that is g_k = 1 + (g - 1) k / (K - 1), our
cfg_schedule="linear" (the default); "constant" uses g at every scale.

Filtering follows VAR's sampler: top-k keeps the k largest logits; top-p keeps the smallest set of
most likely tokens whose probability reaches p (the most likely token always stays). Both off at 0.

Prefix re-running instead of a KV cache: at every scale the whole prefix is run again with the
block-causal mask, i.e. exactly the teacher-forced forward. The models are small (130 tokens), this
costs less than twice a cached pass, and sampling cannot drift from the training forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pipelines.class_conditional import map_null_labels

__all__ = ["CFG_SCHEDULES", "VARSample", "default_sampling", "filter_logits", "generate", "guidance_scales",
           "guided_logits"]

CFG_SCHEDULES = ("linear", "constant")
VAR_TOP_K_SHARE = 900 / 4096  # VAR's demo keeps the top 900 of its 4096 codes (top_p 0.95): the same share here


def default_sampling(vocab_size: int) -> dict:
    """genfast's sampling settings for a VAR of this codebook size: guidance 4 with the linear ramp, and
    VAR's demo filtering scaled to the codebook (top-k = the same share of codes, top-p 0.95); 112 of 512
    for the mini tokenizer. Training's evaluation samples with them, and train-var records them in
    training.json, where sweeps and QAT read the top-k TopKLD ties its K to."""
    return {"guidance_scale": 4.0, "top_k": max(1, round(vocab_size * VAR_TOP_K_SHARE)), "top_p": 0.95,
            "cfg_schedule": "linear"}


@dataclass
class VARSample:
    """tokens: [(B, p, p) for p in patch_nums]; images: (B, 3, H, W) in [0, 1]."""

    tokens: list[torch.Tensor]
    images: torch.Tensor


def guidance_scales(num_scales: int, guidance_scale: float, cfg_schedule: str = "linear") -> list[float]:
    """The guidance g_k used at each scale (see the module's docstring)."""
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    g = float(guidance_scale)
    if not g >= 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale!r}")
    if cfg_schedule == "constant" or num_scales == 1:
        return [g] * num_scales
    return [1 + (g - 1) * k / (num_scales - 1) for k in range(num_scales)]


def _check_filters(top_k: int, top_p: float, vocab: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be an int in 0..{vocab} (0 = off), got {top_k!r}")
    if not 0.0 <= float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0 = off), got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits with every token outside the top-k and outside the top-p nucleus set to -inf (a new tensor)."""
    _check_filters(top_k, top_p, logits.shape[-1])
    out = logits.clone()
    if top_k:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p:
        probs, order = out.softmax(-1).sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p  # the set is complete once the mass before a token reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _check_pair(model, tokenizer) -> None:
    """The transformer must have been built for this tokenizer's codebook and scales."""
    cfg, vq = model.config, tokenizer.config
    for mine, theirs in (("vocab_size", "vocab_size"), ("codebook_dim", "latent_channels"), ("patch_nums", "patch_nums")):
        a, b = cfg[mine], vq[theirs]
        if (tuple(a) != tuple(b)) if mine == "patch_nums" else a != b:
            raise ValueError(f"the VARModel's {mine} ({a}) differs from the tokenizer's {theirs} ({b}): "
                             f"train the transformer on this tokenizer's tokens")


def _mix(cond: torch.Tensor, uncond: torch.Tensor, g: float) -> torch.Tensor:
    return uncond + g * (cond - uncond)


def guided_logits(model, class_labels, scale_inputs, guidance_scale: float = 1.0, cfg_schedule: str = "linear"):
    """Teacher-forced logits (B, n, V) with guidance g_k applied per scale (what generate samples from at each
    scale, given the same prefix); guidance_scale 1 returns the conditional logits unchanged."""
    num = len(model.patch_nums)
    scales = guidance_scales(num, guidance_scale, cfg_schedule)
    labels = map_null_labels(class_labels, model.config.num_classes)
    cond = model(labels, scale_inputs).logits
    if all(g == 1 for g in scales):
        return cond
    null = torch.full_like(labels, model.config.num_classes)
    uncond = model(null, scale_inputs).logits
    return torch.cat([_mix(cond[:, a:b], uncond[:, a:b], g)
                      for (a, b), g in zip(model.scale_bounds(), scales) if a < cond.shape[1]], dim=1)


@torch.no_grad()
def generate(model, tokenizer, class_labels, guidance_scale: float = 4.0, top_k: int = 0, top_p: float = 0.0,
             generator: torch.Generator | None = None, cfg_schedule: str = "linear") -> VARSample:
    """Sample token maps scale by scale and decode them: VARSample(tokens, images in [0, 1]).

    class_labels: (B,) ids (0..K-1, or K / 1000 for unconditional samples). generator: a torch.Generator on
    the model's device (its draws make the samples reproducible); top_k=1 is greedy decoding."""
    _check_pair(model, tokenizer)
    _check_filters(top_k, top_p, model.config.vocab_size)
    device = model.pos_embed.device
    labels = map_null_labels(class_labels, model.config.num_classes).to(device)
    b, nums = labels.shape[0], model.patch_nums
    scales = guidance_scales(len(nums), guidance_scale, cfg_schedule)
    guided = any(g != 1 for g in scales)
    run_labels = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if guided else labels
    side, dim = nums[-1], tokenizer.config.latent_channels
    f_hat = torch.zeros(b, dim, side, side, device=device, dtype=tokenizer.dtype)
    inputs = f_hat.new_zeros(b, 0, dim)
    tokens = []
    for k, ((begin, end), p) in enumerate(zip(model.scale_bounds(), nums)):
        x = inputs.repeat(2, 1, 1) if guided else inputs
        logits = model(run_labels, x).logits[:, begin:end].float()
        if guided:
            logits = _mix(logits[:b], logits[b:], scales[k])
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        idx = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(b, p, p)
        tokens.append(idx)
        f_hat = f_hat + tokenizer.embed_scale(k, idx)
        if k + 1 < len(nums):
            inputs = torch.cat([inputs, tokenizer.next_scale_input(f_hat, k + 1)], dim=1)
    images = (tokenizer.decode_latents(f_hat) / 2 + 0.5).clamp(0, 1)
    return VARSample(tokens=tokens, images=images)
