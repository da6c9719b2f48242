"""The bit-level scaling sweep (`genfast sweep-bits`): quality against total model bits, per family and size.

For every model x weight format x mode: the pipeline folder is loaded fresh, its denoiser (the DiT-style
transformer, or the VAR transformer) rounded to float16, then quantized -- PTQ: genfast.quantize's round to
nearest; QAT: genfast.training.qat.qat_distill, a quantized student distilled from the fp16 teacher -- and
`num_images` images are sampled for the balanced held-out classes with fixed seeds (genfast.eval.class_quality)
and judged: class accuracy (the embedded evaluator), FID[mini-features] against held-out renders of the same
classes, and PSNR / SSIM to the same model's 16-bit images (same labels and seeds).

16 bits = every denoiser parameter rounded to float16 (the computation stays float32); it is the row with
format "fp16" and mode "none", measured first for every model, since it is each relative quality's reference:

    relative[metric] = metric / the same model's 16-bit metric   (class accuracy: < 1 is worse; FID: > 1 is
                                                                   worse; None where the 16-bit value is 0)

Total model bits (the x axis, the paper's "parameters x bits"), of the denoiser alone -- the VAE / tokenizer
is the same frozen codec in every row of a model and is not counted (its size is recorded per model):

    total_bits = sum over quantized layers of (weight elements x format bits + the bits of its stored scales
                 and zero points, as genfast stores them: float32 scales, uint8 zero points / E8M0 / E4M3
                 block scales) + (every other denoiser parameter, biases of quantized layers included) x 16

The quantized layers are genfast.quantize's choice with its DEFAULT_SKIP (embeddings, first and last layers
stay 16-bit), the same for PTQ and QAT; the 16-bit row is (all parameters) x 16. Weights are quantized per
output channel by default (`granularity`), on genfast's packed path (kernel="dequantize"): its bits are the
ones counted.

Sampling per family: DiT-style pipelines use class_conditional.evaluate_pipeline's defaults (guidance 4,
20 steps, the folder's own scheduler); a VARPipeline the "sampling" its folder's training.json records, else
generators.default_sampling (guidance 4, linear CFG ramp, top-k / top-p scaled from VAR's demo, 112 of 512
codes); `sampling` overrides either. A VAR's QAT gets the sampler's top-k as TopKLD's K.

out_dir gets results.json (rewritten atomically after every row), results.md (the table), scaling.png (a
panel per metric and per relative metric, x = total bits on a log2 axis, a line per model, PTQ solid / QAT
dashed, int o / fp ^), images/<model>/<format>-<mode>/ (the PNGs every metric read) and, with QAT,
qat-data/<model>/ (the model's encoded training data, shared by its QAT rows). Rerunning skips the rows already measured; an
out_dir holding a sweep with other settings (images, granularity, sampling, QAT options, another folder under
the same model name) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.classes import HELDOUT_SEED
from ..io import atomic_write_text
from ..pipelines import denoiser_of
from ..quant import QuantConfig, quantize
from ..quant.formats import FORMATS
from ..quant.layers import is_quantized, stored
from .class_quality import SAMPLE_BATCH, ClassQuality, sample_class_images

__all__ = ["BITS", "FAMILIES", "FP16", "KINDS", "MODES", "format_for", "formats_for", "load_model", "load_rounded",
           "round_to_nearest", "sampling_settings", "sweep_bits", "total_bits"]

FP16 = "fp16"  # the 16-bit row's format name: the weights cast to float16, no quantizer
BITS = (16, 8, 6, 4, 3, 2)
KINDS = ("int", "fp")
MODES = ("ptq", "qat")
FP_FORMATS = {8: "fp8_e4m3", 6: "fp6_e2m3", 4: "fp4_e2m1", 3: "fp3_e2m0", 2: "fp2_e1m0"}
FAMILIES = {"var": "language-style (VAR)", "dit": "diffusion-style (DiT-style)"}
_PIPELINE_CLASS = {"var": "VARPipeline", "dit": "DiTPipeline"}
_SAMPLING_KEYS = {"dit": ("guidance_scale", "num_inference_steps"),
                  "var": ("guidance_scale", "top_k", "top_p", "cfg_schedule")}
_VAR_QAT_FIELDS = ("loss", "topkld_reading", "tail_weight")  # QATConfig fields of token models only
BITS_RULE = ("denoiser only: sum over quantized layers of (weight elements x format bits + stored scale / zero-point "
             "bits) + every other denoiser parameter x 16; the 16-bit row: every parameter x 16")
SIXTEEN_BIT = "every denoiser parameter rounded to float16 (computed in float32); format fp16, mode none"


# ---------------------------------------------------------------- formats

def format_for(bits: int, kind: str) -> str:
    """The weight format of a (bits, kind) cell: int -> int{bits}; fp -> fp8_e4m3, fp6_e2m3, fp4_e2m1, fp3_e2m0,
    fp2_e1m0; 16 bits (either kind) -> "fp16", the float16 row."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"unknown bit width {bits!r}; choose from {', '.join(map(str, BITS))}")
    if bits == 16:
        return FP16
    return f"int{bits}" if kind == "int" else FP_FORMATS[bits]


