"""Which quantized layers run on torchao's own kernels (`QuantConfig.kernel`), and moving them there.

* "dequantize": every layer holds genfast's bit-packed codes (`layers.PackedWeight`) and decodes
  them on each call. This saves memory and disk, not time.
* "torchao": the Linear layers whose format torchao has a weight-only config for go through
  torchao's `quantize_` (its tensor subclasses then run `F.linear`); Conv2d layers and formats
  torchao lacks (fp6, fp4, MX; int2..int7 per tensor) stay on genfast's path. torchao quantizes
  those layers itself, from the float weights, in the same format: fp8 and nvfp4 weights decode to
  exactly genfast's values; its integer rounding differs a little (int8: scale amax/127.5 against
  genfast's amax/127), so those outputs are close to the dequantize path's, not equal. Refused
  when no layer can go.
* "auto": torchao where it has something better than decoding on the fly, i.e. on CUDA only:
  tinygemm's int4 matmul (bfloat16 models, groups of 32..256) and the int8 weight-only matmul
  (int8 codes cast inside the matmul, per channel or tensor). Everywhere else auto is "dequantize":
  on the CPU, torchao's weight-only paths cast or decode the codes just as genfast does, so
  auto on the CPU is exactly "dequantize" (no layer is routed at all).

What runs on this machine was checked with torch 2.14.1 and torchao 0.18 on the CPU:
Int8WeightOnlyConfig (row / group / tensor), IntxWeightOnlyConfig (int2..int8, per row or
group, unpacked to one byte a code), Float8WeightOnlyConfig (e4m3 / e5m2, row or tensor) and
NVFP4WeightOnlyConfig run; Int4WeightOnlyConfig does not (its plain layout needs the mslk
package, its tile layout CUDA and bfloat16). Each route is also tried once on a small layer of
the same device and dtype before use, so a kernel a machine lacks is never chosen.

Weight-only configs throughout: torchao's dynamic-activation configs quantize activations per token
at run time, which is not what QuantConfig(activations=...) does (static scales calibrated per
timestep group, applied by genfast's hooks to the inputs of every quantized layer, torchao's
included). A layer on torchao's kernels holds torchao's tensors, not genfast's packed codes: a
checkpoint (save_quantized) is written from kernel="dequantize".
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .formats import parse_granularity
from .layers import packed_nbytes

# tinygemm's group sizes (torchao's Int4WeightOnlyConfig)
_TINYGEMM_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class Route:
    """One torchao config for the Linear layers of a format, and what a layer needs to take it."""

    name: str  # as reports print it
    make: Callable[[], object] = field(compare=False)  # builds the AOBaseConfig
    auto: bool = False  # a real gain over decoding on the fly: "auto" takes it (on CUDA)
    multiple: tuple[int, int] = (1, 1)  # out / in features must be multiples of these
    dtype: torch.dtype | None = None  # the only weight dtype it takes
    cuda: bool = False  # CUDA only


def routes(config, device_type: str) -> list[Route]:
    """torchao's configs for this format, preferred first (empty when torchao has none)."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    fmt = config.format
    group = parse_granularity(config.granularity) if config.granularity is not None else None
    where = "per tensor" if group == 0 else "per channel" if group is None else f"group {group}"
    found = []
    if fmt.family == "int":
        if fmt.bits == 4 and group in _TINYGEMM_GROUPS and device_type == "cuda":
            # tinygemm's grid has a float zero point per group: torchao's int4 rounding, asymmetric
            found.append(Route(f"Int4WeightOnlyConfig(group_size={group}, tile_packed_to_4d)", functools.partial(
                Int4WeightOnlyConfig, group_size=group, int4_packing_format="tile_packed_to_4d",
                set_inductor_config=False), auto=True, multiple=(1, group), dtype=torch.bfloat16, cuda=True))
        if fmt.bits == 8 and config.symmetric:
            gran = PerTensor() if group == 0 else PerRow() if group is None else PerGroup(group)
            # per group, torchao decodes the whole weight before its matmul: nothing gained
            found.append(Route(f"Int8WeightOnlyConfig({where})", functools.partial(
                Int8WeightOnlyConfig, granularity=gran, set_inductor_config=False), auto=group is None or group == 0,
                multiple=(1, group or 1)))
        elif group != 0:  # torchao's intx takes rows or groups, not one scale per tensor
            mapping = MappingType.SYMMETRIC if config.symmetric else MappingType.ASYMMETRIC
            # codes held one per byte and decoded on each call: more memory than genfast's packing
            found.append(Route(f"IntxWeightOnlyConfig(int{fmt.bits}, {where})", functools.partial(
                IntxWeightOnlyConfig, weight_dtype=getattr(torch, f"int{fmt.bits}"),
                granularity=PerAxis(0) if group is None else PerGroup(group), mapping_type=mapping),
                multiple=(1, group or 1)))
    elif fmt.name in ("fp8_e4m3", "fp8_e5m2") and group in (None, 0):
        dtype = torch.float8_e4m3fn if fmt.name == "fp8_e4m3" else torch.float8_e5m2
        # weight-only fp8 decodes before its matmul in torchao too (its fp8 kernels quantize activations)
        found.append(Route(f"Float8WeightOnlyConfig({fmt.name}, {where})", functools.partial(
            Float8WeightOnlyConfig, weight_dtype=dtype, granularity=PerTensor() if group == 0 else PerRow(),
            set_inductor_config=False)))
    elif fmt.name == "nvfp4":
        from torchao.prototype.mx_formats.inference_workflow import NVFP4WeightOnlyConfig

        found.append(Route("NVFP4WeightOnlyConfig", NVFP4WeightOnlyConfig, multiple=(16, 16)))
    return found


