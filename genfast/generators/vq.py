"""A multi-scale residual VQ tokenizer in the style of VAR's VQVAE (Tian et al., arXiv 2404.02905).

The autoencoder is diffusers' VQModel layout (its Encoder / Decoder blocks, quant_conv and
post_quant_conv); VAR's multi-scale residual quantizer takes the place of VQModel's single-scale
VectorQuantizer. Facts from FoundationVision/VAR `models/quant.py` (own code, nothing copied):

    f = quant_conv(encoder(x))                          # (B, C, h, w), h = w = patch_nums[-1]
    rest = f, f_hat = 0
    for scale k with side s_k (small to large):
        z_k   = nearest codebook rows of area_resize(rest, s_k)     # tokens (B, s_k, s_k)
        h_k   = phi_k(bicubic_resize(embed(z_k), h))                 # no resize at the last scale
        f_hat = f_hat + h_k;  rest = rest - h_k
    x_rec = decoder(post_quant_conv(f_hat))

phi_k is VAR's `Phi`: h * (1 - r) + conv3x3(h) * r with r = quant_resi, the convolutions shared
between scales as in VAR's partially shared mode (scale k uses the one whose tick in
linspace(1/3n, 1 - 1/3n, n) lies nearest k / (K - 1)). The VAR transformer's teacher-forcing input
for scale k + 1 is area_resize(f_hat after scale k, s_{k+1}) (`teacher_forcing_inputs`).

genfast's choices (`vq_config("mini")`): 64x64 images, a factor-8 encoder (four levels), so the last
scale is an 8x8 map, the same grid as the DiT mini's 8x8 patch tokens; scales (1, 2, 3, 4, 6, 8),
130 tokens in all; 512 codebook rows of 16 channels (VAR: 4096 x 32, 256^2 images, factor 16,
ten scales up to 16x16).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.utils import BaseOutput
from torch import nn

__all__ = ["MultiScaleVQModel", "MultiScaleVQOutput", "vq_config"]

VQ_CONFIGS = {
    "mini": dict(
        in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        norm_num_groups=16, latent_channels=16, sample_size=64, vocab_size=512, patch_nums=(1, 2, 3, 4, 6, 8),
        quant_resi=0.5, share_quant_resi=4, beta=0.25,
    ),
}


def vq_config(name: str = "mini") -> dict:
    """Keyword arguments for `MultiScaleVQModel(**config)`; "mini" is genfast's choice (see the module's
    docstring): 64x64 images -> 8x8x16 latents, scales 1..8 (130 tokens), a 512-row codebook."""
    if name not in VQ_CONFIGS:
        raise ValueError(f"unknown tokenizer config {name!r}; known: {', '.join(VQ_CONFIGS)}")
    return dict(VQ_CONFIGS[name])


def check_patch_nums(patch_nums, owner: str) -> tuple[int, ...]:
    """Scale sides, strictly increasing positive ints (shared by the tokenizer and the transformer)."""
    nums = tuple(patch_nums)
    if not nums or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in nums) or \
            any(a >= b for a, b in pairwise(nums)):
        raise ValueError(f"{owner}: patch_nums must be strictly increasing positive ints (scale sides, small to "
                         f"large), got {patch_nums!r}")
    return nums


def _check_config(cfg: dict) -> None:
    levels = len(cfg["block_out_channels"])
    if levels < 1 or len(cfg["down_block_types"]) != levels or len(cfg["up_block_types"]) != levels:
        raise ValueError(f"MultiScaleVQModel: block_out_channels, down_block_types and up_block_types need one entry "
                         f"per level; got {cfg['block_out_channels']}, {cfg['down_block_types']}, "
                         f"{cfg['up_block_types']}")
    nums = check_patch_nums(cfg["patch_nums"], "MultiScaleVQModel")
    latent = cfg["sample_size"] // 2 ** (levels - 1)
    if cfg["sample_size"] % 2 ** (levels - 1) or nums[-1] != latent:
        raise ValueError(f"MultiScaleVQModel: patch_nums[-1] must equal the latent side sample_size / 2^(levels - 1) "
                         f"= {cfg['sample_size']} / {2 ** (levels - 1)}; got patch_nums {nums}")
    if cfg["vocab_size"] < 2:
        raise ValueError(f"MultiScaleVQModel: vocab_size must be at least 2, got {cfg['vocab_size']}")
    if not 0.0 <= cfg["quant_resi"] < 1.0:
        raise ValueError(f"MultiScaleVQModel: quant_resi (phi's conv share) must be in [0, 1), got {cfg['quant_resi']}")
    if cfg["share_quant_resi"] < 1:
        raise ValueError(f"MultiScaleVQModel: share_quant_resi (number of phi convs) must be >= 1, "
                         f"got {cfg['share_quant_resi']}")
    if cfg["beta"] < 0:
        raise ValueError(f"MultiScaleVQModel: beta (commitment weight) must be >= 0, got {cfg['beta']}")
    if any(w % cfg["norm_num_groups"] for w in cfg["block_out_channels"]):
        raise ValueError(f"MultiScaleVQModel: norm_num_groups ({cfg['norm_num_groups']}) must divide every "
                         f"block_out_channels entry, got {cfg['block_out_channels']}")


class Phi(nn.Conv2d):
    """VAR's residual refinement after upsampling: h * (1 - r) + conv3x3(h) * r."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


