"""Quantize tab: one prompt and seed through the float denoiser and through the same denoiser with
quantized weights (any genfast format and granularity, optionally quantized activations); the two
images on a slider, PSNR/SSIM of the quantized image to the float one, the bytes per weight the
quantized layers hold, and the denoiser's checkpoint size on disk against the same denoiser in fp16
and fp32.

Checkpoint sizes are measured, not computed: the denoiser is saved with `genfast.save_quantized`
(and in fp16 / fp32 with `save_pretrained`) to a fresh folder under `demo_dir()`, the folder's bytes
counted, the folder deleted. The figures are kept per configuration for the process, so a second run
of the same configuration writes nothing.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from typing import ClassVar

import gradio as gr
import torch
from diffusers import DiffusionPipeline

from .common import (
    SameSeed,
    Tab,
    check_generation,
    demo_dir,
    enlarge,
    fmt_seconds,
    prompt_box,
    sampling_inputs,
    to_pil,
    uint8_pixels,
    user_errors,
)

DEFAULT = "default"  # the granularity QuantConfig picks itself: per channel, or a block format's own blocks
GRANULARITIES = (DEFAULT, "channel", "tensor", "group:32", "group:64", "group:128")
NO_ACTIVATIONS = "none"


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise gr.Error(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}.")
    return value


def quant_config(weights, granularity, activations):
    """The QuantConfig the tab runs (genfast.quantize's defaults otherwise, the kernel included); a gr.Error
    for a choice that is unknown or would do nothing."""
    from ..quant.config import ACTIVATION_FORMATS, QuantConfig
    from ..quant.formats import FORMATS

    weights = check_choice("Weight format", weights, tuple(FORMATS))
    activations = check_choice("Activations", activations, (NO_ACTIVATIONS, *ACTIVATION_FORMATS))
    if not isinstance(granularity, str) or not granularity.strip():
        raise gr.Error(f"Granularity must be '{DEFAULT}', 'channel', 'tensor' or 'group:N', got {granularity!r}.")
    granularity = granularity.strip()
    block = FORMATS[weights].block
    if block is not None and granularity != DEFAULT:
        # QuantConfig refuses it too; here the message names the dropdown's own choice
        raise gr.Error(f"Granularity {granularity!r} has no effect on {weights}: its scales are fixed per {block} "
                       f"weights. Set granularity to '{DEFAULT}'.")
    return QuantConfig(weights=weights, granularity=None if granularity == DEFAULT else granularity,
                       activations=None if activations == NO_ACTIVATIONS else activations)


# ---------------------------------------------------------------- checkpoint sizes


class _DenoiserOnly(DiffusionPipeline):
    """A pipeline holding just the denoiser, so that save_quantized writes its folder and nothing else
    (a text encoder and VAE saved once per configuration would only fill the disk)."""

    _optional_components: ClassVar[list[str]] = ["unet", "transformer"]

    def __init__(self, unet=None, transformer=None):
        super().__init__()
        self.register_modules(unet=unet, transformer=transformer)


def denoiser_name(pipe) -> str:
    from ..pipelines import denoiser_of

    denoiser = denoiser_of(pipe)
    return next(k for k, v in pipe.components.items() if v is denoiser)


def _scratch() -> str:
    return tempfile.mkdtemp(prefix="quantize-", dir=demo_dir())


def float_checkpoint_bytes(denoiser: torch.nn.Module) -> dict[str, int]:
    """Bytes of the denoiser's folder saved with save_pretrained in fp32 and in fp16."""
    from ..quant.saving import folder_bytes

    sizes = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        # a copy cast with float() / half(): ModelMixin.to(dtype) warns about fp32 modules at every cast
        model = denoiser if denoiser.dtype == dtype else \
            (copy.deepcopy(denoiser).float() if dtype == torch.float32 else copy.deepcopy(denoiser).half())
        folder = _scratch()
        try:
            model.save_pretrained(folder)
            sizes[name] = folder_bytes(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return sizes


def quantized_checkpoint_bytes(pipe, config) -> int | None:
    """Bytes of the denoiser's folder as genfast.save_quantized writes it with `config`'s weights (the
    packed codes and scales plus the layers left in float). None for a denoiser not at pipe.unet or
    pipe.transformer. Quantizes the pipe's denoiser for the save and takes it off again."""
    from .. import quantize, save_quantized
    from ..quant.config import QuantConfig
    from ..quant.saving import folder_bytes

    name = denoiser_name(pipe)
    if name not in _DenoiserOnly._optional_components:
        return None
    denoiser = getattr(pipe, name)
    # what is on disk: genfast's packed layout (kernel="dequantize"), weights only (activation scales are not saved)
    saved = QuantConfig(weights=config.weights, granularity=config.granularity, symmetric=config.symmetric,
                        skip=config.skip, kernel="dequantize")
    folder = _scratch()
    handle = quantize(pipe, saved)
    try:
        out = save_quantized(_DenoiserOnly(**{name: denoiser}), f"{folder}/pipeline", handle)
        return folder_bytes(out / name)
    finally:
        handle.remove()
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- numbers


def weight_numbers(handle, denoiser_params: int) -> dict:
    """Bytes the quantized layers hold per weight they stand for, and the share of the denoiser they are.
    denoiser_params: the float denoiser's parameter count (quantized weights are buffers, not parameters)."""
    from ..quant.layers import is_quantized

    stats = handle.stats
    # a packed layer's shape from its parametrization (reading .weight would decode it); torchao's know theirs
    weights = sum(math.prod(layer.parametrizations["weight"][0].shape) if is_quantized(layer) else layer.weight.numel()
                  for layer in handle.layers.values())
    return {"quantized_layers": stats["quantized_layers"], "torchao_layers": stats["torchao_layers"],
            "quantized_weights": weights, "packed_bytes": stats["packed_bytes"],
            "bytes_per_weight": stats["packed_bytes"] / weights, "bits_per_weight": 8 * stats["packed_bytes"] / weights,
            "quantized_share": weights / denoiser_params}


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def numbers_table(n: dict) -> str:
    ck, fp = n["checkpoint_bytes"], n["float_dtype"]
    q = n["quantized"]
    ratio = f" ({ck['fp32'] / ck['quantized']:.1f}x smaller than fp32)" if ck["quantized"] else ""
    torchao = f"; {q['torchao_layers']} layers on torchao's kernels" if q["torchao_layers"] else ""
    return "\n".join([
        f"| | {fp} | {n['label']} |",
        "|---|---|---|",
        f"| latency | {fmt_seconds(n['baseline']['latency_s'])} | {fmt_seconds(q['latency_s'])} |",
        f"| PSNR / SSIM to {fp} | | {n['psnr']:.1f} dB / {n['ssim']:.3f} |",
        (f"| bytes per weight (quantized layers) | {n['float_bytes_per_weight']} | {q['bytes_per_weight']:.3f} "
         f"({q['bits_per_weight']:.2f} bits; {q['quantized_share']:.0%} of the denoiser's weights{torchao}) |"),
        f"| denoiser checkpoint | fp32 {_mb(ck['fp32'])}, fp16 {_mb(ck['fp16'])} | {_mb(ck['quantized'])}{ratio} |",
    ])


class QuantizeTab(Tab):
    TAB = "quantize"

    @user_errors
    def run(self, prompt, seed, steps, guidance, weights, granularity, activations=NO_ACTIVATIONS,
            request: gr.Request = None, progress=gr.Progress()):  # noqa: B008 -- Gradio injects its tracker there
        """((float image, quantized image) for the slider, numbers markdown, numbers)."""
        from .. import quantize
        from ..api import handles_on
        from ..eval.cost import time_call
        from ..eval.faithfulness import faithfulness
        from ..pipelines import denoiser_of

        prompt, seed, steps, guidance = check_generation(prompt, seed, steps, guidance)
        config = quant_config(weights, granularity, activations)  # ValueErrors name the option
        flag = self.jobs.start(request, self.TAB)
        same = SameSeed(prompt, seed, steps, guidance, flag, progress)

        with self.models.worker() as pipe:
            denoiser = denoiser_of(pipe)
            if "quantize" in handles_on(denoiser):
                raise gr.Error("The demo's pipeline is quantized already (loaded from a quantized folder): start "
                               "`genfast demo --pipeline` on a float pipeline to compare formats.")
            float_dtype = str(denoiser.dtype).removeprefix("torch.")
            base, base_images = time_call(pipe, same.call(pipe, f"{float_dtype} baseline"))
            float_sizes = self.models.shared("quantize:checkpoint:float", lambda: float_checkpoint_bytes(denoiser))
            params = sum(p.numel() for p in denoiser.parameters())
            progress(None, desc=f"quantizing to {config.weights}")
            handle = quantize(pipe, config)  # on the pipe: quantized activations calibrate by calling it
            try:
                calibration_s = None
                if config.activations is not None:  # activation scales from one call with the same prompt and seed
                    calibration, _ = time_call(pipe, lambda: handle.prepare(**same.kwargs("calibrating activations")))
                    calibration_s = calibration.call_s
                quant, quant_images = time_call(pipe, same.call(pipe, f"{config.weights}"))
                packed = weight_numbers(handle, params)
            finally:
                handle.remove()
            progress(None, desc="saving the checkpoint")
            key = f"quantize:checkpoint:{config.weights}:{config.granularity}:{config.symmetric}"
            quantized_size = self.models.shared(key, lambda: quantized_checkpoint_bytes(pipe, config))
        faith = faithfulness(uint8_pixels(quant_images), uint8_pixels(base_images))
        block = config.format.block
        label = config.weights + (f" {config.granularity}" if config.granularity else "") + \
            (f" + {config.activations} activations" if config.activations else "")
        numbers = {
            "label": label, "weights": config.weights, "granularity": config.granularity or f"block:{block}",
            "activations": config.activations, "code_bits": config.bits,
            "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
            "float_dtype": float_dtype, "float_bytes_per_weight": denoiser.dtype.itemsize,
            "baseline": {"latency_s": base.call_s},
            "quantized": {"latency_s": quant.call_s, "calibration_s": calibration_s, **packed},
            "checkpoint_bytes": {"quantized": quantized_size, **float_sizes},
            **faith,
        }
        a, b = enlarge(to_pil(base_images[0])), enlarge(to_pil(quant_images[0]))
        return (a, b), numbers_table(numbers), numbers

    @staticmethod
    def granularity_for(weights):
        """The granularity dropdown for a format: block formats have their own blocks, nothing to choose."""
        from ..quant.formats import FORMATS

        fmt = FORMATS.get(weights)
        if fmt is not None and fmt.block is not None:
            return gr.Dropdown(list(GRANULARITIES), value=DEFAULT, interactive=False,
                               info=f"{weights} scales every {fmt.block} weights itself: nothing to choose")
        return gr.Dropdown(interactive=True, info="default: one scale per output channel")

    def build(self) -> None:
        from ..quant.config import ACTIVATION_FORMATS
        from ..quant.formats import FORMATS

        t = self.TAB
        with gr.Row():
            with gr.Column(scale=1):
                prompt = prompt_box(t)
                seed, steps, guidance = sampling_inputs(t)
                with gr.Row():
                    weights = gr.Dropdown(list(FORMATS), value="int4", label="Weight format", elem_id=f"{t}-format")
                    granularity = gr.Dropdown(list(GRANULARITIES), value="group:64", label="Granularity",
                                              info="default: one scale per output channel",
                                              elem_id=f"{t}-granularity")
                    activations = gr.Dropdown([NO_ACTIVATIONS, *ACTIVATION_FORMATS], value=NO_ACTIVATIONS,
                                              label="Activations", elem_id=f"{t}-activations",
                                              info="simulated, calibrated on one call with this prompt")
                run, stop = self.buttons("Run float and quantized")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="float / quantized", elem_id=f"{t}-slider", format="png",
                                        type="pil", buttons=["download"])
                table, raw = self.numbers()
        weights.change(self.granularity_for, weights, granularity, queue=False, api_visibility="private")
        self.wire(run, stop, [prompt, seed, steps, guidance, weights, granularity, activations], [slider, table, raw])
