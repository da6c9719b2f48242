"""Bits tab: one class and seed through a class-conditional model of each family -- the language-style VAR
(a VARPipeline) and the diffusion-style DiT (a DiTPipeline) -- at 16 bits and at a chosen weight format, the
images side by side with each model's total bits, how far the quantized image is from the 16-bit one
(PSNR) and the time of each call.

The models are made exactly as `genfast sweep-bits` makes its PTQ rows (genfast.eval.sweep_bits): the
folder loaded in float32, every denoiser parameter rounded to float16 (the "16-bit" model), then, for a
lower format, genfast.quantize's round to nearest on genfast's packed path (kernel "dequantize", per output
channel; block formats scale their own blocks). Total bits follow the sweep's rule (sweep_bits.total_bits:
the denoiser alone). Each family samples with the sweep's settings (sweep_bits.sampling_settings). At 16
bits the format is fp16 whatever the kind, and the chosen image is the 16-bit one.

Every (folder, format) is loaded fresh once and kept (DemoModels.shared): the 16-bit model is never
quantized in place, and no kept model is changed after it is made, so sessions share them. A DiTPipeline
call mutates its scheduler, so each call runs on a view with a scheduler of its own (as the Backbones tab
does); a VARPipeline call keeps no state. Cancel reaches the sampling loop through a forward pre-hook on
the denoiser that acts only on its own job's thread (see backbones_tab).

A folder that is not built yet is listed with the command that builds it; the other family still runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from .backbones_tab import built_status, check_class, missing_note, split_built
from .common import (
    MAX_SEED,
    Jobs,
    Tab,
    cancel_hook,
    check_int,
    enlarge,
    fmt_seconds,
    to_pil,
    user_errors,
    with_denoiser,
)

INTRO = ("One class and seed through a model of each family, the language-style VAR and the diffusion-style "
         "DiT, at 16 bits and at the bit width you choose: the images side by side, each model's total bits, "
         "how close the quantized image stays to the 16-bit one, and the time of each call.")
NOTE = "Round to nearest (PTQ) here; QAT results: docs/bits (genfast sweep-bits)"


@dataclass(frozen=True)
class BitsModel:
    """One model the tab shows: its name on the page, its family ("var": a VARPipeline folder, "dit": a
    DiTPipeline folder), the folder, and the command that writes the folder when it is missing."""

    name: str
    family: str
    folder: Path
    command: str


def default_models() -> list[BitsModel]:
    """The embedded models: assets/genfast-var-mini (VAR) and assets/genfast-dit-class (DiT)."""
    from .. import models

    return [BitsModel(name, family, models.ASSETS / folder, models.rebuild_command(folder))
            for name, family, folder in (("VAR", "var", models.VAR_MINI), ("DiT", "dit", models.DIT_CLASS))]


def check_bits(value) -> int:
    """A bit width of the sweep (16, 8, 6, 4, 3, 2; "4" from an API caller counts), else a gr.Error."""
    from ..eval.sweep_bits import BITS

    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in BITS:
        raise gr.Error(f"Bits must be one of {', '.join(map(str, BITS))}, got {value!r}.")
    return int(value)


def check_kind(value) -> str:
    from ..eval.sweep_bits import KINDS

    if value not in KINDS:
        raise gr.Error(f"Kind must be one of {', '.join(map(repr, KINDS))} (integer or floating-point codes), "
                       f"got {value!r}.")
    return value


@dataclass
class Loaded:
    """A model at one format, made once: the pipeline, its settings and its costs."""

    pipe: object  # a VARPipeline or a DiTPipeline, its denoiser fp16-rounded (and quantized below 16 bits)
    parameters: int  # the denoiser's, counted before quantization packs its weights
    bits: dict  # sweep_bits.total_bits of the denoiser at this format
    sampling: dict  # the pipeline call's settings (sweep_bits.sampling_settings)


def load_at(family: str, folder, fmt: str, device) -> Loaded:
    """The folder at format `fmt`, made as sweep-bits makes a PTQ row, warmed up."""
    from ..eval.sweep_bits import FP16, load_rounded, round_to_nearest, sampling_settings, total_bits
    from ..pipelines import denoiser_of

    pipe = load_rounded(family, folder, device)
    den = denoiser_of(pipe)
    parameters = sum(p.numel() for p in den.parameters())  # before quantization packs the weights
    handle = None if fmt == FP16 else round_to_nearest(pipe, fmt)
    loaded = Loaded(pipe, parameters, total_bits(den, handle), sampling_settings(family, folder))
    # a first call pays for allocations no later call pays for: keep that out of the measured time
    warm = dict(loaded.sampling, **({"num_inference_steps": 2} if family == "dit" else {}))
    pipe([0], generator=_generator(pipe, 0), output_type="pt", **warm)
    return loaded


def _generator(pipe, seed: int) -> torch.Generator:
    """As genfast.eval.class_quality samples: a VAR draws its tokens with torch.multinomial, which needs the
    generator on the model's device; DiTPipeline draws its noise on a CPU generator."""
    from ..generators import VARPipeline

    device = pipe.transformer.device if isinstance(pipe, VARPipeline) else "cpu"
    return torch.Generator(device).manual_seed(seed)


