"""genfast.quantize against float and against torchao's and optimum-quanto's own quantization, in one run.

(a) genfast-mini (64x64, DDIM, guidance 5): every weight format x granularity (int8..int2 per
    channel and in groups of 64; fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1 per channel;
    mxfp8 / mxfp6 / mxfp4; nvfp4), genfast's int8 with kernel="torchao", and beside them torchao's
    and optimum-quanto's own int8 / int4 on the same UNet. Per row: PSNR / SSIM of the images to
    the fp32 images at the same prompts and seeds, FID[mini-features] against real renders of the
    prompted scenes, prompt accuracy (genfast's evaluator), the denoiser's bytes on disk (each
    backend saved its own way, measured as written: genfast's save_quantized folder; torchao's
    torch.save of the state dict, its documented way; quanto's safetensors + quantization map, what
    its QuantizedDiffusersModel writes), bits per weight (8 x those bytes / the denoiser's
    parameters, scales and unquantized tensors included), what fraction of the weights each
    quantizes, and the latency of the denoising loop as a ratio to fp32 in this same run.
(b) the SD-1.5 UNet architecture (UNet2DConditionModel's defaults, cross-attention 768, 860M
    parameters) with random weights at 256x256: bytes and latency of the same backends (random
    weights: no quality figures).
(c) peak memory, measured: each listed row runs in a fresh process that loads the model (a genfast
    row from its saved folder, which holds no float weights; a torchao / quanto row quantizes the
    fp32 model in that process, which frees the float weights) and runs one denoising step on the
    same batch. Reported: the process's resident memory after loading (glibc's free memory handed
    back first, malloc_trim) and its peak during the call (VmHWM, reset just before the call through
    /proc/self/clear_refs), both in MB above the process before loading anything.

torchao's and quanto's rows are what a diffusers user gets from them: diffusers' TorchAoConfig and
QuantoConfig quantize nn.Linear layers only (25% of genfast-mini's weights, 31% of SD-1.5's); one
quanto row also quantizes Conv2d, called directly with genfast's skip list. torchao's
Int4WeightOnlyConfig does not run on a CPU (its plain layout needs the mslk package, its tile layout
CUDA and bfloat16), so its int4 row is IntxWeightOnlyConfig(int4, group 64), its CPU int4. quanto's
qint4 compiles a C++ extension on first use (about 2 minutes, cached afterwards; not timed).
optimum-quanto is a bench-only dependency: `pip install -e '.[bench]'`.

    python bench/quantization.py [--part mini sd15 memory] [--images 64] [--steps 50] [--guidance 5]
        [--repeats 1] [--sd15-steps 2] [--json rows.json] [--plot quality_vs_bits.png]
    quick check of the bench itself (not figures):
    python bench/quantization.py --quick --json /tmp/q.json --plot /tmp/q.png
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import genfast
from genfast.eval.faithfulness import faithfulness
from genfast.eval.prompt_accuracy import EVAL_STYLE, HELDOUT_SEED, eval_prompts, prompt_accuracy
from genfast.io import atomic_write_text
from genfast.models import asset_path, load_evaluator, load_mini
from genfast.quant.config import DEFAULT_SKIP
from genfast.quant.saving import folder_bytes

# ---------------------------------------------------------------- the rows

@dataclass(frozen=True)
class Variant:
    name: str
    backend: str  # fp32, genfast, torchao, quanto
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


FP32 = Variant("fp32", "fp32")


def genfast_variants(quick: bool) -> list[Variant]:
    grid = []
    for bits in (8, 6, 4, 3, 2) if not quick else (8, 4):
        for gran in ("channel", "group:64") if not quick else (("channel",) if bits == 8 else ("group:64",)):
            grid.append((f"int{bits}", gran))
    floats = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1") if not quick else ("fp8_e4m3",)
    grid += [(f, "channel") for f in floats]
    grid += [(f, None) for f in (("mxfp8", "mxfp6", "mxfp4", "nvfp4") if not quick else ("nvfp4",))]
    rows = [Variant(f"genfast {w}" + (f" {g}" if g else ""), "genfast", dict(weights=w, granularity=g))
            for w, g in grid]
    rows.append(Variant("genfast int8 channel, kernel=torchao", "genfast",
                        dict(weights="int8", granularity="channel", kernel="torchao")))
    return rows


def other_variants(quick: bool) -> list[Variant]:
    rows = [
        Variant("torchao Int8WeightOnly (Linear)", "torchao", dict(config="int8wo", bits=8)),
        Variant("torchao Int8DynActInt8Weight (Linear)", "torchao", dict(config="int8dyn", bits=8)),
        Variant("torchao IntxWeightOnly int4 g64 (Linear)", "torchao", dict(config="int4g64", bits=4)),
        Variant("quanto qint8 (Linear)", "quanto", dict(weights="qint8", convs=False, bits=8)),
        Variant("quanto qint4 (Linear)", "quanto", dict(weights="qint4", convs=False, bits=4)),
        Variant("quanto qint8 (Linear + Conv2d)", "quanto", dict(weights="qint8", convs=True, bits=8)),
        Variant("quanto qint4 (Linear + Conv2d)", "quanto", dict(weights="qint4", convs=True, bits=4)),
    ]
    return [rows[0], rows[3]] if quick else rows


def sd15_variants(quick: bool) -> list[Variant]:
    names = {"genfast int8 channel", "genfast int4 group:64", "genfast fp8_e4m3 channel", "genfast nvfp4",
             "genfast int8 channel, kernel=torchao"}
    rows = [v for v in genfast_variants(False) if v.name in names]
    others = other_variants(False)
    rows += [others[0], others[3], others[4]]
    return [rows[0], rows[-2]] if quick else rows


# rows whose memory part (c) measures, by part
MEMORY_ROWS = {
    "mini": ("fp32", "genfast int8 channel", "genfast int4 group:64", "genfast nvfp4", "torchao Int8WeightOnly (Linear)",
             "quanto qint8 (Linear)"),
    "sd15": ("fp32", "genfast int8 channel", "genfast int4 group:64", "torchao Int8WeightOnly (Linear)",
             "quanto qint8 (Linear)"),
}


# ---------------------------------------------------------------- applying a row to a denoiser

def _torchao_config(name: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return {"int8wo": lambda: Int8WeightOnlyConfig(set_inductor_config=False),
            "int8dyn": lambda: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
            "int4g64": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))}[name]()


def quantize_other(unet: torch.nn.Module, v: Variant) -> None:
    """torchao's / quanto's own quantization of `unet`, in place, with their defaults."""
    if v.backend == "torchao":
        from torchao.quantization import quantize_

        quantize_(unet, _torchao_config(v.options["config"]))  # its default filter: every nn.Linear
        return
    from optimum.quanto import freeze, quantize

    if v.options["convs"]:  # Linear and Conv2d, the layers genfast quantizes
        quantize(unet, weights=v.options["weights"], exclude=list(DEFAULT_SKIP))
    else:  # as diffusers' QuantoConfig does: every nn.Linear
        linears = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
        quantize(unet, weights=v.options["weights"], include=linears)
    freeze(unet)


def apply_variant(pipe, v: Variant):
    """Quantize pipe's UNet as `v` says; returns what puts the fp32 UNet back."""
    if v.backend == "fp32":
        return lambda: None
    if v.backend == "genfast":
        return genfast.quantize(pipe, genfast.QuantConfig(**{k: x for k, x in v.options.items()
                                                             if x is not None})).remove
    original = pipe.unet
    pipe.unet = copy.deepcopy(original)  # the third-party rows work on a copy, put back afterwards
    quantize_other(pipe.unet, v)

    def undo():
        pipe.unet = original

    return undo


