"""The efficient backbones against DiT: parameters, FLOPs, how cost grows with tokens, CPU latency and
training-step time, and (when the trained minis are on disk) class accuracy, FID and prompt accuracy.

    python bench/backbones.py [--part counts latency quality t2i] [--repeats 5]
                              [--num-images 192] [--steps N] [--guidance G] [--control DIR]
                              [--out outputs/bench/backbones.json]

The class-conditional minis: lamamba-mini, dit-mini (diffusers' DiT sized to LaMamba's parameters),
ascan-mini (asymmetric: convolutions at 16x16 and 8x8, attention at 4x4) and ascan-mini-symmetric (the
control: the same blocks spread C/T evenly over the stages, equal parameters). All near 2.3M parameters.

counts   FLOPs by genfast.backbones.count_flops: torch's FlopCounterMode on the meta device, one
         multiply-add counted as ONE flop (fvcore's convention, the one the reference figures use:
         LaMamba-XL 45.9 GFLOPs, DiT-XL/2 118.6 at 256x256). XL configs at 256 / 512 / 1024 pixels
         (latents 32 / 64 / 128 through an SD VAE); the minis at 64 / 128 / 256 pixels (latents 16 / 32 /
         64 through genfast-mini's VAE).
latency  the minis' forward pass on this CPU at the three latent sizes, batch 1 and batch 16, median of
         --repeats rounds after a warm-up round; every model and size is called once per round, so load
         hits all alike. Then one training step per mini (batch 64 at 16x16 latents, forward + backward),
         timed the same way. Ratios are to dit-mini.
quality  per class-conditional pipeline folder present (assets/genfast-{dit,lamamba,ascan}-class and the
         symmetric control, --control or outputs/genfast-ascan-symmetric-class): class accuracy of
         --num-images images (genfast.eval.class_quality: balanced held-out labels, evaluate_pipeline's
         seeds, the images as saved PNGs hold them) and FID[mini-features] of those same images against as
         many held-out renders of the same classes; real-vs-real (a second, disjoint set of renders of the
         same classes) is the floor. With fewer images than the 256 feature dimensions FID is regularised (genfast.eval.fid).
t2i      AsCAN's text-to-image mini (AsCANUNet2DConditionModel; assets/genfast-ascan-t2i's when present, else
         ascan_config("t2i-mini") untrained) against genfast-mini's UNet2DConditionModel: parameters,
         GFLOPs per forward on one image and per classifier-free-guidance call (batch 2, 32 text tokens), CPU latency of
         that call at 16x16 latents, interleaved. When assets/genfast-ascan-t2i exists, both
         StableDiffusionPipelines on the same --num-images held-out prompts and seeds (bench/mini_quality.py's:
         image i has seed i; steps 25 and guidance 5 unless given): prompt accuracy, and the latency of
         a one-prompt pipeline call.
Writes a plot of cost (GFLOPs and measured ms) against tokens next to the JSON.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from genfast.io import atomic_write_text, check_output

XL_LATENTS = (32, 64, 128)  # 256, 512, 1024 pixels through an SD VAE (factor 8)
MINI_LATENTS = (16, 32, 64)  # 64, 128, 256 pixels through genfast-mini's VAE (factor 4)
MINI_BATCHES = (1, 16)
TRAIN_BATCH = 64  # the class-conditional recipe's batch
TRAIN_LATENT = 16
T2I_BATCH = 2  # one classifier-free-guidance call: the conditional and unconditional halves
TEXT_TOKENS = 32  # genfast-mini's tokenizer pads to 32
T2I_DEFAULTS = {"steps": 25, "guidance": 5.0}  # bench/mini_quality.py's, genfast-mini's quoted figure
REFERENCE = "dit-mini"
CLASS_FOLDERS = {"dit-mini": "genfast-dit-class", "lamamba-mini": "genfast-lamamba-class",
                 "ascan-mini": "genfast-ascan-class"}
CONTROL = "ascan-mini-symmetric"
DEFAULT_CONTROL = Path("outputs/genfast-ascan-symmetric-class")
T2I_FOLDER = "genfast-ascan-t2i"


@functools.cache
def _models():
    from genfast.backbones import AsCANModel, LaMambaDiffModel, ascan_config, count_params, lamamba_config
    from genfast.pipelines.class_conditional import ClassDiT, dit_config

    lm_cfg = lamamba_config("mini")
    with torch.device("meta"):
        target = count_params(LaMambaDiffModel(**lm_cfg))
    return {"lamamba-mini": (LaMambaDiffModel, lm_cfg), "dit-mini": (ClassDiT, dit_config(params_target=target)),
            "ascan-mini": (AsCANModel, ascan_config("mini")), CONTROL: (AsCANModel, ascan_config("mini-symmetric"))}


def _xl_models():
    from diffusers import DiTTransformer2DModel

    from genfast.backbones import LaMambaDiffModel, lamamba_config

    # diffusers' DiT-XL/2 as convert_dit_to_diffusers.py builds it (28 layers, 16 heads x 72, patch 2, learned sigma)
    dit_xl = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    return {"lamamba-XL": (LaMambaDiffModel, lamamba_config("XL")), "dit-XL/2": (DiTTransformer2DModel, dit_xl)}


def _interleaved(calls: dict, repeats: int) -> dict:
    """Median seconds of each call over `repeats` rounds after one warm-up round; each round calls every
    entry once, in order, so a change in machine load hits all of them alike."""
    times = {key: [] for key in calls}
    for _ in range(repeats + 1):
        for key, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t[1:]) for key, t in times.items()}


def _ratios(values: list[float], reference: list[float]) -> list[float]:
    return [v / r for v, r in zip(values, reference)]


def counts() -> dict:
    from genfast.backbones import build_on_meta, count_flops, count_params

    rows = {}
    for group, sizes in ((_xl_models(), XL_LATENTS), (_models(), MINI_LATENTS)):
        for name, (cls, cfg) in group.items():
            model = build_on_meta(cls, **cfg)
            gflops = [count_flops(model, sample_size=s) for s in sizes]
            rows[name] = {"params": count_params(model), "latents": list(sizes), "batch": 1, "gflops": gflops,
                          "growth_4x_tokens": gflops[1] / gflops[0], "growth_16x_tokens": gflops[2] / gflops[0]}
    for name in _models():
        rows[name][f"gflops_vs_{REFERENCE}"] = _ratios(rows[name]["gflops"], rows[REFERENCE]["gflops"])
    for name, row in rows.items():
        vs = f"; x{row[f'gflops_vs_{REFERENCE}'][0]:.2f} {REFERENCE}'s" if f"gflops_vs_{REFERENCE}" in row else ""
        print(f"{name:21s} {row['params']:>11,d} params; GFLOPs/forward at latents {tuple(row['latents'])}: "
              + ", ".join(f"{g:.3f}" for g in row["gflops"])
              + f"; x{row['growth_4x_tokens']:.2f} for 4x tokens, x{row['growth_16x_tokens']:.2f} for 16x{vs}")
    return rows


def _mini_inputs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from genfast.data.classes import NUM_CLASSES

    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, size, size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen),
            torch.arange(batch) % NUM_CLASSES)


@torch.no_grad()
def _forward_latency(repeats: int) -> dict:
    built = {}
    for name, (cls, cfg) in _models().items():
        for s in MINI_LATENTS:
            torch.manual_seed(0)
            built[name, s] = cls(**{**cfg, "sample_size": s}).eval()
    calls = {}
    for (name, s), model in built.items():
        for b in MINI_BATCHES:
            inputs = _mini_inputs(b, s)
            calls[name, s, b] = lambda model=model, inputs=inputs: model(*inputs)
    med = _interleaved(calls, repeats)
    rows = {}
    for name in _models():
        rows[name] = {}
        for b in MINI_BATCHES:
            secs = [med[name, s, b] for s in MINI_LATENTS]
            rows[name][f"batch_{b}"] = {"seconds": secs, "growth_4x_tokens": secs[1] / secs[0],
                                        "growth_16x_tokens": secs[2] / secs[0]}
    for name in rows:
        for b in MINI_BATCHES:
            row = rows[name][f"batch_{b}"]
            row[f"vs_{REFERENCE}"] = _ratios(row["seconds"], rows[REFERENCE][f"batch_{b}"]["seconds"])
            print(f"{name:21s} batch {b:2d}: CPU s at latents {MINI_LATENTS}: "
                  + ", ".join(f"{m:.4f}" for m in row["seconds"])
                  + f"; x{row['growth_4x_tokens']:.2f} for 4x tokens, x{row['growth_16x_tokens']:.2f} for 16x; "
                  + f"vs {REFERENCE}: " + ", ".join(f"x{r:.2f}" for r in row[f"vs_{REFERENCE}"]))
    return rows


def _train_step_time(repeats: int) -> dict:
    calls = {}
    for name, (cls, cfg) in _models().items():
        torch.manual_seed(0)
        model = cls(**cfg).train()
        x, t, y = _mini_inputs(TRAIN_BATCH, TRAIN_LATENT)

        def step(model=model, x=x, t=t, y=y):
            model.zero_grad(set_to_none=True)
            model(x, t, y).sample.square().mean().backward()  # the loss's form changes no cost worth timing

        calls[name] = step
    med = _interleaved(calls, repeats)
    rows = {name: {"seconds": s, f"vs_{REFERENCE}": s / med[REFERENCE]} for name, s in med.items()}
    for name, row in rows.items():
        print(f"{name:21s} training step (batch {TRAIN_BATCH}, latent {TRAIN_LATENT}, forward + backward): "
              f"{row['seconds']:.3f} s, x{row[f'vs_{REFERENCE}']:.2f} {REFERENCE}'s")
    return rows


def latency(repeats: int) -> dict:
    return {"latents": list(MINI_LATENTS), "repeats": repeats, "statistic": "median after a warm-up round",
            "forward": _forward_latency(repeats),
            "train_step": {"batch": TRAIN_BATCH, "latent": TRAIN_LATENT, "what": "forward + backward, no optimizer",
                           "models": _train_step_time(repeats)}}


def _load(folder: Path):
    import genfast.backbones  # diffusers finds a folder's model classes only in imported modules
    import genfast.pipelines.class_conditional  # noqa: F401
    from genfast.models import load_pipeline

    pipe = load_pipeline(folder, dtype=torch.float32)  # fp16-stored weights run in fp32 on the CPU
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quality(num_images: int, steps: int, guidance: float, control: Path | None) -> dict | None:
    from genfast.models import ASSETS

    folders = {name: ASSETS / sub for name, sub in CLASS_FOLDERS.items()}
    if control is not None:
        folders[CONTROL] = control
    present = {name: f for name, f in folders.items() if (f / "model_index.json").is_file()}
    for name in [n for n in folders if n not in present]:
        print(f"quality: {name} skipped, no pipeline at {folders[name]} (not trained yet)")
    if not present:
        return None
    from genfast.backbones import count_params
    from genfast.data.classes import HELDOUT_SEED
    from genfast.eval.class_quality import ClassQuality, sample_class_images

    settings = {"num_images": num_images, "steps": steps, "guidance": guidance, "seed": HELDOUT_SEED,
                "labels": "balanced held-out labels (every class in turn)", "sampler": "each folder's own"}
    judge = ClassQuality(num_images)
    result = {"settings": settings, "reference": f"{num_images} held-out renders of the same classes",
              "real_vs_real": judge.floor, "models": {}}
    print(f"{'real vs real (floor)':21s} {judge.floor['name']} {judge.floor['value']:.3f}")
    for name, folder in present.items():
        pipe = _load(folder)
        images, labels = sample_class_images(pipe, num_images, guidance_scale=guidance, num_inference_steps=steps)
        measured = judge.measure(images, labels)
        acc, fid = measured["class_accuracy"], measured["fid"]
        result["models"][name] = {"folder": str(folder), "params": count_params(pipe.transformer),
                                  **settings, **measured}
        print(f"{name:21s} class accuracy {100 * acc['class']:5.1f}% (shape {100 * acc['shape']:5.1f}%, "
              f"colour {100 * acc['color']:5.1f}%), {fid['name']} {fid['value']:.3f}  "
              f"[{num_images} images, {steps} steps, guidance {guidance}]")
    return result


def _t2i_denoisers():
    from diffusers import UNet2DConditionModel

    from genfast.backbones import AsCANUNet2DConditionModel, ascan_config
    from genfast.models import ASSETS, MINI, asset_path

    mini = UNet2DConditionModel.from_pretrained(asset_path(MINI) / "unet", torch_dtype=torch.float32,
                                                local_files_only=True)
    trained = ASSETS / T2I_FOLDER / "unet"
    if (trained / "config.json").is_file():
        ascan = AsCANUNet2DConditionModel.from_pretrained(trained, torch_dtype=torch.float32, local_files_only=True)
        source = str(trained)
    else:
        torch.manual_seed(0)
        ascan, source = AsCANUNet2DConditionModel(**ascan_config("t2i-mini")), 'ascan_config("t2i-mini"), untrained'
    return {"ascan-t2i-mini": (ascan.eval(), source), "genfast-mini-unet": (mini.eval(), str(asset_path(MINI) / "unet"))}


@torch.no_grad()
def _t2i_images(pipe, prompts: list[str], steps: int, guidance: float, batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):  # image i has seed i, as bench/mini_quality.py
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        output_type="pt").images * 2 - 1)
    return torch.cat(out)


def t2i(repeats: int, num_images: int, steps: int, guidance: float) -> dict:
    from genfast.backbones import count_flops, count_params

    other = "genfast-mini-unet"
    denoisers = _t2i_denoisers()
    rows = {name: {"model": type(m).__name__, "weights": source, "params": count_params(m),
                   "gflops_per_forward": count_flops(m, batch=1, text_length=TEXT_TOKENS),
                   "gflops_per_cfg_call": count_flops(m, batch=T2I_BATCH, text_length=TEXT_TOKENS)}
            for name, (m, source) in denoisers.items()}
    calls = {}
    gen = torch.Generator().manual_seed(0)
    for name, (model, _) in denoisers.items():
        x = torch.randn(T2I_BATCH, 4, 16, 16, generator=gen)
        text = torch.randn(T2I_BATCH, TEXT_TOKENS, model.config.cross_attention_dim, generator=gen)
        calls[name] = lambda model=model, x=x, text=text: model(x, torch.tensor([500] * T2I_BATCH), text)
    with torch.no_grad():
        med = _interleaved(calls, repeats)
    for name, row in rows.items():
        row["seconds_per_cfg_call"] = med[name]
        row[f"seconds_vs_{other}"] = med[name] / med[other]
        row[f"gflops_vs_{other}"] = row["gflops_per_forward"] / rows[other]["gflops_per_forward"]
        print(f"{name:21s} {row['params']:>11,d} params, {row['gflops_per_forward']:.3f} GFLOPs/forward; one CFG call "
              f"(batch {T2I_BATCH}, latent 16, {TEXT_TOKENS} text tokens) {med[name]:.4f} s, "
              f"x{row[f'seconds_vs_{other}']:.2f} {other}'s  [{row['weights']}]")
    result = {"latent": 16, "batch": T2I_BATCH, "text_tokens": TEXT_TOKENS, "repeats": repeats,
              "statistic": "median after a warm-up round", "denoisers": rows}
    result["pipelines"] = _t2i_pipelines(repeats, num_images, steps, guidance)
    return result


def _t2i_pipelines(repeats: int, num_images: int, steps: int, guidance: float) -> dict | None:
    from genfast.models import ASSETS, load_evaluator, load_mini

    folder = ASSETS / T2I_FOLDER
    if not (folder / "model_index.json").is_file():
        print(f"t2i: prompt accuracy skipped, no pipeline at {folder} (not trained yet)")
        return None
    from genfast.eval.prompt_accuracy import HELDOUT_SEED, eval_prompts, prompt_accuracy

    pipes = {"ascan-t2i": _load(folder), "genfast-mini": load_mini()}
    pipes["genfast-mini"].set_progress_bar_config(disable=True)
    evaluator = load_evaluator()
    prompts = eval_prompts(num_images)
    settings = {"num_images": num_images, "steps": steps, "guidance": guidance, "prompts": "held-out (seed "
                f"{HELDOUT_SEED})", "seeds": "image i has seed i"}
    rows = {}
    for name, pipe in pipes.items():
        acc = prompt_accuracy(_t2i_images(pipe, prompts, steps, guidance), prompts, evaluator)
        rows[name] = {**settings, "prompt_accuracy": acc}
    calls = {name: (lambda pipe=pipe: pipe(prompts[0], num_inference_steps=steps, guidance_scale=guidance,
                                           generator=torch.Generator().manual_seed(0), output_type="pt"))
             for name, pipe in pipes.items()}
    with torch.no_grad():
        med = _interleaved(calls, repeats)
    for name, row in rows.items():
        row["pipeline_call"] = {"seconds": med[name], "images": 1, "steps": steps, "guidance": guidance,
                                "vs_genfast-mini": med[name] / med["genfast-mini"]}
        row["points_vs_genfast-mini"] = {h: 100 * (v - rows["genfast-mini"]["prompt_accuracy"][h])
                                         for h, v in row["prompt_accuracy"].items()}
        print(f"{name:21s} prompt accuracy " + ", ".join(f"{h} {100 * v:.1f}%" for h, v in row["prompt_accuracy"].items())
              + f"; one-image call {med[name]:.3f} s (x{med[name] / med['genfast-mini']:.2f} genfast-mini's)  "
              f"[{num_images} prompts, {steps} steps, guidance {guidance}]")
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []  # (title, [(model, label, latents, values, line style)])
    if "counts" in result:
        rows = result["counts"]
        for title, sizes in (("XL, GFLOPs per forward (fvcore convention)", XL_LATENTS),
                             ("minis, GFLOPs per forward", MINI_LATENTS)):
            panels.append((title, [(name, name, row["latents"], row["gflops"], "o-") for name, row in rows.items()
                                   if row["latents"] == list(sizes)]))
    if "latency" in result:
        lat = result["latency"]
        lines = []
        for name in lat["forward"]:
            for b, style in zip(MINI_BATCHES, ("o-", "s--")):
                secs = lat["forward"][name][f"batch_{b}"]["seconds"]
                lines.append((name, f"{name}, batch {b}", lat["latents"], [1000 * s / b for s in secs], style))
        panels.append(("minis, CPU ms per image (measured)", lines))
    names = list(dict.fromkeys(line[0] for _, lines in panels for line in lines))
    colours = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per model in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for name, label, latents, values, style in lines:
            ax.loglog([s * s for s in latents], values, style, label=label, color=colours[name])
        tokens = [s * s for s in lines[0][2]]
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.minorticks_off()
        ax.set_xlabel("latent tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PARTS = ("counts", "latency", "quality", "t2i")
# option -> the parts it acts on: giving it without any of them is an error (an option with no effect)
OPTION_PARTS = {"repeats": ("latency", "t2i"), "num_images": ("quality", "t2i"), "steps": ("quality", "t2i"),
                "guidance": ("quality", "t2i"), "control": ("quality",)}


def main(argv=None) -> int:
    from genfast.pipelines.class_conditional import evaluate_pipeline

    evaluate = inspect.signature(evaluate_pipeline).parameters
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--num-images", type=int, help="images per model for quality and t2i (default 192)")
    parser.add_argument("--steps", type=int, help=f"sampling steps (default: quality "
                        f"{evaluate['num_inference_steps'].default}, as evaluate_pipeline; t2i {T2I_DEFAULTS['steps']})")
    parser.add_argument("--guidance", type=float, help=f"guidance scale (default: quality "
                        f"{evaluate['guidance_scale'].default}; t2i {T2I_DEFAULTS['guidance']})")
    parser.add_argument("--control", type=Path, help="the symmetric AsCAN's DiTPipeline folder "
                        f"(default {DEFAULT_CONTROL} when it exists)")
    parser.add_argument("--out", default="outputs/bench/backbones.json")
    args = parser.parse_args(argv)
    for option, parts in OPTION_PARTS.items():
        if getattr(args, option) is not None and not set(parts) & set(args.part):
            parser.error(f"--{option.replace('_', '-')} acts on --part {' / '.join(parts)} only; add one or drop it")
    for option, low in (("repeats", 1), ("num_images", 2), ("steps", 1)):
        if getattr(args, option) is not None and getattr(args, option) < low:
            parser.error(f"--{option.replace('_', '-')} must be >= {low}, got {getattr(args, option)}")
    if args.guidance is not None and args.guidance < 1:
        parser.error(f"--guidance must be >= 1 (1 is no guidance), got {args.guidance}")
    if args.control is not None and not (args.control / "model_index.json").is_file():
        parser.error(f"--control {args.control}: no pipeline folder there (expected model_index.json, as "
                     f"`genfast train-class --model ascan-mini-symmetric --out DIR` writes)")
    control = args.control if args.control is not None else (
        DEFAULT_CONTROL if (DEFAULT_CONTROL / "model_index.json").is_file() else None)
    repeats = args.repeats if args.repeats is not None else 5
    num_images = args.num_images if args.num_images is not None else 192
    out = check_output(args.out, folder=False)
    result = {"command": "python " + " ".join(sys.argv if argv is None else [sys.argv[0], *argv]),
              "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    if "counts" in args.part:
        result["counts"] = counts()
    if "latency" in args.part:
        result["latency"] = latency(repeats)
    if "quality" in args.part:
        result["quality"] = quality(num_images, args.steps or evaluate["num_inference_steps"].default,
                                    args.guidance or evaluate["guidance_scale"].default, control)
    if "t2i" in args.part:
        result["t2i"] = t2i(repeats, num_images, args.steps or T2I_DEFAULTS["steps"],
                            args.guidance or T2I_DEFAULTS["guidance"])
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if "counts" in result or "latency" in result:
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
