"""My3DGen on the embedded prior: base inversion vs full fine-tuning vs LoRA vs LoRA + symmetry.

Held-out synthetic identities (seed 1, never seen by the prior): 10 training views from the
FFHQ-like camera sampler with their true cameras, and novel views from yaws across [-1.0, 1.0]
rad, profiles (|yaw| >= 0.8) included. Every row starts from the same per-photo inversion and
renders the novel views from the mean of the photos' w's. Columns: novel-view PSNR / SSIM against
the true renders (LPIPS where its weights are on disk), identity similarity (genfast's identity
embedding, render vs truth), profile-view PSNR, trained parameters, wall time.

    python bench/my3dgen.py [--identities 2] [--steps 300]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time

import torch

from genfast.data.heads import render_head, render_views, sample_identity
from genfast.eval.faithfulness import faithfulness
from genfast.gan3d.cameras import ffhq_intrinsics, sample_cameras
from genfast.gan3d.identity import identity_similarity, load_identity_encoder
from genfast.gan3d.personalize import PersonalizeConfig, invert, personalize
from genfast.training.heads import load_heads_prior

NOVEL_YAWS = (-1.0, -0.8, -0.5, -0.25, 0.0, 0.25, 0.5, 0.8, 1.0)
PROFILE = 0.8


def views_of(index: int, n_train: int, res: int):
    params = sample_identity(1, index)
    train_cams = sample_cameras(n_train, torch.Generator().manual_seed(1000 + index), intrinsics=ffhq_intrinsics())
    train = render_head(params, train_cams, res, supersample=2)
    novel, novel_cams = render_views(params, torch.tensor(NOVEL_YAWS), 0.0, res, supersample=2)
    return train, train_cams.float(), novel, novel_cams.float()


@torch.no_grad()
def evaluate(G, ws, novel, novel_cams, identity) -> dict:
    w = ws.mean(0, keepdim=True).expand(len(novel_cams), -1, -1)
    pred = (G.synthesis(w, novel_cams, deterministic=True)["image"].clamp(-1, 1) + 1) / 2
    prof = [k for k, y in enumerate(NOVEL_YAWS) if abs(y) >= PROFILE]
    sim = identity_similarity(identity, pred * 2 - 1, novel * 2 - 1)
    return {**faithfulness(pred, novel), "identity": float(sim.mean()),
            "profile_psnr": faithfulness(pred[prof], novel[prof])["psnr"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identities", type=int, default=2)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base, _ = load_heads_prior()
    identity = load_identity_encoder()
    rows = {name: [] for name in ("base prior (inversion only)", "full fine-tuning", "LoRA", "LoRA + symmetry")}
    # full fine-tuning at PTI's learning rate (3e-4); adapters at My3DGen's (2e-3)
    configs = {"full fine-tuning": PersonalizeConfig(full_finetune=True, symmetry=False, steps=args.steps, lr=3e-4),
               "LoRA": PersonalizeConfig(rank=args.rank, symmetry=False, steps=args.steps),
               "LoRA + symmetry": PersonalizeConfig(rank=args.rank, symmetry=True, steps=args.steps)}
    for index in range(args.identities):
        train, train_cams, novel, novel_cams = views_of(index, args.views, base.img_resolution)
        t0 = time.time()
        ws = invert(base, train * 2 - 1, train_cams, PersonalizeConfig())
        rows["base prior (inversion only)"].append({**evaluate(base, ws, novel, novel_cams, identity),
                                                    "trainable": 0, "seconds": time.time() - t0})
        for name, cfg in configs.items():
            G = copy.deepcopy(base)
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                summary = personalize(G, [f"{i}.png" for i in range(args.views)], train, f"{tmp}/adapter", cfg,
                                      cameras=train_cams, identity=identity, ws=ws, log=lambda _: None)
            rows[name].append({**evaluate(G, ws, novel, novel_cams, identity),
                               "trainable": summary["trainable_parameters"], "seconds": time.time() - t0})
    total = sum(q.numel() for q in base.parameters())
    print(f"\nMy3DGen on genfast-heads ({total:,} parameters), {args.identities} held-out identities x "
          f"{args.views} training views, {args.steps} steps, rank {args.rank}; novel yaws {NOVEL_YAWS} rad, "
          f"profile = |yaw| >= {PROFILE}")
    print(f"  {'':<30}{'PSNR':>8}{'SSIM':>8}{'identity':>10}{'profile PSNR':>14}{'trained params':>16}{'s':>8}")
    summary = {}
    for name, results in rows.items():
        mean = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
        summary[name] = mean
        print(f"  {name:<30}{mean['psnr']:>8.2f}{mean['ssim']:>8.4f}{mean['identity']:>10.4f}"
              f"{mean['profile_psnr']:>14.2f}{int(mean['trainable']):>16,}{mean['seconds']:>8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "mean": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