def formats_for(bits: Sequence[int], kinds: Sequence[str]) -> list[str]:
    """Every (bits, kind) cell's format, each once (16 bits is one row whatever the kind), widest first."""
    out = []
    for b in sorted(set(bits), reverse=True, key=lambda b: b if isinstance(b, int) else -1):
        for kind in kinds:
            name = format_for(b, kind)
            if name not in out:
                out.append(name)
    return out


def _bits_kind(fmt: str) -> tuple[int, str]:
    if fmt == FP16:
        return 16, "fp"
    f = FORMATS[fmt]
    return f.bits, "int" if f.family == "int" else "fp"


# ---------------------------------------------------------------- models

def load_model(family: str, folder: str | os.PathLike):
    """A pipeline folder of `family` ("var": a VARPipeline, "dit": a DiTPipeline), float32, on the CPU."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no pipeline folder at {folder}: expected model_index.json (a folder written by "
                                f"`genfast train-var` or `genfast train-class`)")
    found = json.loads(index.read_text()).get("_class_name")
    if found != _PIPELINE_CLASS[family]:
        raise ValueError(f"{folder} holds a {found}, not the {_PIPELINE_CLASS[family]} a {family!r} model needs: "
                         f"give VARPipeline folders as var models (--var), DiTPipeline folders as dit (--dit)")
    # (genfast's __init__ has imported the backbones: diffusers finds a folder's classes only in imported modules)
    from ..models import load_pipeline

    pipe = load_pipeline(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_settings(family: str, folder: str | os.PathLike, overrides: dict | None = None) -> dict:
    """The pipeline call arguments a model's images are sampled with (see the module's docstring)."""
    from ..pipelines.class_conditional import evaluate_pipeline

    if family == "dit":
        defaults = inspect.signature(evaluate_pipeline).parameters
        settings = {k: defaults[k].default for k in _SAMPLING_KEYS["dit"]}
    else:
        from ..generators import default_sampling

        vocab = json.loads((Path(folder) / "transformer" / "config.json").read_text())["vocab_size"]
        settings = default_sampling(vocab)
        info = Path(folder) / "training.json"
        recorded = json.loads(info.read_text()).get("sampling") if info.is_file() else None
        if isinstance(recorded, dict):
            settings.update({k: v for k, v in recorded.items() if k in settings})
    for key, value in (overrides or {}).items():
        if key not in _SAMPLING_KEYS[family]:
            raise ValueError(f"sampling option {key!r} does not apply to {family} models; they take "
                             f"{', '.join(_SAMPLING_KEYS[family])}")
        settings[key] = value
    return settings


def load_rounded(family: str, folder: str | os.PathLike, device: str = "cpu"):
    """A model as every row of the sweep starts from: the folder loaded in float32 with its denoiser's
    parameters rounded to float16 (the 16-bit row as it is; PTQ and QAT rows quantize it further)."""
    pipe = load_model(family, folder).to(device)
    _round_to_fp16(denoiser_of(pipe))
    return pipe


def round_to_nearest(pipe, fmt: str, granularity: str = "channel"):
    """A PTQ row's quantization of `pipe` (from load_rounded) to format `fmt`, in place: genfast.quantize on
    genfast's packed path, whose bits total_bits counts; the quantize handle."""
    return quantize(pipe, QuantConfig(weights=fmt, kernel="dequantize", **_granularity(fmt, granularity)))