def quantized_fraction(unet: torch.nn.Module, v: Variant) -> float:
    """Fraction of the float denoiser's parameters that the row quantizes (weights of the layers it takes)."""
    from genfast.quant.quantize import quantizable

    total = sum(p.numel() for p in unet.parameters())
    if v.backend == "fp32":
        return 0.0
    if v.backend == "genfast" or v.options.get("convs"):  # Linear + Conv2d, genfast's skip list
        return sum(m.weight.numel() for _, m in quantizable(unet, DEFAULT_SKIP)) / total
    return sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear)) / total


def tensor_bytes(t) -> int:
    """Bytes a tensor holds, through tensor subclasses (torchao's, quanto's) to their inner tensors."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) and not hasattr(t.data, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    inner = t.data if isinstance(t, torch.nn.Parameter) else t
    names = inner.__tensor_flatten__()[0]
    return sum(tensor_bytes(getattr(inner, n)) for n in names if isinstance(getattr(inner, n), torch.Tensor))


def denoiser_bytes(pipe16, v: Variant, folder: Path) -> tuple[int | None, str]:
    """(bytes on disk, how written) of the row's denoiser quantized from the fp16 pipeline `pipe16` (as
    diffusers models ship), saved the backend's own way into `folder`."""
    if v.options.get("kernel") == "torchao":  # save_quantized writes genfast's packed codes, not torchao's tensors
        return None, "not saved: layers on torchao's kernels"
    undo = apply_variant(pipe16, v)
    try:
        return save_denoiser(pipe16, v, folder)
    finally:
        undo()


