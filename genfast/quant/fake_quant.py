"""Fake-quantized weights for quantization-aware training: the float weight trains, the forward sees its rounding.

`fake_quantize(model_or_pipe, QuantConfig(weights="int3"))` puts a torch parametrization on the weight of
every layer `genfast.quantize` would pack with that config (the same `quantizable` selection and skip
list): the layer's forward reads

    fq(W) = decode(encode(W, format, granularity, symmetric))      (genfast.quant.formats)

with a straight-through gradient (dL/dW := dL/dfq(W)), while `W` itself stays a float Parameter an
optimizer updates (`layer.parametrizations.weight.original`). fq(W) is computed by the very functions
`genfast.quantize` encodes and decodes with, so after training `genfast.quantize(model, same config,
kernel="dequantize")` on the trained float weights gives a forward equal to the fake-quantized one,
bit for bit. Quantizing fq(W) again gives the same codes (idempotent), so a fake-quantized weight
saved in float and quantized later converts to the same codes as well.

A weight may also carry a trainable offset, `handle.set_offset(name, fn)`: the forward then reads
fq(W + fn()), the EfficientDM / QALoRA idea of training a low-rank delta inside the quantizer
(genfast.training.qat feeds it peft's LoRA delta).

`handle.remove()` takes the parametrizations off and puts each layer's own Parameter object back,
in its place before the bias, so the module is as it was (with whatever training did to W).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils import parametrize

from ..api import Handle, claim
from ..pipelines import denoiser_of
from .config import QuantConfig
from .formats import Format, decode, encode
from .layers import _weight_first, is_quantized
from .quantize import quantizable

__all__ = ["FakeQuantHandle", "FakeQuantWeight", "fake_quant_weight", "fake_quantize"]

METHOD = "fake_quantize"


def fake_quant_weight(weight: torch.Tensor, fmt: Format, granularity: str | None,
                      symmetric: bool | None) -> torch.Tensor:
    """fq(W): the weight `genfast.quantize` would decode for `weight`, in the weight's dtype (no gradient)."""
    w = weight.detach()
    rows = w.shape[0]
    flat = w.reshape(rows, -1)
    granularity, symmetric = granularity or "channel", bool(symmetric)  # as PackedWeight reads them
    enc = encode(flat, fmt, granularity, symmetric)
    return decode(enc, fmt, granularity, symmetric, flat.shape[1]).reshape(w.shape).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: fq(w) exactly (not w + (fq(w) - w), which rounds differently); backward: the identity."""

    @staticmethod
    def forward(ctx, weight, fmt, granularity, symmetric):
        return fake_quant_weight(weight, fmt, granularity, symmetric)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class FakeQuantWeight(torch.nn.Module):
    """Parametrization: W -> fq(W + offset()) with a straight-through gradient."""

    def __init__(self, fmt: Format, granularity: str | None, symmetric: bool | None):
        super().__init__()
        self.fmt, self.granularity, self.symmetric = fmt, granularity, symmetric
        # a plain attribute, not a submodule: the offset's parameters belong to whoever made it
        self.__dict__["offset"] = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        offset = self.__dict__["offset"]
        if offset is not None:
            weight = weight + offset().to(weight.dtype)
        return _StraightThrough.apply(weight, self.fmt, self.granularity, self.symmetric)


class FakeQuantHandle(Handle):
    """What fake_quantize returns: `layers` (name -> layer), set_offset(), remove()."""

    def __init__(self, target, model, config, undo, layers: dict[str, torch.nn.Module]):
        super().__init__(target, METHOD, config, undo, [model, *layers.values()])
        self.model = model
        self.layers = layers

    def parametrization(self, name: str) -> FakeQuantWeight:
        if name not in self.layers:
            raise KeyError(f"{name!r} is not fake-quantized (fake-quantized layers: {len(self.layers)}, "
                           f"e.g. {next(iter(self.layers))!r})")
        return self.layers[name].parametrizations["weight"][0]

    def set_offset(self, name: str, offset: Callable[[], torch.Tensor] | None) -> None:
        """Layer `name` reads fq(W + offset()) from now on (None: fq(W) again). offset() returns a tensor of
        the weight's shape; its gradient flows straight through the rounding."""
        self.parametrization(name).__dict__["offset"] = offset

    def quantized_weight(self, name: str) -> torch.Tensor:
        """The weight layer `name`'s forward reads now (what genfast.quantize would decode after training)."""
        return self.layers[name].weight.detach()


def fake_quantize(target, config: QuantConfig | None = None, **options) -> FakeQuantHandle:
    """Fake-quantize the weights genfast.quantize(target, config) would pack; returns a handle (remove() undoes it).

    target: a pipeline (its denoiser) or a module. config: a genfast.QuantConfig (or its options as keywords).
    Only weight rounding is simulated: activations and kernel choices have no fake-quantized form and are
    refused.
    """
    if config is not None and options:
        raise ValueError("give a QuantConfig or keyword options, not both")
    if config is None:
        config = QuantConfig(**options)
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a genfast.QuantConfig, got {type(config).__name__}")
    if config.activations is not None:
        raise ValueError(f"activations={config.activations!r}: fake_quantize simulates weight rounding only; drop it")
    if config.kernel == "torchao":
        raise ValueError("kernel='torchao' has no effect on fake-quantized weights (they decode in float); drop it")
    model = target if isinstance(target, torch.nn.Module) else denoiser_of(target)
    layers = quantizable(model, config.skip)
    if not layers:
        raise ValueError(f"no Linear or Conv2d layer of {type(model).__name__} is left to fake-quantize with "
                         f"skip={config.skip}")
    packed = [name for name, layer in layers if is_quantized(layer) or parametrize.is_parametrized(layer, "weight")]
    if packed:
        raise ValueError(f"{len(packed)} layers (first: {packed[0]}) already have a parametrized (e.g. genfast-"
                         f"quantized) weight; remove that first (handle.remove()) and fake-quantize the float model")
    claim(METHOD, [model] + [m for _, m in layers])
    done: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []

    def undo():
        for layer, weight in reversed(done):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            layer._parameters.pop("weight", None)
            layer.weight = weight  # the very Parameter object the layer had
            _weight_first(layer)

    try:
        for _, layer in layers:
            weight = layer.weight
            parametrize.register_parametrization(
                layer, "weight", FakeQuantWeight(config.format, config.granularity, config.symmetric), unsafe=True)
            done.append((layer, weight))
    except BaseException:  # all or nothing
        undo()
        raise
    return FakeQuantHandle(target, model, config, undo, dict(layers))
