"""`genfast.quantize`: quantize a pipeline's denoiser (or any module) in place; remove() restores it.

Each Linear / Conv2d weight not matched by `skip` becomes bit-packed codes and scales
(`layers.PackedWeight`), decoded on the fly. The float Parameter objects are kept by the handle,
on the CPU, so remove() puts back exactly what was there; a pipeline loaded from a quantized
folder (`genfast.load_pipeline`) holds no float weights at all.
"""

from __future__ import annotations

import fnmatch

import torch

from ..api import Handle, claim, register_method
from ..pipelines import denoiser_of
from . import lora
from .config import QuantConfig
from .kernels import from_torchao, nbytes, on_torchao, plan, to_torchao
from .layers import dequantize_layer, is_quantized, quantize_layer

LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def quantizable(model: torch.nn.Module, skip: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    adapters = lora.adapter_layers(model)  # a LoRA loaded first stays in float over its quantized base
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and id(m) not in adapters
            and not any(fnmatch.fnmatchcase(name, p) for p in skip)]


class QuantizeHandle(Handle):
    def __init__(self, target, model, config, undo, modules, layers: dict[str, torch.nn.Module]):
        def guarded_undo():
            lora.check_no_peft_merge(model, before="remove")  # peft's merge never reached the packed codes
            undo()
            self._lora_detach()

        super().__init__(target, "quantize", config, guarded_undo, modules)
        # peft's merge (pipe.fuse_lora()) cannot reach packed weights: refused loudly while quantized
        self._lora_detach = lora.attach(model)
        self.model = model
        self.layers = layers  # name -> quantized layer
        self.activations = None  # set by genfast.quant.activations when config.activations is given

    @property
    def stats(self) -> dict:
        held = [m for m in self.layers.values() if is_quantized(m) or on_torchao(m)]  # none once removed
        return {"quantized_layers": len(held), "packed_bytes": sum(nbytes(m) for m in held),  # torchao's included
                "torchao_layers": sum(map(on_torchao, held))}

    def prepare(self, **call_kwargs) -> None:
        """Quantized activations calibrate on one call with these arguments; weights need nothing."""
        if self.config.activations is not None:
            self.calibrate(**call_kwargs)

    def calibrate(self, *args, **kwargs):
        """Run the pipeline once to measure activation ranges per timestep group (activations only)."""
        if self.activations is None:
            raise ValueError("calibrate() is for quantized activations (QuantConfig(activations=...))")
        return self.activations.calibrate(self.target, *args, **kwargs)


@register_method("quantize", QuantConfig, "weight quantization: int2..int8, fp8/fp6/fp4, MX and NVFP4 formats, "
                 "bit-packed", verb="quantize")
def apply(target, config: QuantConfig) -> QuantizeHandle:
    model = target if isinstance(target, torch.nn.Module) else denoiser_of(target)
    layers = quantizable(model, config.skip)
    if not layers:
        raise ValueError(f"no Linear or Conv2d layer of {type(model).__name__} is left to quantize with skip={config.skip}")
    # a grouped convolution needs nothing special: its weight (out, in / groups, kh, kw) is quantized
    # per output row like any other, groups / blocks running along the row
    lora.check_no_peft_merge(model, bases=[m for _, m in layers], before="quantize")
    modules = [model] + [m for _, m in layers]
    claim("quantize", modules)
    routes = plan(layers, config)  # config.kernel: the Linear layers torchao runs (none for "dequantize")
    originals: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    try:
        for name, layer in layers:
            weight = layer.weight
            if name in routes:
                to_torchao(layer, routes[name])
            else:
                quantize_layer(layer, config.format, config.granularity, config.symmetric)
            # the float weights wait on the CPU for remove(): a GPU model gets its memory back
            originals.append((layer, weight if weight.device.type == "cpu" else _offload(weight)))
    except BaseException:  # all or nothing, an interrupt included
        for layer, weight in originals:
            _put_back(layer, _restore(weight))
        raise

    def undo():
        if handle.activations is not None:  # the activation hooks come off with the weights
            handle.activations.detach()
        for layer, weight in originals:
            _put_back(layer, _restore(weight))

    handle = QuantizeHandle(target, model, config, undo, modules, dict(layers))
    if config.activations is not None:
        from .activations import attach_activations

        try:
            handle.activations = attach_activations(handle)
        except BaseException:
            handle.remove()
            raise
    return handle


def _put_back(layer: torch.nn.Module, weight: torch.nn.Parameter) -> None:
    (from_torchao if on_torchao(layer) else dequantize_layer)(layer, weight)


def _offload(weight: torch.nn.Parameter):
    kept = (weight, weight.device, weight.detach().to("cpu"))
    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)  # frees the device copy
    return kept


def _restore(kept):
    """The original Parameter object, moved back to its device if it was offloaded."""
    if isinstance(kept, torch.nn.Parameter):
        return kept
    param, device, data = kept
    param.data = data.to(device)
    return param


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