def _fingerprint(folder: Path) -> str:
    """sha256 of the folder's weights and configs: a retrained model in the same folder is another model."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin")):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _round_to_fp16(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.half().float())


# ---------------------------------------------------------------- bits

def total_bits(model: torch.nn.Module, handle=None) -> dict:
    """The denoiser's total bits by the module's rule; handle: the genfast.quantize handle (None: the 16-bit
    row). Returns the total and its parts."""
    params = sum(p.numel() for p in model.parameters())
    if handle is None:
        return {"total_bits": 16 * params, "quantized_layers": 0, "quantized_weights": 0, "code_bits": 0,
                "scale_bits": 0, "other_parameters": params, "other_bits": 16 * params}
    weights = code_bits = scale_bits = 0
    for name, layer in handle.layers.items():
        if not is_quantized(layer):
            raise ValueError(f"layer {name} is not held as genfast's packed codes (torchao's kernels?): the sweep "
                             f"counts the bits of genfast's packing; quantize with kernel='dequantize'")
        plist = layer.parametrizations["weight"]
        packed = plist[0]
        n = packed.rows * packed.cols
        weights += n
        code_bits += n * packed.fmt.bits
        scale_bits += sum(t.numel() * t.element_size() * 8 for f, t in stored(layer).items() if f != "codes")
    other = params  # quantized weights are packed buffers now: every Parameter left is a float one
    return {"total_bits": code_bits + scale_bits + 16 * other, "quantized_layers": len(handle.layers),
            "quantized_weights": weights, "code_bits": code_bits, "scale_bits": scale_bits,
            "other_parameters": other, "other_bits": 16 * other}


# ---------------------------------------------------------------- the sweep

def sweep_bits(models: Sequence[tuple[str, str, str | os.PathLike]], formats: Sequence[str],
               out_dir: str | os.PathLike, modes: Sequence[str] = MODES, num_images: int = 96,
               qat_steps: int | None = None, *, granularity: str = "channel", sampling: dict | None = None,
               qat_options: dict | None = None, device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Measure every (family, name, folder) model x format x mode; returns the results (as results.json).

    formats: names of genfast.quant.formats.FORMATS and/or "fp16" (format_for / formats_for map bits and
    kinds); the 16-bit row is measured for every model whether listed or not. modes: "ptq" and / or "qat".
    num_images: per row (evaluate_pipeline's 96 by default). qat_steps: QATConfig.steps (None: its default);
    qat_options: other QATConfig fields (lora_rank, lr, ...; the loss and TopKLD's options apply to the VAR models,
    DiT-style ones always distil their outputs). sampling: {"dit": {...}, "var": {...}}
    overrides of the sampling settings. device: where models sample and train."""
    models = _check_models(models)
    formats = _check_formats(formats)
    modes = _check_modes(modes)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images must be an integer >= 2 (an FID needs two images), got {num_images!r}")
    QuantConfig(weights="int8", granularity=granularity)  # validates it (kept for the int / fp formats)
    sampling = dict(sampling or {})
    for family in sampling:
        if family not in FAMILIES:
            raise ValueError(f"sampling overrides are per family ({', '.join(FAMILIES)}), got {family!r}")
        if not any(m[0] == family for m in models):
            raise ValueError(f"sampling options for {family} models have no effect: no {family} model is swept")
    qat = None
    if "qat" in modes:
        qat = _qat_settings(qat_steps, qat_options)
    elif qat_options or qat_steps is not None:
        raise ValueError(f"{'qat_options' if qat_options else 'qat_steps'} has no effect without the 'qat' mode: add "
                         f"it or drop them")
    settings = {"num_images": num_images, "seed": HELDOUT_SEED, "sample_batch": SAMPLE_BATCH,
                "labels": "balanced held-out labels (eval_class_labels)", "granularity": granularity,
                "bits_rule": BITS_RULE, "sixteen_bit": SIXTEEN_BIT, **({"qat": qat} if qat else {})}
    resolved = {name: sampling_settings(family, folder, sampling.get(family)) for family, name, folder in models}
    if qat is not None and qat["loss"] == "output" and any(m[0] == "var" for m in models):
        raise ValueError("QAT loss 'output' is for diffusion models, which use it anyway; the qat loss option is the "
                         "VAR models' (topkld, fkl, rkl, js, logit_mse; auto = topkld)")
    if qat is not None and not any(m[0] == "var" for m in models):
        token_only = [k for k in _VAR_QAT_FIELDS if k in (qat_options or {})]
        if token_only:
            raise ValueError(f"qat option {token_only[0]} applies to VAR models only (DiT-style models distil their "
                             f"outputs): with no VAR model it has no effect; drop it")
    for family, name, _ in models:
        if family == "var" and _uses_topkld(qat) and not resolved[name]["top_k"]:
            raise ValueError(f"QAT of {name} distils with TopKLD, whose K is the sampler's top-k, but {name} samples "
                             f"with no top-k (top_k 0): give the sampler's top-k (sampling={{'var': {{'top_k': K}}}}, "
                             f"--var-top-k K) or another QAT loss (qat_options loss, --qat-loss fkl)")
    out = Path(out_dir)
    results = _open(out, settings)
    for family, name, folder in models:
        results["models"][name] = _model_entry(results["models"].get(name), family, name, folder, resolved[name])
    _write(out, results)
    quality = None
    for family, name, folder in models:
        cells = [(FP16, "none")] + [(f, m) for f in formats if f != FP16 for m in modes]
        for fmt, mode in cells:
            if _find(results, name, fmt, mode) is not None:
                log(f"[sweep-bits] {name} {fmt} {mode}: measured before, skipped")
                continue
            quality = quality or ClassQuality(num_images, device=device)
            results.setdefault("reference", {"real_vs_real": quality.floor,
                                             "what": f"{num_images} held-out renders vs {num_images} others"})
            row = _measure(results["models"][name], name, fmt, mode, out, quality, settings, device, log)
            results["rows"].append(row)
            _write(out, results)
    _plot(results, out / "scaling.png")
    return results


