"""LoRA adapters on a genfast-quantized denoiser: loading works as is; fusing goes through here.

Loading needs nothing: a quantized Linear / Conv2d keeps its class and its `.weight` (decoded from
the packed codes on access), so peft wraps it like any other layer -- `pipe.load_lora_weights(dir)`,
`pipe.unet.add_adapter(LoraConfig(...))`, `set_adapters`, `disable_lora`, `unload_lora_weights` -- and
the adapter runs in float beside the quantized base, as in QLoRA.

Fusing does. peft merges by `base_layer.weight.data += delta`, and for a parametrized weight
`base_layer.weight` is a freshly decoded tensor: the sum lands in a temporary, the packed codes do
not change, and peft marks the adapter merged, so `pipe.fuse_lora()` would silently drop the LoRA.
`fuse_lora(pipe)` here writes `W + delta` through the parametrization (`layer.weight = ...`), which
re-quantizes it in the layer's format (a layer routed to torchao's kernels is quantized again on
its route), then takes the fused adapters off: codes rounded once more cannot give the old ones
back, so there is no unfuse (reload the pipeline instead).
`attach(model)` (installed by genfast.quantize) makes the other path fail loudly: pipe.fuse_lora()
refuses at once, and a forward refuses while peft reports an adapter merged into a quantized layer.

Loading reads each wrapped layer's weight ~20 times (peft checks its device and dtype), so on a
packed layer it decodes ~20 times; `with torch.nn.utils.parametrize.cached(): pipe.load_lora_weights(...)`
decodes each once (about 5x faster on genfast-mini).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from .kernels import on_torchao, plan, to_torchao
from .layers import is_quantized


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def adapter_layers(model: torch.nn.Module) -> set[int]:
    """ids of the layers peft added (lora_A / lora_B / ...): genfast.quantize leaves them in float and
    quantizes the base layer under them, as QLoRA does, whichever of the two came first."""
    return {id(sub) for _, m in _tuner_layers(model) for name in m.adapter_layer_names
            for sub in getattr(m, name).modules()}


def peft_merged_into_quantized(model: torch.nn.Module, bases=None) -> list[str]:
    """Names of peft layers that report an adapter merged into a quantized base layer (a merge that
    did not happen: see the module docstring). `bases`: the layers to count as quantized (default:
    those that are now)."""
    ids = None if bases is None else {id(b) for b in bases}
    return [name for name, m in _tuner_layers(model) if m.merged and
            (is_quantized(m.get_base_layer()) if ids is None else id(m.get_base_layer()) in ids)]


def check_no_peft_merge(model: torch.nn.Module, bases=None, before: str | None = None) -> None:
    """Raise if peft reports an adapter merged into a quantized layer (or into one of `bases`).

    before: None at a forward (the merge left the codes unchanged); "quantize" or "remove" when
    that step is about to run (it would freeze the merge into packed codes, or leave peft's
    record of a merge that never happened on the float weights, which unfuse_lora would then corrupt)."""
    bad = peft_merged_into_quantized(model, bases)
    if not bad:
        return
    where = f"{len(bad)} layers (first: {bad[0]})"
    if before == "quantize":
        raise RuntimeError(f"{where} have a LoRA merged by peft (pipe.fuse_lora()); quantized, the merge could "
                           f"no longer be undone (unfuse_lora cannot reach packed weights). Call "
                           f"pipe.unfuse_lora() first (then quantize and genfast.quant.lora.fuse_lora(pipe)), or "
                           f"pipe.unload_lora_weights() to keep the fused float weights")
    if before == "remove":
        raise RuntimeError(f"{where} are marked as having a LoRA fused by peft, which did not reach the quantized "
                           f"weights; call pipe.unfuse_lora() before removing the quantization")
    raise RuntimeError(
        f"{where} of genfast-quantized weights are marked as having a LoRA fused by peft "
        f"(its merge() / merge_adapter()), but peft's merge cannot reach packed weights and left them "
        f"unchanged: the LoRA would be silently dropped. Call pipe.unfuse_lora(), then "
        f"genfast.quant.lora.fuse_lora(pipe) to fuse into the quantized weights (or keep the LoRA unfused)"
    )


def _holds_packed(model: torch.nn.Module) -> bool:
    return any(is_quantized(m.get_base_layer()) or on_torchao(m.get_base_layer()) for _, m in _tuner_layers(model))


def _refusing_fuse_lora(model, *args, **kwargs):
    """diffusers' ModelMixin.fuse_lora while the model is quantized: refused where an adapter sits on a
    quantized layer (pipe.fuse_lora() calls it), the class's own method otherwise."""
    if _holds_packed(model):
        raise RuntimeError(
            f"{type(model).__name__}.fuse_lora() (what pipe.fuse_lora() calls) cannot fuse into genfast-quantized "
            f"weights: peft's merge writes to a decoded copy, and the LoRA would be silently lost (with "
            f"pipe.unload_lora_weights() after it). Use genfast.quant.lora.fuse_lora(pipe): it quantizes W + delta "
            f"again and takes the adapter off (or keep the LoRA unfused)")
    return type(model).fuse_lora(model, *args, **kwargs)


