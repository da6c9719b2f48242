"""LaMamba-Diff against DiT: parameters, FLOPs, how cost grows with tokens, CPU latency, and (when the
trained class-conditional minis are on disk) class accuracy and FID.

    python bench/backbones.py [--part counts latency quality] [--repeats 5] [--out outputs/bench/backbones.json]

counts   FLOPs by genfast.backbones.count_flops: torch's FlopCounterMode on the meta device, one
         multiply-add counted as ONE flop (fvcore's convention, the one the reference figures use:
         LaMamba-XL 45.9 GFLOPs, DiT-XL/2 118.6 at 256x256). XL configs at 256 / 512 / 1024 pixels
         (latents 32 / 64 / 128 through an SD VAE); the minis at 64 / 128 / 256 pixels (latents 16 / 32 /
         64 through genfast-mini's VAE). The DiT mini is sized to the LaMamba mini's parameters.
latency  the minis' forward pass at batch 1 on this CPU, the three latent sizes, median of --repeats calls
         after a warm-up; LaMamba and DiT interleaved in each round so load hits both alike.
quality  class accuracy (embedded evaluator) and FID[mini-features] of assets/genfast-lamamba-class and
         assets/genfast-dit-class against held-out renders, when both folders exist.
Writes a plot of cost against tokens next to the JSON.
"""

from __future__ import annotations

import argparse
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


def _models():
    from genfast.backbones import LaMambaDiffModel, count_params, lamamba_config
    from genfast.pipelines.class_conditional import ClassDiT, dit_config

    lm_cfg = lamamba_config("mini")
    with torch.device("meta"):
        target = count_params(LaMambaDiffModel(**lm_cfg))
    dit_cfg = dit_config(params_target=target)
    return {"lamamba-mini": (LaMambaDiffModel, lm_cfg), "dit-mini": (ClassDiT, dit_cfg)}


def _xl_models():
    from diffusers import DiTTransformer2DModel

    from genfast.backbones import LaMambaDiffModel, lamamba_config

    # diffusers' DiT-XL/2 as convert_dit_to_diffusers.py builds it (28 layers, 16 heads x 72, patch 2, learned sigma)
    dit_xl = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    return {"lamamba-XL": (LaMambaDiffModel, lamamba_config("XL")), "dit-XL/2": (DiTTransformer2DModel, dit_xl)}


def counts() -> dict:
    from genfast.backbones import build_on_meta, count_flops, count_params

    rows = {}
    for group, sizes in ((_xl_models(), XL_LATENTS), (_models(), MINI_LATENTS)):
        for name, (cls, cfg) in group.items():
            model = build_on_meta(cls, **cfg)
            gflops = [count_flops(model, sample_size=s) for s in sizes]
            rows[name] = {"params": count_params(model), "latents": list(sizes), "gflops": gflops,
                          "growth_4x_tokens": gflops[1] / gflops[0], "growth_16x_tokens": gflops[2] / gflops[0]}
            print(f"{name:13s} {rows[name]['params'] / 1e6:8.2f}M params; GFLOPs at latents {sizes}: "
                  + ", ".join(f"{g:.3f}" for g in gflops)
                  + f"; x{rows[name]['growth_4x_tokens']:.2f} for 4x tokens, x{rows[name]['growth_16x_tokens']:.2f} for 16x")
    return rows


@torch.no_grad()
def latency(repeats: int) -> dict:
    built = {}
    for name, (cls, cfg) in _models().items():
        for s in MINI_LATENTS:
            torch.manual_seed(0)
            built[name, s] = cls(**{**cfg, "sample_size": s}).eval()
    times = {key: [] for key in built}
    label = torch.tensor([3])
    for _ in range(repeats + 1):  # the first round warms up
        for (name, s), model in built.items():
            x, t = torch.randn(1, 4, s, s), torch.tensor([500])
            t0 = time.perf_counter()
            model(x, t, label)
            times[name, s].append(time.perf_counter() - t0)
    rows = {}
    for name in {n for n, _ in built}:
        med = [statistics.median(times[name, s][1:]) for s in MINI_LATENTS]
        rows[name] = {"latents": list(MINI_LATENTS), "seconds": med, "growth_4x_tokens": med[1] / med[0],
                      "growth_16x_tokens": med[2] / med[0]}
        print(f"{name:13s} CPU s at latents {MINI_LATENTS}: " + ", ".join(f"{m:.4f}" for m in med)
              + f"; x{med[1] / med[0]:.2f} for 4x tokens, x{med[2] / med[0]:.2f} for 16x (quadratic: 16x, 256x)")
    return rows


def quality() -> dict | None:
    from genfast.models import ASSETS

    folders = {"lamamba-mini": ASSETS / "genfast-lamamba-class", "dit-mini": ASSETS / "genfast-dit-class"}
    missing = [str(p) for p in folders.values() if not (p / "model_index.json").is_file()]
    if missing:
        print(f"quality: skipped, not trained yet: {', '.join(missing)}")
        return None
    from diffusers import DiffusionPipeline

    from genfast.models import load_evaluator
    from genfast.pipelines.class_conditional import evaluate_pipeline

    evaluator = load_evaluator()
    rows = {}
    for name, folder in folders.items():
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        rows[name] = evaluate_pipeline(pipe, evaluator)
        print(f"{name:13s} {rows[name]}")
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys, title in ((axes[0], ("lamamba-XL", "dit-XL/2"), "XL, GFLOPs (fvcore convention)"),
                            (axes[1], ("lamamba-mini", "dit-mini"), "minis, GFLOPs")):
        for name in keys:
            row = result["counts"][name]
            tokens = [s * s for s in row["latents"]]
            ax.loglog(tokens, row["gflops"], "o-", label=name)
        ax.set_xlabel("latent tokens")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=("counts", "latency", "quality"),
                        default=["counts", "latency", "quality"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="outputs/bench/backbones.json")
    args = parser.parse_args()
    out = check_output(args.out, folder=False)
    result = {"command": "python " + " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
              "machine": platform.machine()}
    if "counts" in args.part:
        result["counts"] = counts()
    if "latency" in args.part:
        result["latency"] = latency(args.repeats)
    if "quality" in args.part:
        result["quality"] = quality()
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if "counts" in result:
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