def _check_models(models) -> list[tuple[str, str, Path]]:
    checked, names = [], set()
    for entry in models:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise ValueError(f"a model is (family, name, folder), got {entry!r}")
        family, name, folder = entry
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        if name in names:
            raise ValueError(f"two models are named {name!r}: give each a distinct name")
        names.add(name)
        if not (Path(folder) / "model_index.json").is_file():
            raise FileNotFoundError(f"model {name}: no pipeline folder at {folder} (expected model_index.json)")
        checked.append((family, name, Path(folder)))
    if not checked:
        raise ValueError("give at least one model to sweep")
    return checked


def _check_formats(formats) -> list[str]:
    known = (FP16, *FORMATS)
    bad = [f for f in formats if f not in known]
    if bad:
        raise ValueError(f"unknown format {bad[0]!r}; choose from {', '.join(known)}")
    return list(dict.fromkeys(formats))


def _check_modes(modes) -> list[str]:
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}" if bad else
                         f"give at least one mode of {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def _qat_settings(steps: int, options: dict | None) -> dict:
    try:
        from ..training.qat import QATConfig
    except ImportError as err:
        raise ValueError(f"the 'qat' mode needs genfast.training.qat ({err}); sweep with modes=('ptq',)") from None
    options = dict(options or {})
    taken = {"weights", "steps", "granularity", "top_k", "max_minutes", "checkpoint_every"} & set(options)
    if taken:
        raise ValueError(f"qat_options may not set {', '.join(sorted(taken))}: the sweep sets the format, the steps "
                         f"(qat_steps), the granularity, TopKLD's K (the VAR sampler's top-k) and the run control")
    config = QATConfig(weights="int4", **({"steps": steps} if steps is not None else {}), **options)  # validated now
    from dataclasses import asdict

    return {k: v for k, v in asdict(config).items()
            if k not in ("weights", "top_k", "granularity", "max_minutes", "checkpoint_every")}


def _uses_topkld(qat: dict | None) -> bool:
    """Whether a VAR's QAT distils with TopKLD (loss "auto" resolves to it for a token model)."""
    return qat is not None and qat["loss"] in ("auto", "topkld")


def _qat_fields(family: str, qat: dict, sampling: dict) -> dict:
    """QATConfig's fields for a model: the loss and TopKLD's options are a VAR's (K = its sampler's top-k);
    a DiT-style model distils its outputs (loss "auto" = "output")."""
    if family == "var":
        return {**qat, **({"top_k": sampling["top_k"]} if _uses_topkld(qat) else {})}
    return {k: v for k, v in qat.items() if k not in _VAR_QAT_FIELDS}


def _granularity(fmt: str, granularity: str) -> dict:
    """MX / NVFP4 scale fixed blocks: they take no granularity."""
    return {} if fmt == FP16 or FORMATS[fmt].block is not None else {"granularity": granularity}


def _model_entry(old: dict | None, family: str, name: str, folder: Path, sampling: dict) -> dict:
    entry = {"family": family, "folder": str(folder), "fingerprint": _fingerprint(folder), "sampling": sampling}
    if old is not None:
        diff = [k for k in entry if k != "folder" and old.get(k) != entry[k]]
        if diff:
            what = "its weights changed" if "fingerprint" in diff else f"other {', '.join(diff)}"
            raise ValueError(f"model {name!r} was measured before with {what} ({old.get('folder')}): give it "
                             f"another name, or use another output folder")
        entry.update({k: v for k, v in old.items() if k not in entry})
    return entry


