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
        self.shape = tuple(shape)
        # the dtype the weight decodes to follows model.to(dtype) through this empty buffer
        self.register_buffer("dtype_marker", torch.empty(0, dtype=dtype), persistent=False)
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

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_marker.dtype

    def forward(self, *stored: torch.Tensor) -> torch.Tensor:
        # scales are fp32; a model moved to fp16 / bf16 has cast them along with its other buffers
        parts = {k: v.float() if v.is_floating_point() and k != "codes" else v for k, v in zip(self.fields, stored)}
        codes = unpack_codes(parts.pop("codes"), self.fmt.bits, (self.rows, self.width))
        w = decode(Encoded(codes, **parts), self.fmt, self.granularity, self.symmetric, self.cols)
        return w.reshape(self.shape).to(self.dtype)


def quantize_layer(layer: torch.nn.Module, fmt: Format, granularity: str | None, symmetric: bool | None,
                   stored: tuple[torch.Tensor, ...] | None = None) -> None:
    """Replace layer.weight by its packed form (the float Parameter object is the caller's to keep).

    stored: the packed tensors themselves (a checkpoint being loaded), put in place of encoding the
    weight, which may then be empty (meta).
    """
    weight = layer.weight
    param = PackedWeight(fmt, granularity, symmetric, weight.shape, weight.dtype)
    # as a buffer, so the packed tensors become buffers too: integer tensors cannot be Parameters
    # that require grad, and the codes are not trained
    del layer.weight
    layer.register_buffer("weight", weight.detach())
    if stored is not None:  # torch calls right_inverse once to make the stored tensors: hand them over
        param.right_inverse = lambda _weight: stored
    try:
        parametrize.register_parametrization(layer, "weight", param, unsafe=True)
    except BaseException:  # encoding failed (out of memory, say): the layer keeps its Parameter
        del layer.weight
        layer.weight = weight
        _weight_first(layer)
        raise
    finally:
        if stored is not None:
            del param.right_inverse  # later assignments (LoRA fusing) re-quantize through PackedWeight's own


def dequantize_layer(layer: torch.nn.Module, original: torch.nn.Parameter | None = None) -> None:
    """Take the parametrization off; put `original` back as the weight (or the decoded weight if None)."""
    decoded = layer.weight.detach() if original is None else None
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    # torch leaves the decoded weight behind as a buffer or Parameter: the caller's weight goes there
    layer._buffers.pop("weight", None)
    layer._parameters.pop("weight", None)
    layer.weight = original if original is not None else torch.nn.Parameter(decoded, requires_grad=False)
    _weight_first(layer)


def _weight_first(layer: torch.nn.Module) -> None:
    """Put the weight back in front of the bias, where Linear / Conv2d register it, so that
    parameters() and state_dict() list the layer as they did before quantization."""
    params = layer._parameters
    entries = [("weight", params["weight"])] + [(k, v) for k, v in params.items() if k != "weight"]
    params.clear()
    params.update(entries)


def is_quantized(layer: torch.nn.Module) -> bool:
    return parametrize.is_parametrized(layer, "weight") and \
        any(isinstance(p, PackedWeight) for p in layer.parametrizations["weight"])


def stored(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The packed tensors of a quantized layer, by field name (what a checkpoint holds)."""
    plist = layer.parametrizations["weight"]
    return {name: getattr(plist, f"original{i}") for i, name in enumerate(plist[0].fields)}


def packed_nbytes(layer: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in stored(layer).values())