def numbers_table(n: dict) -> str:
    rows, fmt = n["models"], n["format"]
    psnr = ["identical (16 bits)" if r["psnr_to_16bit"] is None else f"{r['psnr_to_16bit']:.2f}" for r in rows]
    lines = [
        "| | " + " | ".join(r["name"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| parameters (denoiser) | " + " | ".join(f"{r['parameters']:,}" for r in rows) + " |",
        "| total bits at 16-bit (MB) | " + " | ".join(f"{r['total_bits_16'] / 8e6:.4f}" for r in rows) + " |",
        f"| total bits at {fmt} (MB) | " + " | ".join(f"{r['total_bits'] / 8e6:.4f}" for r in rows) + " |",
        f"| ratio ({fmt} / 16-bit) | " + " | ".join(f"{r['ratio']:.3f}" for r in rows) + " |",
        f"| PSNR of {fmt} to 16-bit (dB) | " + " | ".join(psnr) + " |",
        f"| time 16-bit / {fmt} (this call) | "
        + " | ".join(f"{fmt_seconds(r['seconds_16'])} / {fmt_seconds(r['seconds'])}" for r in rows) + " |",
    ]
    note = missing_note([BitsModel(m["name"], m["family"], Path(m["folder"]), m["command"]) for m in n["missing"]])
    return "\n".join(lines) + f"\n\n{NOTE}" + (f"\n\n{note}" if note else "")


class BitsTab(Tab):
    TAB = "bits"

    def chosen(self) -> list[BitsModel]:
        """The models shown: DemoModels.bits_pipelines when set (tests, other folders), else the embedded ones."""
        chosen = self.models.bits_pipelines
        return list(chosen) if chosen is not None else default_models()

    def load(self, model: BitsModel, fmt: str) -> Loaded:
        folder = Path(model.folder)
        return self.models.shared(f"bits:{model.family}:{folder.resolve()}:{fmt}",
                                  lambda: load_at(model.family, folder, fmt, self.models.device))

    def status(self) -> str:
        """What the page says before a run: which models are there and how to build the others."""
        return built_status(self.chosen(), "No model is built yet.")

    @user_errors
    def run(self, label, seed, bits, kind, request: gr.Request = None,
            progress=gr.Progress()):  # noqa: B008 -- Gradio injects its tracker there
        """([(image, caption)] for the gallery, numbers markdown, numbers)."""
        from ..eval.class_quality import to_uint8
        from ..eval.compare import class_label_ids
        from ..eval.faithfulness import faithfulness
        from ..eval.sweep_bits import FP16, format_for

        label = check_class(label)
        seed = check_int("Seed", seed, 0, MAX_SEED)
        bits, kind = check_bits(bits), check_kind(kind)
        fmt = format_for(bits, kind)
        present, missing = split_built(self.chosen(), "No model of either family is built yet.")
        flag = self.jobs.start(request, self.TAB)
        gallery, rows = [], []
        for model in present:
            results = {}
            for f in dict.fromkeys((FP16, fmt)):  # at 16 bits one model, one call
                Jobs.check(flag)  # Cancel between models too (a load and a quantization take a while)
                progress(None, desc=f"loading {model.name} {f}")
                loaded = self.load(model, f)
                Jobs.check(flag)
                cid = class_label_ids(loaded.pipe, [label])[0]  # the folder's own label table
                results[f] = loaded, *self._sample(loaded, f"{model.name} {f}", cid, seed, flag, progress)
            (base, image16, s16), (quant, image, s) = results[FP16], results[fmt]
            same = fmt == FP16
            psnr = None if same else faithfulness(to_uint8(image[None]).float() / 255,
                                                  to_uint8(image16[None]).float() / 255)["psnr"]
            rows.append({"name": model.name, "family": model.family, "folder": str(model.folder),
                         "parameters": base.parameters, "format": fmt, "total_bits_16": base.bits["total_bits"],
                         "total_bits": quant.bits["total_bits"], "quantized_layers": quant.bits["quantized_layers"],
                         "ratio": quant.bits["total_bits"] / base.bits["total_bits"], "psnr_to_16bit": psnr,
                         "seconds_16": s16, "seconds": s, "sampling": quant.sampling})
            gallery += [(enlarge(to_pil(image16)), f"{model.name} 16-bit"),
                        (enlarge(to_pil(image)), f"{model.name} {fmt}")]
        numbers = {"class": label, "seed": seed, "bits": bits, "kind": kind, "format": fmt, "mode": "ptq",
                   "models": rows, "note": NOTE,
                   "missing": [{"name": m.name, "family": m.family, "folder": str(m.folder), "command": m.command}
                               for m in missing]}
        return gallery, numbers_table(numbers), numbers

    @staticmethod
    def _sample(loaded: Loaded, desc: str, cid: int, seed: int, flag, progress) -> tuple[torch.Tensor, float]:
        """(image (3, H, W) in [0, 1], seconds of the call) of one model at one format for the class id and seed."""
        from ..eval.cost import time_call
        from ..generators import VARPipeline

        pipe = loaded.pipe
        if isinstance(pipe, VARPipeline):  # keeps no state between calls: shared as it is
            view, total = pipe, len(pipe.transformer.patch_nums)
        else:  # its own scheduler (set_timesteps mutates it), the very same denoiser and VAE
            view = with_denoiser(pipe, pipe.transformer, type(pipe.scheduler).from_config(pipe.scheduler.config))
            total = loaded.sampling["num_inference_steps"]
        with cancel_hook(pipe.transformer, flag, progress, desc, total):
            timed, images = time_call(view, lambda: view([cid], generator=_generator(pipe, seed), output_type="pt",
                                                         **loaded.sampling).images)
        return images[0].float().cpu(), timed.call_s

    def build(self) -> None:
        from ..data.classes import class_names
        from ..eval.sweep_bits import BITS, KINDS

        t = self.TAB
        gr.Markdown(INTRO)
        gr.Markdown(self.status, elem_id=f"{t}-status")  # a function: read again at every page load
        with gr.Row():
            with gr.Column(scale=1):
                label = gr.Dropdown(class_names(), value=class_names()[0], label="Class", elem_id=f"{t}-class")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED,
                                     elem_id=f"{t}-seed")
                    bits = gr.Dropdown(list(BITS), value=4, label="Bits", elem_id=f"{t}-bits")
                    kind = gr.Radio(list(KINDS), value="int", label="Kind (16 bits: fp16 either way)",
                                    elem_id=f"{t}-kind")
                run, stop = self.buttons("Sample both families")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="16-bit and chosen bits, each family", elem_id=f"{t}-images",
                                     columns=4, object_fit="contain", format="png", height="auto")
                table, raw = self.numbers()
        # its own queue: it borrows no worker pipeline
        self.wire(run, stop, [label, seed, bits, kind], [gallery, table, raw], concurrency_id=t)
