"""EG3D's "hybrid" super-resolution: two StyleGAN2 blocks lift the raw neural render to the output size.

`SuperresolutionHybrid` is size-generic (input resolution, output resolution, block widths); the EG3D
module names are presets of it with the exact layouts of the released models:

=============================  =====  ======  ==============  ======================================
EG3D name                      input  output  block channels  block0
=============================  =====  ======  ==============  ======================================
SuperresolutionHybrid8XDC      128    512     256, 128        upsamples (FFHQ/AFHQ 512 checkpoints)
SuperresolutionHybrid8X        128    512     128, 64         upsamples
SuperresolutionHybrid4X        128    256     128, 64         keeps size ("SynthesisBlockNoUp")
SuperresolutionHybrid2X        64     128     128, 64         keeps size (ShapeNet)
=============================  =====  ======  ==============  ======================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .networks import SynthesisBlock
from .ops import setup_filter

__all__ = [
    "SR_MODULES",
    "SuperresolutionHybrid",
    "SuperresolutionHybrid2X",
    "SuperresolutionHybrid4X",
    "SuperresolutionHybrid8X",
    "SuperresolutionHybrid8XDC",
    "resolve_sr_module",
]


class SuperresolutionHybrid(nn.Module):
    """block0 (maybe x2) -> block1 (x2), both styled by the last w, fed the raw render resized to ``input_resolution``.

    The output resolution must be 2x (block0 keeps the size) or 4x (both blocks upsample) the input.
    """

    def __init__(
        self,
        channels: int,
        img_resolution: int,
        sr_num_fp16_res: int,
        sr_antialias: bool,
        input_resolution: int | None = None,
        block_channels=(256, 128),
        w_dim: int = 512,
        top_resample_filter: bool = False,
        resize_only_smaller: bool = False,
        num_fp16_res: int = 4,
        conv_clamp=None,
        channel_base=None,
        channel_max=None,
        **block_kwargs,
    ):
        super().__init__()
        # num_fp16_res / conv_clamp / channel_base / channel_max arrive through EG3D's sr_kwargs and
        # are ignored by it too; the block widths are fixed per module.
        del num_fp16_res, conv_clamp, channel_base, channel_max
        if input_resolution is None:
            input_resolution = img_resolution // 4
        ratio = img_resolution // input_resolution
        if ratio not in (2, 4) or ratio * input_resolution != img_resolution:
            raise ValueError(f"super-resolution output {img_resolution} must be 2x or 4x its input {input_resolution}")
        c0, c1 = (int(c) for c in block_channels)
        use_fp16 = sr_num_fp16_res > 0
        # EG3D clamps SR activations at 256 when the blocks were configured for fp16; the clamp is part
        # of the trained function, so it stays even though this code runs in float32.
        clamp = 256 if use_fp16 else None
        self.input_resolution = input_resolution
        self.sr_antialias = sr_antialias
        self.resize_only_smaller = resize_only_smaller
        block0_up = 2 if ratio == 4 else 1
        common = dict(w_dim=w_dim, img_channels=3, use_fp16=use_fp16, conv_clamp=clamp, **block_kwargs)
        self.block0 = SynthesisBlock(
            channels, c0, resolution=input_resolution * block0_up, is_last=False, up=block0_up, **common
        )
        self.block1 = SynthesisBlock(c0, c1, resolution=img_resolution, is_last=True, **common)
        if top_resample_filter:
            # Unused by the forward pass, but present in the 8X/4X/2X state dicts.
            self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))

    def _resize(self, t: torch.Tensor) -> torch.Tensor:
        size = t.shape[-1]
        needed = size < self.input_resolution if self.resize_only_smaller else size != self.input_resolution
        if not needed:
            return t
        return F.interpolate(
            t,
            size=(self.input_resolution, self.input_resolution),
            mode="bilinear",
            align_corners=False,
            antialias=self.sr_antialias,
        )

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, **block_kwargs) -> torch.Tensor:
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        x = self._resize(x)
        rgb = self._resize(rgb)
        x, rgb = self.block0(x, rgb, ws, **block_kwargs)
        x, rgb = self.block1(x, rgb, ws, **block_kwargs)
        return rgb


def _preset(name: str, output: int, input_res: int, block_channels, top_filter: bool, only_smaller: bool = False):
    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias, **kwargs):
        if img_resolution != output:
            raise ValueError(f"{name} produces {output}x{output} images, but img_resolution={img_resolution}")
        for key in ("input_resolution", "block_channels", "top_resample_filter", "resize_only_smaller"):
            if key in kwargs:
                raise ValueError(f"{name} has a fixed layout; {key!r} cannot be set (use SuperresolutionHybrid)")
        layout = dict(
            input_resolution=input_res,
            block_channels=block_channels,
            top_resample_filter=top_filter,
            resize_only_smaller=only_smaller,
        )
        SuperresolutionHybrid.__init__(
            self, channels, img_resolution, sr_num_fp16_res, sr_antialias, **layout, **kwargs
        )

    doc = f"EG3D's {name}: {input_res} -> {output}, block channels {block_channels}."
    return type(name, (SuperresolutionHybrid,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


SuperresolutionHybrid8XDC = _preset("SuperresolutionHybrid8XDC", 512, 128, (256, 128), top_filter=False)
SuperresolutionHybrid8X = _preset("SuperresolutionHybrid8X", 512, 128, (128, 64), top_filter=True)
SuperresolutionHybrid4X = _preset("SuperresolutionHybrid4X", 256, 128, (128, 64), top_filter=True, only_smaller=True)
SuperresolutionHybrid2X = _preset("SuperresolutionHybrid2X", 128, 64, (128, 64), top_filter=True)

SR_MODULES: dict[str, type[SuperresolutionHybrid]] = {
    "training.superresolution.SuperresolutionHybrid8XDC": SuperresolutionHybrid8XDC,
    "training.superresolution.SuperresolutionHybrid8X": SuperresolutionHybrid8X,
    "training.superresolution.SuperresolutionHybrid4X": SuperresolutionHybrid4X,
    "training.superresolution.SuperresolutionHybrid2X": SuperresolutionHybrid2X,
    "genfast.SuperresolutionHybrid": SuperresolutionHybrid,
}


def resolve_sr_module(name: str) -> type[SuperresolutionHybrid]:
    if name not in SR_MODULES:
        raise ValueError(f"unsupported superresolution_module {name!r}; supported: {sorted(SR_MODULES)}")
    return SR_MODULES[name]