def attach(model: torch.nn.Module) -> Callable[[], None]:
    """While `model` is quantized, make every peft merge into its quantized layers fail loudly; returns
    the function that undoes this. Installed by genfast.quantize (and by a quantized folder's load).

    * `model.fuse_lora` (diffusers' PeftAdapterMixin, which pipe.fuse_lora() calls, followed by
      pipe.unload_lora_weights() in the usual idiom) refuses at once, naming `fuse_lora` here. This
      shadows the method on the instance: diffusers offers no hook at fuse time, and catching it
      later is too late, as unload_lora_weights() leaves no trace of the lost merge.
    * a forward pre-hook refuses to run while peft reports an adapter merged into a quantized layer
      (peft's own `merge()` / `merge_adapter()`, below diffusers).
    """
    hook = model.register_forward_pre_hook(lambda module, args: check_no_peft_merge(module))
    shadow = callable(getattr(type(model), "fuse_lora", None))
    if shadow:
        model.fuse_lora = types.MethodType(_refusing_fuse_lora, model)

    def detach() -> None:
        hook.remove()
        if shadow:
            model.__dict__.pop("fuse_lora", None)

    return detach


def _active_adapters(tuners) -> list[str]:
    names: dict[str, None] = {}
    for _, m in tuners:
        names.update(dict.fromkeys(m.active_adapters))
    return list(names)


def fuse_lora(target, lora_scale: float = 1.0, adapter_names: list[str] | str | None = None) -> dict:
    """Fuse LoRA adapters into the denoiser's weights, quantized or not, and take them off.

    target: a pipeline (its denoiser is used) or a model. adapter_names: the adapters to fuse
    (default: the active ones); lora_scale multiplies them, as in diffusers' fuse_lora. Each wrapped
    layer's weight becomes W + scale * delta: a quantized layer re-quantizes it in its own format
    (the LoRA is then subject to that format's rounding, like any fine-tuned weight). Other
    components (a text encoder LoRA) are float: diffusers' `pipe.fuse_lora(components=[...])` fuses them.
    Returns {"adapters": [...], "quantized_layers": n, "float_layers": n}.
    """
    from ..pipelines import denoiser_of

    model = target if isinstance(target, torch.nn.Module) else denoiser_of(target)
    if not isinstance(lora_scale, (int, float)) or isinstance(lora_scale, bool):
        raise TypeError(f"lora_scale must be a number, got {lora_scale!r}")
    tuners = _tuner_layers(model)
    if not tuners:
        raise ValueError(f"{type(model).__name__} carries no LoRA adapter to fuse; load one first "
                         f"(pipe.load_lora_weights(...) or model.add_adapter(LoraConfig(...)))")
    merged = [name for name, m in tuners if m.merged]
    if merged:
        raise ValueError(f"{len(merged)} layers (first: {merged[0]}) already have an adapter merged by peft; "
                         f"call pipe.unfuse_lora() first")
    known = {a for _, m in tuners for a in (*m.lora_A, *getattr(m, "lora_embedding_A", {}))}
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names or _active_adapters(tuners))
    if unknown := [a for a in names if a not in known]:
        raise ValueError(f"adapter_names: {unknown} not loaded on {type(model).__name__} (loaded: {sorted(known)})")
    if not names:
        raise ValueError("no adapter is active to fuse: name one in adapter_names")
    for name, m in tuners:
        for a in names:
            if a in getattr(m, "lora_embedding_A", {}):
                raise ValueError(f"{name}: adapter {a!r} adapts an embedding; fuse_lora fuses Linear / Conv "
                                 f"LoRA only")
            if a in m.lora_A and (m.lora_variant.get(a) is not None or m.lora_bias.get(a)):
                raise ValueError(f"{name}: adapter {a!r} is a DoRA / LoRA-with-bias adapter; fuse_lora fuses "
                                 f"plain LoRA only")
    routes = _torchao_routes(model, tuners)  # checked before any weight changes
    counts = {"quantized_layers": 0, "float_layers": 0}
    with torch.no_grad():
        for name, m in tuners:
            present = [a for a in names if a in m.lora_A]
            if not present:
                continue
            base = m.get_base_layer()
            delta = sum(m.get_delta_weight(a) for a in present) * lora_scale
            if is_quantized(base):
                # assigning goes through PackedWeight.right_inverse: W + delta is quantized again
                base.weight = base.weight + delta.to(base.weight.dtype)
                counts["quantized_layers"] += 1
            elif name in routes:
                weight = (base.weight.dequantize() + delta).to(base.weight.dtype)
                base.weight = torch.nn.Parameter(weight, requires_grad=False)
                base.__dict__.pop("extra_repr", None)  # torchao's own, set again by to_torchao
                to_torchao(base, routes[name])
                counts["quantized_layers"] += 1
            else:
                base.weight.data += delta.to(base.weight.dtype)
                counts["float_layers"] += 1
    _take_off(model, names, known)
    return {"adapters": names, **counts}


def _torchao_routes(model: torch.nn.Module, tuners) -> dict:
    """The torchao route of each wrapped layer that genfast.quantize put on torchao's kernels."""
    from ..api import handles_on

    on = [(name, m.get_base_layer()) for name, m in tuners if on_torchao(m.get_base_layer())]
    if not on:
        return {}
    handle = handles_on(model).get("quantize")
    routes = plan(on, handle.config) if handle is not None else {}
    if missing := [name for name, _ in on if name not in routes]:
        raise ValueError(f"{missing[0]} runs on torchao's kernels, but no genfast.quantize handle on "
                         f"{type(model).__name__} says on which route; fuse_lora fuses into layers genfast quantized")
    return routes


def _take_off(model: torch.nn.Module, names: list[str], known: set[str]) -> None:
    """Delete the fused adapters; with none left, put the plain base layers back in the model."""
    from diffusers.utils import recurse_remove_peft_layers
    from diffusers.utils.peft_utils import delete_adapter_layers

    if set(names) == known:
        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):  # as diffusers' unload_lora leaves a model
            del model.peft_config
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = None
        return
    for a in names:
        delete_adapter_layers(model, a)
        if isinstance(getattr(model, "peft_config", None), dict):
            model.peft_config.pop(a, None)
