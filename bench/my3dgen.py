"""My3DGen on the embedded prior: base inversion vs full fine-tuning vs LoRA vs LoRA + symmetry.

Held-out synthetic identities (seed 1, never seen by the prior): 10 training views from the
FFHQ-like camera sampler with their true cameras, and novel views from yaws across [-1.0, 1.0]
rad, profiles (|yaw| >= 0.8) included. Every row starts from the same per-photo inversion and
renders the novel views from the mean of the photos' w's. Columns: novel-view PSNR / SSIM against
the true renders (LPIPS[alex] where its weights are on disk, else n/a), identity similarity (genfast's identity
embedding, render vs truth), profile-view PSNR, trained parameters, wall time.

    python bench/my3dgen.py [--identities 2] [--first 0] [--steps 300] [--device cuda] [--max-minutes M]
                            [--json results.json]
    python bench/my3dgen.py --report a.json b.json    # one table over the identities of earlier runs

``--json`` is rewritten after every identity, so a run stopped by ``--max-minutes`` (no new identity
starts after it) or by a kill keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
from tqdm.auto import tqdm

from genfast.data.heads import render_head, render_views, sample_identity
from genfast.eval.faithfulness import faithfulness
from genfast.eval.lpips_metric import LPIPSMetric, lpips_available
from genfast.gan3d.cameras import ffhq_intrinsics, sample_cameras
from genfast.gan3d.identity import identity_similarity, load_identity_encoder
from genfast.models import load_heads_prior
from genfast.training.personalize import PersonalizeConfig, invert, personalize

NOVEL_YAWS = (-1.0, -0.8, -0.5, -0.25, 0.0, 0.25, 0.5, 0.8, 1.0)
PROFILE = 0.8


def views_of(index: int, n_train: int, res: int, device):
    params = sample_identity(1, index)
    train_cams = sample_cameras(n_train, torch.Generator().manual_seed(1000 + index), intrinsics=ffhq_intrinsics())
    train = render_head(params, train_cams, res, supersample=2)
    novel, novel_cams = render_views(params, torch.tensor(NOVEL_YAWS), 0.0, res, supersample=2)
    return (t.to(device) for t in (train, train_cams.float(), novel, novel_cams.float()))


@torch.no_grad()
def evaluate(G, ws, novel, novel_cams, identity, lpips=None) -> dict:
    w = ws.mean(0, keepdim=True).expand(len(novel_cams), -1, -1)
    pred = (G.synthesis(w, novel_cams, deterministic=True)["image"].clamp(-1, 1) + 1) / 2
    prof = [k for k, y in enumerate(NOVEL_YAWS) if abs(y) >= PROFILE]
    sim = identity_similarity(identity, pred * 2 - 1, novel * 2 - 1)
    return {**faithfulness(pred, novel), "identity": float(sim.mean()),
            "profile_psnr": faithfulness(pred[prof], novel[prof])["psnr"],
            "lpips": float(lpips(pred, novel).mean()) if lpips is not None else None}


BASE = "base prior (inversion only)"


def configs_for(steps: int, rank: int) -> dict[str, PersonalizeConfig]:
    # full fine-tuning at PTI's learning rate (3e-4); adapters at My3DGen's (2e-3)
    return {"full fine-tuning": PersonalizeConfig(full_finetune=True, symmetry=False, steps=steps, lr=3e-4),
            "LoRA": PersonalizeConfig(rank=rank, symmetry=False, steps=steps),
            "LoRA + symmetry": PersonalizeConfig(rank=rank, symmetry=True, steps=steps),
            "LoRA + symmetry, loralib layout": PersonalizeConfig(rank=rank, symmetry=True, steps=steps,
                                                                 conv_layout="loralib")}


def run_identity(base, identity, index: int, args, lpips=None) -> dict[str, dict]:
    """Every row for held-out identity `index`: the shared inversion, then each training from it."""
    train, train_cams, novel, novel_cams = views_of(index, args.views, base.img_resolution, args.device)
    t0 = time.time()
    ws = invert(base, train * 2 - 1, train_cams, PersonalizeConfig(), progress=False)
    out = {BASE: {**evaluate(base, ws, novel, novel_cams, identity, lpips), "trainable": 0,
                  "seconds": time.time() - t0}}
    for name, cfg in configs_for(args.steps, args.rank).items():
        G = copy.deepcopy(base)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            summary = personalize(G, [f"{i}.png" for i in range(args.views)], train, f"{tmp}/adapter", cfg,
                                  cameras=train_cams, identity=identity, ws=ws, log=lambda _: None, progress=False)
        out[name] = {**evaluate(G, ws, novel, novel_cams, identity, lpips),
                     "trainable": summary["trainable_parameters"], "seconds": time.time() - t0}
    return out


def report(results: dict[int, dict[str, dict]], meta: dict) -> None:
    """The table (means over identities) and the paired differences behind the issue's claims."""
    ids = sorted(results)
    names = list(results[ids[0]])
    print(f"\nMy3DGen on genfast-heads ({meta['generator_parameters']:,} parameters), {len(ids)} held-out "
          f"identities x {meta['views']} training views, {meta['steps']} steps, rank {meta['rank']}, "
          f"{meta['device']}; novel yaws {NOVEL_YAWS} rad, profile = |yaw| >= {PROFILE}")
    print(f"  {'':<34}{'PSNR':>8}{'SSIM':>8}{'LPIPS':>8}{'identity':>10}{'profile PSNR':>14}"
          f"{'trained params':>16}{'s':>8}")
    for name in names:
        rows = [results[i][name] for i in ids]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "lpips"}
        lpips = [r.get("lpips") for r in rows]
        lpips = f"{sum(lpips) / len(lpips):.4f}" if None not in lpips else "n/a"  # only with its weights on disk
        print(f"  {name:<34}{mean['psnr']:>8.2f}{mean['ssim']:>8.4f}{lpips:>8}{mean['identity']:>10.4f}"
              f"{mean['profile_psnr']:>14.2f}{int(mean['trainable']):>16,}{mean['seconds']:>8.0f}")
    # paired per identity: the claims are differences on the same person, so count the wins too
    pairs = [("LoRA + symmetry", "LoRA", "profile_psnr"), ("LoRA + symmetry", "full fine-tuning", "psnr"),
             ("LoRA + symmetry", "LoRA", "psnr"), ("LoRA + symmetry, loralib layout", "LoRA + symmetry", "psnr")]
    for a, b, key in pairs:
        d = torch.tensor([results[i][a][key] - results[i][b][key] for i in ids], dtype=torch.float64)
        err = float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")
        print(f"  {a} - {b}, {key}: {float(d.mean()):+.3f} dB (standard error {err:.3f}), "
              f"better on {int((d > 0).sum())}/{len(d)} identities")