@functools.cache
def probe(route: Route, device: str, dtype: torch.dtype) -> str | None:
    """None when the route quantizes and runs a small Linear on this device and dtype, else why not."""
    from torchao.quantization import quantize_

    out_f, in_f = (max(64, m) for m in route.multiple)
    try:
        layer = torch.nn.Linear(in_f, out_f, device=device, dtype=dtype)
        quantize_(torch.nn.Sequential(layer), route.make())
        with torch.no_grad():
            layer(torch.ones(2, in_f, device=device, dtype=dtype))
    except Exception as error:  # noqa: BLE001 -- any failure means: not on this machine, and says why
        return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    return None


def _fits(route: Route, layer: torch.nn.Module, auto: bool) -> str | None:
    """None when `route` can take this layer, else why not."""
    w = layer.weight
    if not isinstance(layer, torch.nn.Linear):
        return f"{type(layer).__name__}: torchao's configs take Linear layers only"
    if auto and not (route.auto and w.device.type == "cuda"):
        return "auto takes torchao only where it has a kernel (CUDA)"
    if route.cuda and w.device.type != "cuda":
        return f"{route.name} runs on CUDA only"
    if route.dtype is not None and w.dtype != route.dtype:
        return f"{route.name} takes {route.dtype} weights, not {w.dtype}"
    if layer.out_features % route.multiple[0] or layer.in_features % route.multiple[1]:
        # torchao's int4 config would leave such a layer in float without a word
        return f"{route.name} needs features in multiples of {route.multiple}, got {tuple(w.shape)}"
    return probe(route, str(w.device), w.dtype)


def plan(layers: list[tuple[str, torch.nn.Module]], config) -> dict[str, Route]:
    """{layer name: the torchao route it takes}; empty for kernel="dequantize" and for "auto" off CUDA.

    kernel="torchao" with no layer that torchao can run raises ValueError, saying why.
    """
    if config.kernel == "dequantize":
        return {}
    if config.kernel == "auto" and not any(m.weight.device.type == "cuda" for _, m in layers):
        return {}  # on the CPU auto is "dequantize", exactly: nothing is routed
    auto = config.kernel == "auto"
    chosen, why = {}, {}
    for name, layer in layers:
        device_type = layer.weight.device.type
        for route in routes(config, device_type):
            reason = _fits(route, layer, auto)
            if reason is None:
                chosen[name] = route
                break
            why.setdefault(reason, name)
    if not chosen and not auto:
        found = "; ".join(f"{reason} (e.g. {name})" for reason, name in list(why.items())[:3])
        if not found:
            at = f" at granularity {config.granularity}" if config.granularity else ""
            found = (f"torchao has no weight-only config for {config.weights}{at} (it has int2..int8 per channel or "
                     f"group, int8 per tensor too; fp8_e4m3 / fp8_e5m2 per channel or tensor; nvfp4)")
        raise ValueError(f"kernel='torchao': no layer can run on torchao's kernels: {found}. Use kernel='dequantize' "
                         f"(genfast's packed weights, every format and Conv2d) or kernel='auto'")
    return chosen


# the instance extra_repr a layer had before torchao set its own (most have none)
_EXTRA_REPR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NONE = object()


def to_torchao(layer: torch.nn.Linear, route: Route) -> None:
    """Quantize one Linear with torchao's quantize_; the caller keeps the float Parameter for from_torchao."""
    from torchao.quantization import quantize_

    before = layer.__dict__.get("extra_repr", _NONE)
    # a throwaway container, so that filter_fn is checked on this one layer only
    quantize_(torch.nn.Sequential(layer), route.make(), filter_fn=lambda m, _: m is layer)
    if not on_torchao(layer):
        raise RuntimeError(f"torchao's {route.name} left a {tuple(layer.weight.shape)} Linear unquantized")
    _EXTRA_REPR[layer] = before


def on_torchao(layer: torch.nn.Module) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(layer._parameters.get("weight"), TorchAOBaseTensor)


def from_torchao(layer: torch.nn.Linear, original: torch.nn.Parameter) -> None:
    """Put the float Parameter object back and take off the repr torchao added."""
    layer.weight = original
    before = _EXTRA_REPR.pop(layer, _NONE)
    layer.__dict__.pop("extra_repr", None)
    if before is not _NONE:
        layer.extra_repr = before


def nbytes(layer: torch.nn.Module) -> int:
    """Bytes a quantized layer's weight holds: genfast's packed tensors or torchao's inner tensors."""
    if not on_torchao(layer):
        return packed_nbytes(layer)
    w = layer.weight
    inner = (getattr(w, n) for n in w.__tensor_flatten__()[0])
    return sum(t.numel() * t.element_size() for t in inner if isinstance(t, torch.Tensor))