def save_denoiser(pipe, v: Variant, folder: Path) -> tuple[int, str]:
    from safetensors.torch import save_file

    unet = pipe.unet
    if v.backend == "genfast":
        folder.parent.mkdir(parents=True, exist_ok=True)
        genfast.save_quantized(pipe, folder)
        return folder_bytes(folder / "unet"), "save_quantized, unet folder"
    folder.mkdir(parents=True, exist_ok=True)
    if v.backend == "fp32":
        unet.save_pretrained(folder)
        return folder_bytes(folder), "save_pretrained (the fp16 folder)"
    if v.backend == "torchao":
        torch.save(unet.state_dict(), folder / "model.pt")
        return folder_bytes(folder), "torch.save(state_dict)"
    from optimum.quanto import quantization_map

    save_file({k: t.contiguous() for k, t in unet.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "quanto_qmap.json").write_text(json.dumps(quantization_map(unet)))
    return folder_bytes(folder), "safetensors + quantization map"


def timed(pipe, call, repeats: int):
    """(output of the last call, best seconds of `repeats` calls) after a 2-step warm-up call."""
    from feature_inheritance import timed_loop  # bench/ is the script's own folder, so on sys.path

    pipe(**{**call(), "num_inference_steps": 2})  # first-call allocations, quanto's extension build: not timed
    return timed_loop(pipe, call, repeats)


# ---------------------------------------------------------------- (a) genfast-mini

def _real_features(evaluator, n: int) -> np.ndarray:
    """Evaluator features of renders of the scenes the n evaluation prompts describe (as genfast compare)."""
    from genfast.data.shapes import ShapesDataset

    ds = ShapesDataset(n, seed=HELDOUT_SEED, style=EVAL_STYLE)
    real = torch.from_numpy(np.stack([ds.sample(i)[0] for i in range(n)])).permute(0, 3, 1, 2)
    return _features(evaluator, real.float() / 255)


@torch.no_grad()
def _features(evaluator, images: torch.Tensor) -> np.ndarray:
    """FID[mini-features]: the evaluator's embedding of 8-bit images, as genfast compare reads saved PNGs."""
    x = (images * 255).round() / 127.5 - 1
    return torch.cat([evaluator.embed(c) for c in x.split(256)]).double().numpy()


def part_mini(args, tmp: Path) -> list[dict]:
    from cleanfid.fid import fid_from_feats

    pipe = load_mini()
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator()
    prompts = eval_prompts(args.images)
    pos, neg = pipe.encode_prompt(prompts, "cpu", 1, args.guidance > 1.0)
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    real = _real_features(evaluator, args.images)

    def call():
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return dict(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, output_type="latent", generator=gens)

    variants = [FP32, *genfast_variants(args.quick), *other_variants(args.quick)]
    pipe16 = load_mini(dtype=torch.float16)  # bytes are measured on the fp16 model, as pipelines ship
    results, failures = {}, []
    with torch.no_grad():
        for v in tqdm(variants, desc="genfast-mini"):
            try:
                undo = apply_variant(pipe, v)
            except Exception as e:  # another library refusing this model is a finding, not a crash
                if v.backend == "genfast":
                    raise
                failures.append((v.name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                continue
            try:
                latents, secs = timed(pipe, call, args.repeats)
                images = decode(pipe, latents)
            finally:
                undo()
            nbytes, how = denoiser_bytes(pipe16, v, tmp / "mini" / v.slug)
            if not (v.name in MEMORY_ROWS["mini"] and v.backend == "genfast"):  # part (c) loads these again
                _rmtree(tmp / "mini" / v.slug)
            results[v] = dict(images=images, secs=secs, bytes=nbytes, how=how)
    fp16 = results[FP32]["bytes"]
    base = results[FP32]
    rows = []
    for v, r in results.items():
        faith = faithfulness(r["images"], base["images"])
        acc = prompt_accuracy(r["images"] * 2 - 1, prompts, evaluator)
        rows.append({
            "variant": v.name, "backend": v.backend, "options": v.options,
            "quantized_fraction": round(quantized_fraction(pipe.unet, v), 4),
            **_bytes_fields(r["bytes"], r["how"], fp16, n_params),
            "loop_s": round(r["secs"], 2), "latency_vs_fp32": round(r["secs"] / base["secs"], 3),
            "psnr": round(faith["psnr"], 2), "ssim": round(faith["ssim"], 4),
            "fid_mini_vs_real": round(float(fid_from_feats(_features(evaluator, r["images"]), real)), 3),
            "prompt_accuracy": {k: round(a, 4) for k, a in acc.items()},
            "prompt_accuracy_mean": round(float(np.mean(list(acc.values()))), 4),
        })
    print(f"\n(a) genfast-mini ({n_params / 1e6:.1f}M parameters in the UNet), {len(prompts)} held-out prompts in one "
          f"batch, {args.steps} DDIM steps, guidance {args.guidance}, fixed seeds, best of {args.repeats}; "
          f"PSNR/SSIM against the fp32 images (PSNR capped at 100 dB); FID[mini-features] against renders of the "
          f"prompted scenes ({args.images} images in 256-d features: compare rows with each other only); "
          f"MiB: the denoiser on disk, quantized from the fp16 model (the fp32 row: the fp16 folder, "
          f"{fp16 / 2**20:.2f} MiB); latency: the denoising loop against fp32's")
    print_rows(rows)
    for name, why in failures:
        print(f"  {name}: FAILED on this model: {why}")
        rows.append({"variant": name, "backend": next(v.backend for v in variants if v.name == name), "failed": why})
    return rows


def _bytes_fields(nbytes: int | None, how: str, fp16: int, n_params: int) -> dict:
    if nbytes is None:
        return {"bytes": None, "bytes_how": how, "bytes_vs_fp16": None, "bits_per_weight": None}
    return {"bytes": nbytes, "bytes_how": how, "bytes_vs_fp16": round(nbytes / fp16, 4),
            "bits_per_weight": round(8 * nbytes / n_params, 3)}


def _size(r: dict, mib_width: int) -> str:
    if r["bytes"] is None:
        return f"{'-':>{mib_width}} {'-':>6} {'-':>6}"
    return f"{r['bytes'] / 2**20:>{mib_width}.2f} {r['bytes_vs_fp16']:>6.3f} {r['bits_per_weight']:>6.2f}"


def print_rows(rows: list[dict]) -> None:
    w = max(len(r["variant"]) for r in rows)
    print(f"  {'variant':<{w}} {'quant.':>6} {'MiB':>7} {'xfp16':>6} {'bits/w':>6} {'latency':>8} {'PSNR':>6} "
          f"{'SSIM':>6} {'FID':>7} {'shape':>6} {'color':>6} {'mean':>6}")
    for r in rows:
        acc = r["prompt_accuracy"]
        print(f"  {r['variant']:<{w}} {100 * r['quantized_fraction']:>5.0f}% {_size(r, 7)} {r['latency_vs_fp32']:>7.2f}x "
              f"{r['psnr']:>6.2f} {r['ssim']:>6.4f} {r['fid_mini_vs_real']:>7.2f} {100 * acc.get('shape', 0):>5.1f}% "
              f"{100 * acc.get('color', 0):>5.1f}% {100 * r['prompt_accuracy_mean']:>5.1f}%"
              + (f"  ({r['bytes_how']})" if r["bytes"] is None else ""))


def decode(pipe, latents):
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------- (b) the SD-1.5 UNet architecture

def sd15_pipe(small: bool):
    """SD-1.5's UNet from its config with random weights (small: a cut-down one, for --quick); the text
    encoder and autoencoder are small stand-ins that never run in the loop (embeddings given, latents out)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    extra = dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=4, layers_per_block=1) if small else {}
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64, **extra).eval()  # SD-1.5's architecture
    tok = CLIPTokenizer.from_pretrained(asset_path("genfast-mini") / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=32,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_call(steps: int, size: int):
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 77, 768, generator=gen)

    def call():
        return dict(prompt_embeds=pos, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
                    output_type="latent", generator=torch.Generator().manual_seed(0))

    return call


def part_sd15(args, tmp: Path) -> list[dict]:
    pipe = sd15_pipe(args.quick)
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    call = sd15_call(args.sd15_steps, args.sd15_size)
    rows, base_s, fp16 = [], None, None
    # bytes are measured on an fp16 copy of the UNet, as pipelines ship
    pipe16 = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet).half()})
    with torch.no_grad():
        for v in tqdm([FP32, *sd15_variants(args.quick)], desc="SD-1.5 arch"):
            undo = apply_variant(pipe, v)
            try:
                _, secs = timed(pipe, call, 1)
            finally:
                undo()
            nbytes, how = denoiser_bytes(pipe16, v, tmp / "sd15" / v.slug)
            if not (v.name in MEMORY_ROWS["sd15"] and v.backend == "genfast"):  # part (c) loads these again
                _rmtree(tmp / "sd15" / v.slug)
            gc.collect()
            base_s, fp16 = base_s or secs, fp16 or nbytes
            rows.append({"variant": v.name, "backend": v.backend, "options": v.options,
                         "quantized_fraction": round(quantized_fraction(pipe.unet, v), 4),
                         **_bytes_fields(nbytes, how, fp16, n_params), "loop_s": round(secs, 2),
                         "latency_vs_fp32": round(secs / base_s, 3)})
    print(f"\n(b) SD-1.5 UNet architecture ({n_params / 1e6:.0f}M parameters, RANDOM weights"
          f"{', CUT DOWN for --quick' if args.quick else ''}), {args.sd15_size}x{args.sd15_size}, batch 1, guidance 1, "
          f"{args.sd15_steps} DDIM steps; MiB on disk quantized from the fp16 UNet (the fp32 row: the fp16 folder)")
    w = max(len(r["variant"]) for r in rows)
    print(f"  {'variant':<{w}} {'quant.':>6} {'MiB':>9} {'xfp16':>6} {'bits/w':>6} {'loop s':>7} {'latency':>8}")
    for r in rows:
        print(f"  {r['variant']:<{w}} {100 * r['quantized_fraction']:>5.0f}% {_size(r, 9)} {r['loop_s']:>7.2f} "
              f"{r['latency_vs_fp32']:>7.2f}x" + (f"  ({r['bytes_how']})" if r["bytes"] is None else ""))
    return rows


# ---------------------------------------------------------------- (c) peak memory, one process a row

def _status_kb() -> dict:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def _settle() -> int:
    """Resident KB after garbage collection and glibc handing its free memory back."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_kb()["VmRSS"]


def child(spec: dict) -> dict:
    """Runs in a fresh process: load the row's model, run one step, report resident memory in KB."""
    v = Variant(spec["name"], spec["backend"], spec["options"])
    start = _settle()
    with torch.no_grad():
        if spec["kind"] == "mini":
            pipe = genfast.load_pipeline(spec["folder"], dtype=torch.float32) if v.backend == "genfast" \
                else load_mini()
            pipe.set_progress_bar_config(disable=True)
            pos, neg = pipe.encode_prompt(eval_prompts(spec["images"]), "cpu", 1, True)
            kwargs = dict(prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=spec["guidance"],
                          num_inference_steps=1, output_type="latent")
        else:
            pipe = genfast.load_pipeline(spec["folder"], dtype=torch.float32) if v.backend == "genfast" \
                else sd15_pipe(spec["small"])
            kwargs = {**sd15_call(1, spec["size"])(), "num_inference_steps": 1}
        if v.backend in ("torchao", "quanto"):
            quantize_other(pipe.unet, v)
        loaded = _settle()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on
        pipe(**kwargs)
        peak = _status_kb()["VmHWM"]
    return {"loaded_kb": loaded - start, "peak_kb": peak - start}


def part_memory(args, tmp: Path, kinds: list[str]) -> list[dict]:
    rows = []
    every = {v.name: v for v in [FP32, *genfast_variants(False), *other_variants(False)]}
    jobs = [(kind, every[name]) for kind in kinds for name in MEMORY_ROWS[kind]]
    for kind, v in tqdm(jobs, desc="memory"):
        folder = tmp / kind / v.slug
        if v.backend == "genfast" and not folder.is_dir():
            continue  # not in this run's rows (--quick)
        spec = {"kind": kind, "name": v.name, "backend": v.backend, "options": v.options, "folder": str(folder),
                "images": args.images, "guidance": args.guidance, "size": args.sd15_size, "small": args.quick}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            rows.append({"part": kind, "variant": v.name, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        got = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"part": kind, "variant": v.name, "loaded_mib": round(got["loaded_kb"] / 1024, 1),
                     "peak_mib": round(got["peak_kb"] / 1024, 1)})
    print("\n(c) memory, one fresh process a row: MiB above the process before loading, after loading (glibc's free "
          "memory returned) and at the peak of one denoising step on the same batch")
    for kind in kinds:
        mine = [r for r in rows if r["part"] == kind]
        base = next((r for r in mine if r["variant"] == "fp32" and "error" not in r), None)
        w = max((len(r["variant"]) for r in mine), default=10)
        print(f"  {kind}: {'variant':<{w}} {'loaded':>8} {'vs fp32':>8} {'peak':>8} {'vs fp32':>8}")
        for r in mine:
            if "error" in r:
                print(f"  {kind}: {r['variant']:<{w}} FAILED: {r['error']}")
                continue
            rel = {k: f"{r[k] / base[k]:>7.2f}x" if base else " " * 8 for k in ("loaded_mib", "peak_mib")}
            print(f"  {kind}: {r['variant']:<{w}} {r['loaded_mib']:>8.1f} {rel['loaded_mib']} {r['peak_mib']:>8.1f} "
                  f"{rel['peak_mib']}")
    return rows


# ---------------------------------------------------------------- the plot

def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genfast.eval.plots import _atomic_savefig

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    style = {"genfast": "o", "torchao": "x", "quanto": "+"}
    for ax, key, label in ((axes[0], "psnr", "PSNR to the fp32 images (dB)"),
                           (axes[1], "prompt_accuracy_mean", "prompt accuracy (mean over attributes)")):
        for r in rows:
            if "failed" in r:
                continue
            if r["backend"] == "fp32":  # its PSNR is the cap: a line for its accuracy instead
                if key != "psnr":
                    ax.axhline(r[key], color="black", ls="--", lw=0.8, label="fp32")
                continue
            if r["bits_per_weight"] is None:  # not saved (genfast's layers on torchao's kernels)
                continue
            group = r["options"].get("granularity") or ""
            color = {"channel": "tab:blue", "group:64": "tab:orange", "": "tab:green"}.get(group, "tab:gray")
            if r["backend"] != "genfast":
                color = {"torchao": "tab:red", "quanto": "tab:purple", "fp32": "black"}[r["backend"]]
            ax.scatter(r["bits_per_weight"], r[key], marker=style[r["backend"]], color=color, s=40)
            short = r["variant"].removeprefix("genfast ").replace(" group:64", " g64").replace(" channel", "")
            ax.annotate(short, (r["bits_per_weight"], r[key]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("bits per weight: 8 x denoiser bytes on disk / parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("genfast-mini: circles genfast (blue per channel, orange group 64, green MX / NVFP4), x torchao, "
                 "+ quanto; bytes include scales and unquantized tensors (fp16)", fontsize=9)
    try:
        _atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=["mini", "sd15", "memory"], default=["mini", "sd15", "memory"])
    p.add_argument("--images", type=int, default=64, help="genfast-mini: held-out prompts, one image each")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per row (the best counts)")
    p.add_argument("--sd15-steps", type=int, default=2)
    p.add_argument("--sd15-size", type=int, default=256)
    p.add_argument("--quick", action="store_true",
                   help="a check of the bench itself, not figures: 4 images, 4 steps, a few rows, a cut-down SD UNet")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--plot", help="write quality against bits per weight (genfast-mini) to this PNG")
    p.add_argument("--child", help=argparse.SUPPRESS)  # part (c)'s fresh process
    args = p.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # fp16 copies that never run on the CPU, stand-ins without a checker
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.quick:
        args.images, args.steps, args.sd15_steps, args.sd15_size = 4, 4, 1, 64
    if args.plot and "mini" not in args.part:
        p.error("--plot needs --part mini")
    report = {"settings": {k: v for k, v in vars(args).items() if k != "child"}, "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="genfast-bench-quant-") as tmp:
        tmp = Path(tmp)
        if "mini" in args.part:
            report["mini"] = part_mini(args, tmp)
        if "sd15" in args.part:
            report["sd15"] = part_sd15(args, tmp)
        if "memory" in args.part:
            # genfast's rows load the folders parts (a) / (b) saved: without those parts only the others run
            kinds = [k for k in ("mini", "sd15") if k in args.part] or ["mini", "sd15"]
            report["memory"] = part_memory(args, tmp, kinds)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    if args.plot:
        plot(report["mini"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
