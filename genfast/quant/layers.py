"""A quantized weight that stays a weight: Linear / Conv2d layers keep their class and `.weight`.

`PackedWeight` is a torch parametrization: the layer stores bit-packed codes and scales
(`parametrizations.weight.original0..`) and `layer.weight` decodes them on access, in the
layer's dtype. Everything that reads `.weight` -- the layer's own forward, peft's LoRA layers,
diffusers' loaders -- keeps working, and assigning `layer.weight = w` re-quantizes `w` (that is
how a LoRA is fused into quantized weights). torch restores the layer's class when the
parametrization is removed.

Written here rather than taken from torchao: torchao's quantized tensors cover Linear only and
a few formats each, while every format here must serve Conv2d too, pack 3- and 6-bit codes, and
save to one checkpoint layout.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from .formats import Encoded, Format, decode, encode, padded_cols
from .pack import pack_codes, unpack_codes

# the tensors a format keeps per layer, in the order of the parametrization's originals
_FIELDS = {"int": ("codes", "scale"), "float": ("codes", "scale"), "mx": ("codes", "scale"),
           "nvfp4": ("codes", "scale", "tensor_scale")}


def fields(fmt: Format, symmetric: bool | None) -> tuple[str, ...]:
    names = _FIELDS[fmt.family]
    return names + ("zero",) if fmt.family == "int" and not symmetric else names


class PackedWeight(torch.nn.Module):
    """weight <-> (packed codes, scale[, tensor_scale | zero]) for one layer."""

    def __init__(self, fmt: Format, granularity: str | None, symmetric: bool | None, shape, dtype: torch.dtype):
        super().__init__()
        self.fmt, self.granularity, self.symmetric = fmt, granularity or "channel", bool(symmetric)
        self.shape, self.dtype = tuple(shape), dtype
        self.rows = self.shape[0]
        self.cols = 1
        for s in self.shape[1:]:
            self.cols *= s
        self.width = padded_cols(fmt, self.cols, self.granularity)
        self.fields = fields(fmt, symmetric)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"a {tuple(weight.shape)} weight cannot replace a {self.shape} quantized weight")
        enc = encode(weight.detach().reshape(self.rows, self.cols), self.fmt, self.granularity, self.symmetric)
        packed = pack_codes(enc.codes, self.fmt.bits)
        return tuple(packed if name == "codes" else getattr(enc, name) for name in self.fields)

    def forward(self, *stored: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(self.fields, stored))
        codes = unpack_codes(parts.pop("codes"), self.fmt.bits, (self.rows, self.width))
        w = decode(Encoded(codes, **parts), self.fmt, self.granularity, self.symmetric, self.cols)
        return w.reshape(self.shape).to(self.dtype)


def quantize_layer(layer: torch.nn.Module, fmt: Format, granularity: str | None, symmetric: bool | None) -> None:
    """Replace layer.weight by its packed form (the float Parameter object is the caller's to keep)."""
    weight = layer.weight
    param = PackedWeight(fmt, granularity, symmetric, weight.shape, weight.dtype)
    # as a buffer, so the packed tensors become buffers too: integer tensors cannot be Parameters
    # that require grad, and the codes are not trained
    del layer.weight
    layer.register_buffer("weight", weight.detach())
    parametrize.register_parametrization(layer, "weight", param, unsafe=True)


def dequantize_layer(layer: torch.nn.Module, original: torch.nn.Parameter | None = None) -> None:
    """Take the parametrization off; put `original` back as the weight (or the decoded weight if None)."""
    decoded = layer.weight.detach() if original is None else None
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    # torch leaves the decoded weight behind as a buffer or Parameter: the caller's weight goes there
    layer._buffers.pop("weight", None)
    layer._parameters.pop("weight", None)
    layer.weight = original if original is not None else torch.nn.Parameter(decoded, requires_grad=False)


def is_quantized(layer: torch.nn.Module) -> bool:
    return parametrize.is_parametrized(layer, "weight") and \
        any(isinstance(p, PackedWeight) for p in layer.parametrizations["weight"])


def stored(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The packed tensors of a quantized layer, by field name (what a checkpoint holds)."""
    plist = layer.parametrizations["weight"]
    return {name: getattr(plist, f"original{i}") for i, name in enumerate(plist[0].fields)}


def packed_nbytes(layer: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in stored(layer).values())