@dataclass
class MultiScaleVQOutput(BaseOutput):
    """sample: reconstruction in [-1, 1] (straight-through gradients to the encoder); vq_loss: VAR's
    codebook + beta * commitment loss, averaged over scales; tokens: the token maps, small to large."""

    sample: torch.Tensor
    vq_loss: torch.Tensor
    tokens: list[torch.Tensor]


class MultiScaleVQModel(ModelMixin, ConfigMixin):
    """VQModel's autoencoder with VAR's multi-scale residual quantizer (see the module's docstring).

    Images are (B, 3, sample_size, sample_size) in [-1, 1]; the latent is (B, latent_channels, s, s)
    with s = patch_nums[-1]; tokens are a list of LongTensors (B, p, p), one per p in patch_nums.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4,
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (32, 64, 64, 64),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 16,
        latent_channels: int = 16,
        sample_size: int = 64,
        vocab_size: int = 512,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 8),
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        beta: float = 0.25,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        _check_config(dict(self.config))
        self.encoder = Encoder(in_channels=in_channels, out_channels=latent_channels, down_block_types=down_block_types,
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               act_fn=act_fn, norm_num_groups=norm_num_groups, double_z=False,
                               mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.embedding = nn.Embedding(vocab_size, latent_channels)
        # a uniform codebook init on the scale VAR uses (eini < 0); the trainer may re-initialise it from data
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        self.phis = nn.ModuleList(Phi(latent_channels, quant_resi) for _ in range(share_quant_resi)) \
            if quant_resi > 0 else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=out_channels, up_block_types=up_block_types,
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               act_fn=act_fn, norm_num_groups=norm_num_groups,
                               mid_block_add_attention=mid_block_add_attention)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.config.patch_nums)

    # ---- the pieces of the residual pyramid ----
    def _phi(self, k: int, h: torch.Tensor) -> torch.Tensor:
        if self.phis is None:
            return h
        n, last = len(self.phis), len(self.patch_nums) - 1
        ratio = k / last if last else 1.0
        ticks = torch.linspace(1 / (3 * n), 1 - 1 / (3 * n), n) if n > 1 else torch.tensor([0.5])
        return self.phis[int((ticks - ratio).abs().argmin())](h)

    def embed_scale(self, k: int, tokens: torch.Tensor) -> torch.Tensor:
        """Scale k's contribution h_k to the latent: phi_k(bicubic_resize(embed(tokens), s)), (B, C, s, s)."""
        h = self.embedding(tokens.long()).permute(0, 3, 1, 2)
        side = self.patch_nums[-1]
        if h.shape[-1] != side:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self._phi(k, h)

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook row (L2) of every position of z (B, C, p, p) -> (B, p, p)."""
        b, c, p, _ = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.embedding.weight
        dist = flat.square().sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.square().sum(1)
        return dist.argmin(1).view(b, p, p)

    def _check_tokens(self, tokens) -> None:
        if len(tokens) != len(self.patch_nums):
            raise ValueError(f"expected {len(self.patch_nums)} token maps (patch_nums {self.patch_nums}), got {len(tokens)}")
        for t, p in zip(tokens, self.patch_nums):
            if t.ndim != 3 or tuple(t.shape[1:]) != (p, p):
                raise ValueError(f"token maps must be (B, p, p) for p in patch_nums {self.patch_nums}; got "
                                 f"{[tuple(x.shape) for x in tokens]}")

    # ---- public API ----
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The continuous latent f = quant_conv(encoder(images)), (B, C, s, s)."""
        size = self.config.sample_size
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"images must be (B, {self.config.in_channels}, {size}, {size}) in [-1, 1]; "
                             f"got {tuple(images.shape)}")
        return self.quant_conv(self.encoder(images))

    def quantize_latents(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """VAR's residual quantization of a latent: (token maps small to large, f_hat). No gradients."""
        tokens = []
        with torch.no_grad():
            rest, f_hat = f.detach().clone(), torch.zeros_like(f)
            for k, p in enumerate(self.patch_nums):
                z = rest if p == rest.shape[-1] else F.interpolate(rest, size=(p, p), mode="area")
                idx = self._nearest(z)
                h = self.embed_scale(k, idx)
                f_hat, rest = f_hat + h, rest - h
                tokens.append(idx)
        return tokens, f_hat

    @torch.no_grad()
    def encode_to_scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> token maps [(B, p, p) for p in patch_nums]."""
        return self.quantize_latents(self.encode(images))[0]

    def scales_to_latent(self, tokens: list[torch.Tensor], cumulative: bool = False):
        """f_hat = sum_k h_k from token maps; with cumulative, the partial sums after each scale (a list)."""
        self._check_tokens(tokens)
        f_hat, partial = 0, []
        for k, t in enumerate(tokens):
            f_hat = f_hat + self.embed_scale(k, t)
            partial.append(f_hat)
        return partial if cumulative else f_hat

    def decode_latents(self, f_hat: torch.Tensor) -> torch.Tensor:
        """decoder(post_quant_conv(f_hat)): images in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(f_hat))

    def decode_from_scales(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Token maps -> images (B, 3, H, W) in [-1, 1] (not clamped)."""
        return self.decode_latents(self.scales_to_latent(tokens))

    @torch.no_grad()
    def teacher_forcing_inputs(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """The VAR transformer's inputs for scales 1..K-1: area_resize(f_hat after scale k-1, s_k), flattened
        row-major and concatenated, (B, sum_{k>=1} s_k^2, C). (Scale 0's input is the class token.) No
        gradients: the tokenizer is frozen while the transformer trains."""
        partial = self.scales_to_latent(tokens, cumulative=True)
        return torch.cat([self.next_scale_input(f_hat, k + 1) for k, f_hat in enumerate(partial[:-1])], dim=1) \
            if len(partial) > 1 else partial[0].new_zeros(partial[0].shape[0], 0, self.config.latent_channels)

    def next_scale_input(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        """area_resize(f_hat, s_k) as (B, s_k^2, C): scale k's transformer input."""
        p = self.patch_nums[k]
        z = f_hat if p == f_hat.shape[-1] else F.interpolate(f_hat, size=(p, p), mode="area")
        return z.flatten(2).transpose(1, 2)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Training pass: reconstruction with straight-through gradients and VAR's VQ loss
        (mean over scales of ||sg(f_hat_k) - f||^2 * beta + ||f_hat_k - sg(f)||^2)."""
        f = self.encode(sample)
        tokens, _ = self.quantize_latents(f)
        f_hat, loss = 0, f.new_zeros(())
        for k, t in enumerate(tokens):  # rebuilt with gradients to the codebook and phi
            f_hat = f_hat + self.embed_scale(k, t)
            loss = loss + self.config.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
        loss = loss / len(tokens)
        f_st = f + (f_hat - f).detach()  # straight-through to the encoder, as VAR (the codebook learns from vq_loss)
        rec = self.decode_latents(f_st)
        return MultiScaleVQOutput(sample=rec, vq_loss=loss, tokens=tokens) if return_dict else (rec, loss, tokens)
