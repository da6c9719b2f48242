"""AsCAN's two block types, the resampling between stages, and the U-Net trunk both AsCAN models share.

What comes from the paper (Kag et al., arXiv 2411.04967; no public code): a hybrid of convolutional
(C) and transformer (T) blocks, asymmetric -- more C in the early, high-resolution stages, more T in
the late, low-resolution ones -- and, for text-to-image, a T block that cross-attends from the image
features to the text embeddings inside a U-Net of down and up stages. Everything else here is
genfast's choice, made for a small CPU-trainable diffusion model:

  * C is FusedMBConv-style (timm's EdgeResidual: a 3x3 conv expanding the width, an activation, a
    1x1 projection, a residual), with GroupNorm in front and DiT's adaLN-Zero around it (shift and
    scale of the normalised input, a gate on the branch, all from the time(+class) embedding; the
    modulation Linear is zero-initialised, so a fresh block is the identity).
  * T is DiT's block -- LayerNorm, modulation, self-attention, gate; LayerNorm, modulation, MLP
    (GELU), gate -- with, in the text model only, an ungated LayerNorm -> cross-attention residual
    between the two (as diffusers' BasicTransformerBlock); its output projection is zero-initialised
    so the fresh block is still the identity. Attention is diffusers' `Attention`, so attention
    processors (SDPA by default) apply; there is no LoRA / peft adapter support.
  * One tensor convention: NCHW between blocks; a T block flattens to tokens and back.
  * No position embedding: the stem and the C blocks' zero-padded 3x3 convolutions give position,
    as in convolutional U-Nets.
  * Resampling: a 2x2 stride-2 conv down (patch merging), a 1x1 conv + pixel shuffle up.
  * Skips are added (not concatenated): the encoder output of each stage is added to the decoder's
    input at the same resolution (as LaMamba-Diff does; U-ViT concatenates and projects); it costs no parameters,
    which go to the blocks instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .common import FREQ_DIM, Stage, stage_heads

LETTERS = ("C", "T")


class ConvBlock(nn.Module):
    """C: GroupNorm -> adaLN shift/scale -> 3x3 conv (dim -> expand_ratio * dim) -> SiLU -> 1x1 conv -> gate
    -> residual. Text is not read (the argument is accepted so every block is called alike)."""

    def __init__(self, dim: int, emb_dim: int, expand_ratio: float, norm_num_groups: int):
        super().__init__()
        hidden = max(1, round(dim * expand_ratio))
        self.norm = nn.GroupNorm(norm_num_groups, dim, eps=1e-6, affine=False)
        self.conv_expand = nn.Conv2d(dim, hidden, 3, padding=1)
        self.conv_project = nn.Conv2d(hidden, dim, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 3 * dim))

    def forward(self, hidden_states, emb, encoder_hidden_states=None, encoder_attention_mask=None,
                cross_attention_kwargs=None):
        shift, scale, gate = self.adaLN_modulation(emb)[:, :, None, None].chunk(3, dim=1)
        h = self.norm(hidden_states) * (1 + scale) + shift
        h = self.conv_project(F.silu(self.conv_expand(h)))
        return hidden_states + gate * h


class TransformerBlock(nn.Module):
    """T: adaLN-Zero self-attention, [cross-attention to the text], adaLN-Zero MLP, on (B, C, H, W) maps."""

    def __init__(self, dim: int, emb_dim: int, num_heads: int, mlp_ratio: float,
                 cross_attention_dim: int | None = None):
        super().__init__()
        head_dim = dim // num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(dim, heads=num_heads, dim_head=head_dim, bias=True)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=num_heads, dim_head=head_dim,
                                   bias=True)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = max(1, round(dim * mlp_ratio))
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 6 * dim))

    def forward(self, hidden_states, emb, encoder_hidden_states=None, encoder_attention_mask=None,
                cross_attention_kwargs=None):
        b, c, h, w = hidden_states.shape
        kwargs = cross_attention_kwargs or {}
        x = hidden_states.flatten(2).transpose(1, 2)  # (B, H*W, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(emb)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn1(self.norm1(x) * (1 + scale1) + shift1, **kwargs)
        if self.attn2 is not None:
            if encoder_hidden_states is None:
                raise ValueError("this T block cross-attends to the text: encoder_hidden_states is required")
            x = x + self.attn2(self.norm2(x), encoder_hidden_states=encoder_hidden_states,
                               attention_mask=encoder_attention_mask, **kwargs)
        x = x + gate2 * self.ff(self.norm3(x) * (1 + scale2) + shift2)
        return x.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """2x2 stride-2 conv (patch merging): (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """1x1 conv to 4 * C_out, then pixel shuffle: (B, C_in, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, 4 * out_dim, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


def mirrored(down_layouts) -> list[str]:
    """The decoder's default layouts: each encoder stage's letters in reverse order."""
    return [layout[::-1] for layout in down_layouts]


def _layout_error(field: str, value) -> ValueError:
    return ValueError(f"{field} must be a string of the letters C (convolution block) and T (transformer "
                      f"block), e.g. 'CT'; got {value!r}")


def check_trunk(cfg: dict) -> None:
    """Refuse a trunk configuration that cannot be built, naming the field and the allowed values."""
    widths = cfg["block_out_channels"]
    if not isinstance(widths, (list, tuple)) or not widths or \
            not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"block_out_channels must be a non-empty list of positive ints (one width per stage); "
                         f"got {widths!r}")
    n = len(widths)
    layouts = {"down_layouts": cfg["down_layouts"]}
    if cfg["up_layouts"] is not None:
        layouts["up_layouts"] = cfg["up_layouts"]
    for field, value in layouts.items():
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or len(value) != n:
            raise ValueError(f"{field} must be a list of {n} layout strings, one per stage of block_out_channels "
                             f"{list(widths)} (e.g. {['C' * 2] + ['CT'] * (n - 1)}); got {value!r}")
        for i, layout in enumerate(value):
            if not isinstance(layout, str) or set(layout) - set(LETTERS):
                raise _layout_error(f"{field}[{i}]", layout)
    if not isinstance(cfg["mid_layout"], str) or set(cfg["mid_layout"]) - set(LETTERS):
        raise _layout_error("mid_layout", cfg["mid_layout"])
    heads = cfg["num_attention_heads"]
    if isinstance(heads, bool) or not (isinstance(heads, int) or (isinstance(heads, (list, tuple))
                                                                   and len(heads) == n)):
        raise ValueError(f"num_attention_heads must be an int or a list of {n} ints (one per stage); got {heads!r}")
    for width, h in zip(widths, stage_heads(heads, n)):
        if not isinstance(h, int) or h < 1 or width % h:
            raise ValueError(f"num_attention_heads must divide every stage width: block_out_channels {list(widths)}, "
                             f"num_attention_heads {heads!r} ({width} is not divisible by {h})")
    groups = cfg["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1 or any(w % groups for w in widths):
        raise ValueError(f"norm_num_groups must divide every width of block_out_channels {list(widths)} (the C "
                         f"blocks' GroupNorm); got {groups!r}")
    for field in ("expand_ratio", "mlp_ratio"):
        if not isinstance(cfg[field], (int, float)) or cfg[field] <= 0:
            raise ValueError(f"{field} must be a positive number; got {cfg[field]!r}")
    size, steps = cfg["sample_size"], 2 ** (n - 1)
    if not isinstance(size, int) or size < steps or size % steps:
        raise ValueError(f"sample_size must be a positive multiple of {steps} ({n - 1} downsampling steps of "
                         f"block_out_channels {list(widths)}); got {size!r}")
    for field in ("in_channels", "out_channels"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"{field} must be a positive int; got {cfg[field]!r}")


class AsCANTrunk:
    """The U-Net both AsCAN models share (a mixin for a ModelMixin): stem conv -> encoder stages (blocks,
    then a downsample, but after the last) -> mid blocks -> decoder stages (upsample, add the encoder's
    skip, blocks) -> GroupNorm + adaLN shift/scale -> SiLU -> 3x3 output conv."""

    def _build(self, cfg: dict, num_classes: int | None = None, cross_attention_dim: int | None = None,
               time_cond_proj_dim: int | None = None) -> None:
        """Everything a model is made of, initialised: the time embedding (DiT's 256-d sinusoid, then an MLP
        to the lowest-resolution width), a label table of num_classes + 1 rows when num_classes is given,
        the trunk (cross-attending to text of width cross_attention_dim when given)."""
        emb_dim = cfg["block_out_channels"][-1]
        self.gradient_checkpointing = False
        self.time_proj = Timesteps(FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)  # [cos, sin] as DiT
        self.time_embed = TimestepEmbedding(FREQ_DIM, emb_dim, cond_proj_dim=time_cond_proj_dim)
        if num_classes is not None:
            self.class_embed = nn.Embedding(num_classes + 1, emb_dim)
        self._build_trunk(cfg, emb_dim, cross_attention_dim)
        self._init_trunk()
        with torch.no_grad():  # DiT's embedder initialisation (the label table first: the RNG order is fixed)
            if num_classes is not None:
                nn.init.normal_(self.class_embed.weight, std=0.02)
            nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
            nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)

    def _build_trunk(self, cfg: dict, emb_dim: int, cross_attention_dim: int | None = None) -> None:
        widths, n = list(cfg["block_out_channels"]), len(cfg["block_out_channels"])
        heads = stage_heads(cfg["num_attention_heads"], n)
        up_layouts = cfg["up_layouts"] if cfg["up_layouts"] is not None else mirrored(cfg["down_layouts"])

        def blocks(layout: str, i: int) -> list[nn.Module]:
            return [ConvBlock(widths[i], emb_dim, cfg["expand_ratio"], cfg["norm_num_groups"]) if letter == "C" else
                    TransformerBlock(widths[i], emb_dim, heads[i], cfg["mlp_ratio"], cross_attention_dim)
                    for letter in layout]

        self.stem = nn.Conv2d(cfg["in_channels"], widths[0], 3, padding=1)
        self.down_stages = nn.ModuleList(
            Stage(blocks(cfg["down_layouts"][i], i), Downsample(widths[i], widths[i + 1]) if i < n - 1 else None)
            for i in range(n))
        self.mid_blocks = nn.ModuleList(blocks(cfg["mid_layout"], n - 1))
        # decoder stages in the order they run: the lowest resolution first
        self.up_stages = nn.ModuleList(
            Stage(blocks(up_layouts[i], i), Upsample(widths[i + 1], widths[i]) if i < n - 1 else None)
            for i in reversed(range(n)))
        self.final_norm = nn.GroupNorm(cfg["norm_num_groups"], widths[0], eps=1e-6, affine=False)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * widths[0]))
        self.conv_out = nn.Conv2d(widths[0], cfg["out_channels"], 3, padding=1)

    @torch.no_grad()
    def _init_trunk(self) -> None:
        """DiT's initialisation where DiT has the part (xavier Linears with zero bias, adaLN-Zero), PyTorch's
        default for the convolutions; cross-attention's output projection zero, so every block starts as
        the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        zero = [self.final_adaLN_modulation[-1]]
        for block in self.blocks():
            zero.append(block.adaLN_modulation[-1])
            if getattr(block, "attn2", None) is not None:
                zero.append(block.attn2.to_out[0])
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def blocks(self) -> list[nn.Module]:
        """Every C / T block in call order: encoder, mid, decoder (genfast.pipelines.blocks reads this list:
        feature inheritance at level "block" treats them as a transformer's blocks)."""
        down = [b for stage in self.down_stages for b in stage.blocks]
        return down + list(self.mid_blocks) + [b for stage in self.up_stages for b in stage.blocks]

    def _run(self, block, x, emb, context, mask, attn_kwargs):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, emb, context, mask, attn_kwargs)
        return block(x, emb, encoder_hidden_states=context, encoder_attention_mask=mask,
                     cross_attention_kwargs=attn_kwargs)

    def _trunk(self, sample, emb, context=None, mask=None, attn_kwargs=None) -> torch.Tensor:
        n = len(self.down_stages)
        _, channels, h, w = sample.shape
        if channels != self.config.in_channels or h % 2 ** (n - 1) or w % 2 ** (n - 1):
            raise ValueError(f"the input must be (B, {self.config.in_channels}, H, W) (in_channels) with H and W "
                             f"multiples of {2 ** (n - 1)} ({n - 1} downsampling steps); got {tuple(sample.shape)}")
        x = self.stem(sample)
        skips = []
        for stage in self.down_stages:
            for block in stage.blocks:
                x = self._run(block, x, emb, context, mask, attn_kwargs)
            skips.append(x)
            if stage.resample is not None:
                x = stage.resample(x)
        for block in self.mid_blocks:
            x = self._run(block, x, emb, context, mask, attn_kwargs)
        for stage, skip in zip(self.up_stages, reversed(skips)):
            if stage.resample is not None:
                x = stage.resample(x)
            x = x + skip
            for block in stage.blocks:
                x = self._run(block, x, emb, context, mask, attn_kwargs)
        shift, scale = self.final_adaLN_modulation(emb)[:, :, None, None].chunk(2, dim=1)
        x = self.final_norm(x) * (1 + scale) + shift
        return self.conv_out(F.silu(x))
