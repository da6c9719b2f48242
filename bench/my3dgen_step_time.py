"""My3DGen's training step at the official FFHQ-512 size: LoRA vs full fine-tuning, time and memory.

Builds EG3D's FFHQ-512 TriPlaneGenerator (30.7M parameters; random weights -- the step costs the
same with the official ones, which genfast never downloads), then times personalization steps as
`genfast personalize` runs them: MSE on the 512x512 and the raw 128x128 render from fixed W
latents, and every `--symmetry-every` steps the symmetry term through ArcFace IR-SE50 (random
weights). Rows: LoRA rank r (adapters only) and full fine-tuning (synthesis + super-resolution),
both with Adam, measured one after the other in this run.

    python bench/my3dgen_step_time.py --device cuda [--batch 4] [--steps 12] [--rank 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from genfast.gan3d import lora
from genfast.gan3d.arcface import ArcFaceIRSE50
from genfast.gan3d.cameras import ffhq_intrinsics, sample_cameras
from genfast.gan3d.generator import eg3d_ffhq512
from genfast.training.personalize import PersonalizeConfig, _recon, _trainable, symmetry_loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(G, cfg: PersonalizeConfig, batch: int, steps: int, identity, device) -> dict:
    params = _trainable(G, cfg)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.0, 0.99 ** 0.8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ws = G.mapping(torch.randn(batch, G.z_dim, generator=g).to(device),
                       sample_cameras(batch, g, intrinsics=ffhq_intrinsics()).to(device))
        cams = sample_cameras(batch, g, intrinsics=ffhq_intrinsics()).to(device)
        targets = G.synthesis(ws, cams, deterministic=True)["image"].clamp(-1, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        out = G.synthesis(ws, cams, deterministic=True)
        loss = _recon(out, targets)
        if step % cfg.symmetry_every == 0:
            loss = loss + symmetry_loss(G, ws, identity, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    steady = sorted(times[1:])  # the first step pays for allocation and kernel selection
    return {"trainable": sum(p.numel() for p in params), "median_s": steady[len(steady) // 2],
            "mean_s": sum(steady) / len(steady),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)  # My3DGen's README command: --batch=4
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rank", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (the first step is left out of the timing)")
    device = torch.device(args.device)
    torch.manual_seed(0)
    identity = ArcFaceIRSE50().to(device).requires_grad_(False)
    rows = {}
    for name, cfg in {f"LoRA rank {args.rank}": PersonalizeConfig(rank=args.rank),
                      "full fine-tuning": PersonalizeConfig(full_finetune=True, lr=3e-4)}.items():
        G = eg3d_ffhq512().to(device).eval()
        rows[name] = time_steps(G, cfg, args.batch, args.steps, identity, device)
        if lora.get_lora_state(G) is not None:
            lora.remove_lora(G)
        del G
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nMy3DGen step at FFHQ-512 (512x512 output, 128x128 neural rendering), batch {args.batch}, "
          f"symmetry every 4 steps, {args.steps - 1} timed steps on {name}")
    print(f"  {'':<20}{'trained params':>16}{'median s/step':>15}{'mean s/step':>13}{'peak GiB':>10}")
    for name, r in rows.items():
        print(f"  {name:<20}{r['trainable']:>16,}{r['median_s']:>15.3f}{r['mean_s']:>13.3f}{r['peak_gib']:>10.2f}")
    lo, full = rows[f"LoRA rank {args.rank}"], rows["full fine-tuning"]
    print(f"  full / LoRA: {full['trainable'] / lo['trainable']:.0f}x the trained parameters, "
          f"{full['mean_s'] / lo['mean_s']:.2f}x the time per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
