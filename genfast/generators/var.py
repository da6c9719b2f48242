"""A VAR-style next-scale autoregressive transformer (Tian et al., arXiv 2404.02905), class-conditional.

Facts from FoundationVision/VAR `models/var.py` and `models/basic_var.py` (own code, nothing copied):
the sequence is every scale's token map flattened and concatenated (L = sum p^2 over patch_nums);
scale 0's input is the class embedding plus a learned start position, scale k's input is
word_embed(area_resize(f_hat after scale k - 1, p_k)) (the tokenizer's `teacher_forcing_inputs`);
every position adds a learned position embedding and a level (scale) embedding; attention is
block-causal (a token sees its own scale and every earlier one); each block is adaLN-conditioned on
the class embedding:

    gamma1, gamma2, scale1, scale2, shift1, shift2 = Linear(SiLU(c))           # 6 * width
    x = x + gamma1 * Attn(LN(x) * (1 + scale1) + shift1)
    x = x + gamma2 * FFN(LN(x) * (1 + scale2) + shift2)                        # GELU(tanh)
    logits = head(LN(x) * (1 + s) + t),  (s, t) = Linear(SiLU(c))

The label table has num_classes + 1 rows, the last the null class of classifier-free guidance; ids
num_classes and DiTPipeline's 1000 both read it (genfast.pipelines.class_conditional.map_null_labels).

genfast's choices: attention uses the usual 1 / sqrt(head_dim) scale with plain q/k/v biases (VAR:
0.25 / sqrt(head_dim), a zero k bias); the gammas and the adaLN shift/scale start at zero
(adaLN-Zero, DiT's init: every block starts as the identity); no dropout or drop-path; the named
sizes of `var_config`. Sampling lives in genfast.generators.sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from ..pipelines.class_conditional import NULL_CLASS_ID, map_null_labels
from .vq import check_patch_nums

__all__ = ["VARBlock", "VARModel", "VAROutput", "var_config"]

_BASE = dict(vocab_size=512, codebook_dim=16, patch_nums=(1, 2, 3, 4, 6, 8), num_classes=24, mlp_ratio=4.0)
# genfast's sizes for the bit-level scaling sweep (issue 19): about 0.5M / 1M / 2M / 8M parameters with
# the "mini" tokenizer (512 x 16 codebook, 130 tokens); 32 channels per head.
VAR_CONFIGS = {
    "0.5M": {**_BASE, "width": 64, "depth": 6, "num_heads": 2},
    "1M": {**_BASE, "width": 96, "depth": 6, "num_heads": 3},
    "2M": {**_BASE, "width": 128, "depth": 6, "num_heads": 4},
    "8M": {**_BASE, "width": 192, "depth": 12, "num_heads": 6},
}


def var_config(name: str) -> dict:
    """Keyword arguments for `VARModel(**config)` of a named size: "0.5M", "1M", "2M" or "8M" (genfast's choices:
    widths 64 / 96 / 128 / 192, depths 6 / 6 / 6 / 12, 32 channels per head, for the tokenizer of
    vq_config("mini"))."""
    if name not in VAR_CONFIGS:
        raise ValueError(f"unknown VAR size {name!r}; known: {', '.join(VAR_CONFIGS)}")
    return dict(VAR_CONFIGS[name])


def _check_config(cfg: dict) -> None:
    def positive_int(name):
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"VARModel: {name} must be a positive int, got {v!r}")

    for name in ("vocab_size", "codebook_dim", "width", "depth", "num_heads"):
        positive_int(name)
    check_patch_nums(cfg["patch_nums"], "VARModel")
    if cfg["vocab_size"] < 2:
        raise ValueError(f"VARModel: vocab_size must be at least 2, got {cfg['vocab_size']}")
    if cfg["width"] % cfg["num_heads"]:
        raise ValueError(f"VARModel: num_heads ({cfg['num_heads']}) must divide width ({cfg['width']})")
    k = cfg["num_classes"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < NULL_CLASS_ID:
        raise ValueError(f"VARModel: num_classes must be an int in 1..{NULL_CLASS_ID - 1} (id {NULL_CLASS_ID} is "
                         f"DiTPipeline's null class), got {k!r}")
    if not cfg["mlp_ratio"] > 0:
        raise ValueError(f"VARModel: mlp_ratio must be > 0, got {cfg['mlp_ratio']}")


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class VARBlock(nn.Module):
    """Self-attention and FFN, each an adaLN-gated residual on the class condition (VAR's AdaLNSelfAttn)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = round(width * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        b, n, w = x.shape
        q, k, v = self.qkv(_modulate(self.norm(x), shift1, scale1)).view(b, n, 3, self.num_heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + gamma1 * self.proj(att.transpose(1, 2).reshape(b, n, w))
        return x + gamma2 * self.ffn(_modulate(self.norm(x), shift2, scale2))


@dataclass
class VAROutput(BaseOutput):
    """logits: (B, n, vocab_size), one row per position of the (prefix of the) multi-scale sequence."""

    logits: torch.Tensor


class VARModel(ModelMixin, ConfigMixin):
    """Next-scale prediction over a multi-scale token pyramid; `forward(class_labels, scale_inputs)` gives the
    teacher-forced logits, `generate(tokenizer, class_labels, ...)` samples (genfast.generators.sampling).

    Args:
        vocab_size, codebook_dim: the tokenizer's codebook (rows, channels).
        patch_nums: scale sides, small to large (the tokenizer's).
        num_classes: K; the label table has K + 1 rows, row K the null class (ids K and 1000).
        width, depth, num_heads, mlp_ratio: the transformer.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 512,
        codebook_dim: int = 16,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 8),
        num_classes: int = 24,
        width: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        _check_config(dict(self.config))
        nums = tuple(patch_nums)
        length, first = sum(p * p for p in nums), nums[0] ** 2
        self.class_embed = nn.Embedding(num_classes + 1, width)
        self.pos_start = nn.Parameter(torch.zeros(1, first, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, length, width))
        self.level_embed = nn.Embedding(len(nums), width)
        self.word_embed = nn.Linear(codebook_dim, width)
        self.blocks = nn.ModuleList(VARBlock(width, num_heads, mlp_ratio, norm_eps) for _ in range(depth))
        self.head_norm = nn.LayerNorm(width, elementwise_affine=False, eps=norm_eps)
        self.head_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, vocab_size)
        levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(nums)])
        # derived from the config, so kept out of the state dict
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("allowed", levels[:, None] >= levels[None, :], persistent=False)  # block-causal
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        std = math.sqrt(1 / self.config.width / 3)  # VAR's default init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        for p in (self.class_embed.weight, self.pos_start, self.pos_embed, self.level_embed.weight):
            nn.init.trunc_normal_(p, std=std)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.head_adaLN[-1].weight)
        nn.init.zeros_(self.head_adaLN[-1].bias)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.config.patch_nums)

    def scale_bounds(self) -> list[tuple[int, int]]:
        """(begin, end) of each scale in the flattened sequence."""
        bounds, start = [], 0
        for p in self.patch_nums:
            bounds.append((start, start + p * p))
            start += p * p
        return bounds

    def forward(self, class_labels, scale_inputs: torch.Tensor | None = None, return_dict: bool = True):
        """Teacher-forced logits for a prefix of whole scales.

        class_labels: (B,) ids in 0..K-1, or K / 1000 for the null class.
        scale_inputs: (B, n - p_0^2, codebook_dim), the inputs of scales 1.. (tokenizer.teacher_forcing_inputs,
            or a prefix of it ending at a scale boundary); None or empty for scale 0 alone.
        Returns VAROutput(logits=(B, n, vocab_size)); the logits of scale k predict scale k's tokens.
        """
        cfg = self.config
        labels = map_null_labels(class_labels, cfg.num_classes).to(self.pos_embed.device)
        c = self.class_embed(labels)
        b, first = labels.shape[0], self.patch_nums[0] ** 2
        x = (c[:, None, :] + self.pos_start).expand(b, first, -1)
        if scale_inputs is not None and scale_inputs.shape[1]:
            if scale_inputs.ndim != 3 or scale_inputs.shape[0] != b or scale_inputs.shape[2] != cfg.codebook_dim:
                raise ValueError(f"scale_inputs must be (B={b}, n, codebook_dim={cfg.codebook_dim}); "
                                 f"got {tuple(scale_inputs.shape)}")
            x = torch.cat([x, self.word_embed(scale_inputs.to(c.dtype))], dim=1)
        n = x.shape[1]
        if n not in {end for _, end in self.scale_bounds()}:
            raise ValueError(f"scale_inputs must cover whole scales: the prefix length {n} is not one of "
                             f"{[end for _, end in self.scale_bounds()]} (patch_nums {self.patch_nums})")
        x = x + self.pos_embed[:, :n] + self.level_embed(self.levels[:n])
        mask = self.allowed[:n, :n]
        for block in self.blocks:
            x = block(x, c, mask)
        shift_scale = self.head_adaLN(c)[:, None, :]
        scale, shift = shift_scale.chunk(2, dim=-1)
        logits = self.head(_modulate(self.head_norm(x), shift, scale))
        return VAROutput(logits=logits) if return_dict else (logits,)

    def generate(self, tokenizer, class_labels, **kwargs):
        """Sample token maps and images scale by scale: genfast.generators.sampling.generate(self, ...)."""
        from .sampling import generate

        return generate(self, tokenizer, class_labels, **kwargs)