def save_figure(results: dict[int, dict[str, dict]], path: str) -> None:
    """Per-identity paired differences (dB) for the two claims, one dot per held-out identity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = sorted(results)
    panels = [("LoRA + symmetry", "LoRA", "profile_psnr", "profile-view PSNR: LoRA + symmetry - LoRA"),
              ("LoRA + symmetry", "full fine-tuning", "psnr", "novel-view PSNR: LoRA + symmetry - full FT")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), sharey=True)
    for ax, (a, b, key, title) in zip(axes, panels, strict=True):
        d = [results[i][a][key] - results[i][b][key] for i in ids]
        ax.axhline(0, color="gray", lw=1)
        ax.scatter(range(len(ids)), d, c=["tab:green" if v > 0 else "tab:red" for v in d], zorder=3)
        ax.axhline(sum(d) / len(d), color="tab:blue", ls="--", lw=1, label=f"mean {sum(d) / len(d):+.3f} dB")
        ax.set_xticks(range(len(ids)), [str(i) for i in ids])
        ax.set_xlabel("held-out identity")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("dB (> 0: first row better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_json(path: str, results: dict, meta: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "identities": {str(k): v for k, v in results.items()}}, f, indent=1)
    os.replace(tmp, path)


def run(args) -> tuple[dict, dict]:
    torch.manual_seed(0)
    t_start = time.time()
    base, _ = load_heads_prior()
    base, identity = base.to(args.device), load_identity_encoder().to(args.device)
    ok, note = lpips_available("alex", args.lpips_weights)
    lpips = LPIPSMetric("alex", args.lpips_weights, device=args.device) if ok else None
    if lpips is None:
        print(f"LPIPS column left empty: {note}")
    meta = {"views": args.views, "steps": args.steps, "rank": args.rank, "device": str(args.device),
            "generator_parameters": sum(q.numel() for q in base.parameters())}
    results = {}
    for index in tqdm(range(args.first, args.first + args.identities), desc="identities"):
        if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes} reached: stopping after {len(results)} identities")
            break
        results[index] = run_identity(base, identity, index, args, lpips)
        if args.json:
            _write_json(args.json, results, meta)
    return results, meta



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identities", type=int, default=2)
    p.add_argument("--first", type=int, default=0, help="index of the first held-out identity")
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lpips-weights", help="AlexNet weights for LPIPS (default: torch's hub cache; never downloaded)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new identity after this")
    p.add_argument("--json", help="write every identity's rows here (rewritten after each identity)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="only print the table over these runs' identities")
    p.add_argument("--figure", help="also plot the per-identity differences behind the claims (PNG)")
    args = p.parse_args(argv)
    if args.report:
        results, meta = {}, None
        for path in args.report:
            with open(path) as f:
                data = json.load(f)
            meta = meta or data["meta"]
            if any(data["meta"][k] != meta[k] for k in ("views", "steps", "rank")):
                p.error(f"{path} was run with other --views/--steps/--rank than {args.report[0]}")
            results.update({int(k): v for k, v in data["identities"].items()})
    else:
        results, meta = run(args)
    report(results, meta)
    if args.figure:
        save_figure(results, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