def _open(out: Path, settings: dict) -> dict:
    path = out / "results.json"
    if not path.is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and holds no sweep (results.json): give a new or empty folder")
        return {"what": "genfast sweep-bits: class-conditional quality against total model bits", "settings": settings,
                "models": {}, "rows": []}
    results = json.loads(path.read_text())
    old = results.get("settings", {})
    diff = [k for k in settings if k in old and old[k] != settings[k]]
    if diff:
        shown = "; ".join(f"{k}: {old[k]!r} there, {settings[k]!r} now" for k in diff)
        raise ValueError(f"{out} holds a sweep measured with other settings ({shown}): use another output folder, "
                         f"or the same settings to resume it")
    results["settings"] = {**old, **settings}
    return results


def _find(results: dict, name: str, fmt: str, mode: str) -> dict | None:
    return next((r for r in results["rows"] if (r["model"], r["format"], r["mode"]) == (name, fmt, mode)), None)


def _images_dir(out: Path, name: str, fmt: str, mode: str) -> Path:
    return out / "images" / name / f"{fmt}-{mode}"


def _read_images(folder: Path) -> torch.Tensor:
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def _measure(model: dict, name: str, fmt: str, mode: str, out: Path, quality: ClassQuality, settings: dict,
             device: str, log) -> dict:
    from .faithfulness import faithfulness

    t0 = time.perf_counter()
    family, sampling = model["family"], model["sampling"]
    pipe = load_rounded(family, model["folder"], device)
    den = denoiser_of(pipe)
    model.setdefault("parameters", sum(p.numel() for p in den.parameters()))
    model.setdefault("codec_parameters", sum(p.numel() for p in (pipe.vqvae if family == "var" else pipe.vae)
                                             .parameters()))
    extra, handle = {}, None
    if mode == "ptq":
        handle = round_to_nearest(pipe, fmt, settings["granularity"])
    elif mode == "qat":
        from ..training.qat import QATConfig, qat_distill

        # a work folder per row: an interrupted QAT resumes from its checkpoint; gone once the row is measured.
        # The encoded training data are the model's, whatever the format: one cache per model serves every row
        work = out / "qat-work" / name / fmt
        scales = _granularity(fmt, settings["granularity"])
        result = qat_distill(pipe, QATConfig(weights=fmt, **scales, **_qat_fields(family, settings["qat"], sampling)),
                             work_dir=work, data_dir=out / "qat-data" / name)
        handle = result.handle
        extra["qat"] = {"first": result.log[0] if result.log else None, "last": result.log[-1] if result.log
                        else None, "heldout_loss": result.heldout}
    images, labels = sample_class_images(pipe, settings["num_images"], **sampling)
    folder = _images_dir(out, name, fmt, mode)
    measured = quality.measure(images, labels, folder)
    faith = None
    if fmt != FP16:
        faith = faithfulness(images.float() / 255, _read_images(_images_dir(out, name, FP16, "none")).float() / 255)
    if mode == "qat":
        shutil.rmtree(work)
        with contextlib.suppress(OSError):  # the parents too, once empty
            work.parent.rmdir()
            work.parent.parent.rmdir()
    bits, kind = _bits_kind(fmt)
    row = {"model": name, "family": family, "format": fmt, "bits": bits, "kind": kind, "mode": mode,
           **total_bits(den, handle), **measured, "to_16bit": faith, **extra,
           "seconds": round(time.perf_counter() - t0, 2)}
    log(f"[sweep-bits] {name} {fmt} {mode}: {row['total_bits'] / 8e6:.3f} MB, class accuracy "
        f"{100 * row['class_accuracy']['class']:.1f}%, {row['fid']['name']} {row['fid']['value']:.3f}"
        + (f", PSNR to 16-bit {faith['psnr']:.2f} dB" if faith else "") + f" [{row['seconds']:.1f} s]")
    return row


def _relative(results: dict) -> None:
    """relative[metric] = metric / the same model's 16-bit metric, on every row (None where that is 0)."""
    for row in results["rows"]:
        base = _find(results, row["model"], FP16, "none")
        if base is None:
            continue
        pairs = {"class_accuracy": (row["class_accuracy"]["class"], base["class_accuracy"]["class"]),
                 "fid": (row["fid"]["value"], base["fid"]["value"])}
        row["relative"] = {k: (1.0 if row is base else v / b if b else None) for k, (v, b) in pairs.items()}


