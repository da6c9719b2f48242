"""Simulated ("fake") integer weight quantization: each Linear / Conv2d weight is replaced by its
round trip through an N-bit integer grid, so outputs show the quality of that format exactly while
the arithmetic stays in the model's float dtype. It saves neither memory nor time; it is the
reference the packed formats must match.

Written here rather than taken from torchao: torchao's integer configs cover Linear only and
replace the weight by a tensor subclass, while this must also cover convolutions and restore the
original Parameter objects on remove().
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch

from ..api import Handle, claim, register_method
from ..pipelines import denoiser_of

WEIGHT_FORMATS = tuple(f"int{b}" for b in range(2, 9))
# first and last convolutions and the embeddings of time, class and position: small, and where
# rounding hurts most (the normalisations are never quantized: only Linear / Conv2d are)
DEFAULT_SKIP = ("conv_in", "conv_out", "time_embedding.*", "time_embed.*", "add_embedding.*",
                "class_embedding.*", "pos_embed.*", "proj_out")


@dataclass
class QuantConfig:
    weights: str = "int8"  # int2 .. int8
    granularity: str = "channel"  # "channel" (per output channel), "tensor", or "group:N" (N input weights)
    symmetric: bool = True  # symmetric grid around 0, else min/max with a zero point
    skip: tuple[str, ...] = DEFAULT_SKIP  # module names (fnmatch patterns) left in float

    def __post_init__(self):
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        g = re.fullmatch(r"group:(\d+)", str(self.granularity))
        if self.granularity not in ("channel", "tensor") and not (g and int(g.group(1)) >= 2):
            raise ValueError(f"granularity must be 'channel', 'tensor' or 'group:N' with N >= 2, "
                             f"got {self.granularity!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")  # noqa: TRY004 (configs raise ValueError)
        self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)

    @property
    def bits(self) -> int:
        return int(self.weights[3:])

    @property
    def group_size(self) -> int | None:
        return int(self.granularity.split(":")[1]) if self.granularity.startswith("group:") else None


def fake_quantize(weight: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The weight after rounding to cfg's integer grid and back, in its own dtype and shape."""
    w = weight.detach().float()
    if cfg.granularity == "tensor":
        rows = w.reshape(1, -1)
    elif cfg.group_size is None:
        rows = w.reshape(w.shape[0], -1)
    else:
        if w[0].numel() % cfg.group_size:
            raise ValueError(f"granularity {cfg.granularity!r}: a {tuple(w.shape)} weight has {w[0].numel()} "
                             f"inputs per output, not a multiple of {cfg.group_size}; choose a divisor or "
                             f"add the layer to skip")
        rows = w.reshape(-1, cfg.group_size)
    if cfg.symmetric:
        qmax = 2 ** (cfg.bits - 1) - 1
        scale = (rows.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
        q = (rows / scale).round().clamp(-qmax - 1, qmax) * scale
    else:
        levels = 2**cfg.bits - 1
        lo, hi = rows.amin(dim=1, keepdim=True).clamp_max(0), rows.amax(dim=1, keepdim=True).clamp_min(0)
        scale = ((hi - lo) / levels).clamp_min(1e-12)
        zero = (-lo / scale).round()
        q = ((rows / scale).round() + zero).clamp(0, levels).sub(zero) * scale
    return q.reshape(weight.shape).to(weight.dtype)


def quantizable(model: torch.nn.Module, skip: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)]


class QuantizeHandle(Handle):
    def __init__(self, target, config, undo, modules, layers: list[str]):
        super().__init__(target, "quantize", config, undo, modules)
        self.layers = layers

    @property
    def stats(self) -> dict:
        return {"quantized_layers": len(self.layers)}


@register_method("quantize", QuantConfig, "integer weight quantization (int2..int8), simulated", verb="quantize")
def apply(target, config: QuantConfig) -> QuantizeHandle:
    model = target if isinstance(target, torch.nn.Module) else denoiser_of(target)
    layers = quantizable(model, config.skip)
    if not layers:
        raise ValueError(f"no Linear or Conv2d layer of {type(model).__name__} is left to quantize with skip={config.skip}")
    modules = [model] + [m for _, m in layers]
    claim("quantize", modules)
    originals = [(m, m.weight) for _, m in layers]
    new = [torch.nn.Parameter(fake_quantize(w, config), requires_grad=w.requires_grad) for _, w in originals]
    for (m, _), param in zip(originals, new):  # all computed before any is swapped: a bad layer changes nothing
        m.weight = param

    def undo():
        for m, weight in originals:
            m.weight = weight

    return QuantizeHandle(target, config, undo, modules, [name for name, _ in layers])


def quantize(target, config: QuantConfig | None = None, **options) -> QuantizeHandle:
    """Quantize a pipeline's denoiser (or any module) in place; the handle's remove() restores the float weights.

    >>> handle = genfast.quantize(pipe, genfast.QuantConfig(weights="int4", granularity="group:64"))
    """
    if config is not None and options:
        raise ValueError("give a QuantConfig or keyword options, not both")
    if config is None:
        from ..api import method_config

        config = method_config("quantize", options)
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a genfast.QuantConfig, got {type(config).__name__}")
    return apply(target, config)