def _order(results: dict) -> None:
    names = list(results["models"])
    fmt_order = {f: i for i, f in enumerate((FP16, *FORMATS))}
    results["rows"].sort(key=lambda r: (names.index(r["model"]), -r["bits"], r["kind"], fmt_order[r["format"]],
                                        r["mode"]))


def _write(out: Path, results: dict) -> None:
    _relative(results)
    _order(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", _markdown(results))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# genfast sweep-bits\n",
             (f"{s['num_images']} images per row (balanced held-out classes, seed {s['seed']}); weights "
              f"{s['granularity']}-wise; 16 bits: {s['sixteen_bit']}.\n"),
             f"Total bits: {s['bits_rule']}.\n",
             "Relative: metric / the same model's 16-bit metric (accuracy: below 1 is worse; FID: above 1 is worse).\n"]
    if "reference" in results:
        ref = results["reference"]["real_vs_real"]
        lines.append(f"Real vs real {ref['name']}: {ref['value']:.3f} (the floor).\n")
    lines += [("| model | family | params | format | mode | total bits (MB) | class acc | rel. | FID | rel. "
               "| PSNR to 16-bit (dB) | s |"), "|" + "---|" * 12]
    for r in results["rows"]:
        m, rel = results["models"][r["model"]], r.get("relative") or {}
        lines.append(f"| {r['model']} | {r['family']} | {m.get('parameters', '-')} | {r['format']} | {r['mode']} | "
                     f"{r['total_bits'] / 8e6:.4f} | {100 * r['class_accuracy']['class']:.1f}% | "
                     f"{_fmt(rel.get('class_accuracy'), '.3f')} | {r['fid']['value']:.3f} | "
                     f"{_fmt(rel.get('fid'), '.3f')} | {_fmt((r['to_16bit'] or {}).get('psnr'), '.2f')} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    from .plots import _atomic_savefig, _pyplot

    plt = _pyplot()
    def rel(key):
        return lambda r: (r.get("relative") or {}).get(key)

    panels = [("class accuracy", lambda r: r["class_accuracy"]["class"]),
              ("FID[mini-features] (lower is better)", lambda r: r["fid"]["value"]),
              ("PSNR to the 16-bit images (dB)", lambda r: (r["to_16bit"] or {}).get("psnr")),
              ("relative class accuracy (/ 16-bit)", rel("class_accuracy")),
              ("relative FID (/ 16-bit; lower is better)", rel("fid"))]
    fig, grid = plt.subplots(2, 3, figsize=(15, 8.4))
    axes = grid.flat
    names = list(results["models"])
    maps = {"var": plt.get_cmap("Blues"), "dit": plt.get_cmap("Oranges")}
    colours = {}
    for family, cmap in maps.items():
        members = [n for n in names if results["models"][n]["family"] == family]
        for i, n in enumerate(members):
            colours[n] = cmap(0.45 + 0.5 * (i + 1) / len(members))
    for ax, (title, value) in zip(axes, panels):
        for n in names:
            rows = [r for r in results["rows"] if r["model"] == n]
            base = [r for r in rows if r["format"] == FP16]
            for mode, style in (("ptq", "-"), ("qat", "--")):
                for kind, marker in (("int", "o"), ("fp", "^")):
                    quantized = [r for r in rows if r["mode"] == mode and r["kind"] == kind]
                    # each line ends at the model's 16-bit point, the start of every format's line
                    line = sorted(base + quantized, key=lambda r: r["total_bits"]) if quantized else []
                    pts = [(r["total_bits"], value(r)) for r in line if value(r) is not None]
                    if pts:
                        ax.plot(*zip(*pts), style, marker=marker, color=colours[n], markersize=4, linewidth=1.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total model bits (log2)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[n], label=f"{n} ({results['models'][n]['family']})") for n in names]
    handles += [Line2D([], [], color="k", linestyle="-", label="PTQ"), Line2D([], [], color="k", linestyle="--",
                                                                               label="QAT"),
                Line2D([], [], color="k", marker="o", linestyle="", label="int"),
                Line2D([], [], color="k", marker="^", linestyle="", label="fp")]
    legend = grid.flat[-1]
    legend.axis("off")
    legend.legend(handles=handles, loc="center", fontsize=9, frameon=False)
    fig.tight_layout()
    try:
        _atomic_savefig(fig, path)
    finally:
        plt.close(fig)

