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

Real photos (``--real-photos DIR``, a folder of photos of one person): the same personalization
(`genfast.training.personalize`, LoRA + symmetry) run twice on the same photos with the same step
counts, once on centre crops (``--align none``) and once on face-aligned crops (``--align dlib``,
`genfast.data.faces`, landmark camera starts), and per row: reconstruction PSNR of each photo's
render (its fitted camera and latent, after training; "inversion" = the frozen base before it)
against the image it was fitted to, identity similarity of render vs that image, the fitted yaw and
pitch ranges, steps and minutes. ``--base`` takes a converted EG3D folder: the official FFHQ-512
checkpoint after ``genfast convert-eg3d ffhq512-128.pkl ffhq512/`` (when you have the pickle; it
cannot be downloaded here), else the embedded prior.

    python bench/my3dgen.py --real-photos astro/ [--base ffhq512/] [--steps 20] [--invert-steps 60]
                            [--align dlib] [--json real.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from genfast.cli_gan3d import _base_generator
from genfast.data.faces import prepare_photos
from genfast.data.heads import render_head, render_views, sample_identity
from genfast.eval.faithfulness import PSNR_CAP, faithfulness
from genfast.eval.lpips_metric import LPIPSMetric, lpips_available
from genfast.gan3d.adapter import CAMERAS, LATENTS
from genfast.gan3d.cameras import camera_origin, ffhq_intrinsics, sample_cameras
from genfast.gan3d.identity import identity_similarity, load_identity_encoder
from genfast.gan3d.photos import load_photos, read_cameras
from genfast.io import atomic_write_text, check_output
from genfast.models import load_heads_prior
from genfast.training.personalize import PersonalizeConfig, invert, personalize

REAL_MODES = ("none",)  # the centre-crop row; the aligned row's mode is --align

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
    ws = invert(base, train * 2 - 1, train_cams, PersonalizeConfig(invert_steps=args.invert_steps), progress=False)
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


def _write_json(path: str, results: dict, meta: dict, key: str = "identities") -> None:
    atomic_write_text(path, json.dumps({"meta": meta, key: {str(k): v for k, v in results.items()}}, indent=1) + "\n")


def yaw_pitch_degrees(cams: torch.Tensor) -> tuple[list[float], list[float]]:
    """Yaw and pitch offsets from frontal (degrees, the convention of `fit_cameras`) of (N, 25) look-at
    cameras: the inverse of `lookat_pose(pi/2 + yaw, pi/2 + pitch)` from the camera centre."""
    o = camera_origin(cams.double().cpu())
    cos_phi = (o[:, 1] / o.norm(dim=1)).clamp(-1, 1)
    pitch = -math.pi / 2 * cos_phi  # pitch' = pi/2 (1 - cos phi), minus the frontal pi/2
    yaw = math.pi / 2 - torch.atan2(o[:, 2], o[:, 0])
    return [round(math.degrees(v), 2) for v in yaw.tolist()], [round(math.degrees(v), 2) for v in pitch.tolist()]


def _spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


@torch.no_grad()
def score_fit(G, ws, cams, targets, identity) -> dict:
    """Per-photo PSNR and identity similarity of G's renders (ws, cams) against targets (N, 3, H, W) in [0, 1]."""
    pred = (G.synthesis(ws, cams, deterministic=True)["image"].clamp(-1, 1) + 1) / 2
    mse = (pred - targets).pow(2).mean((1, 2, 3)).clamp(min=1e-12)
    psnr = (-10 * torch.log10(mse)).clamp(max=PSNR_CAP)
    sim = identity_similarity(identity, pred * 2 - 1, targets * 2 - 1)
    return {"psnr": psnr.tolist(), "identity": sim.tolist()}


def run_real_row(base, identity, folder: str, names: list[str], centre_crops, mode: str, args) -> dict:
    """One personalization of the photo folder with alignment `mode` (none / dlib / opencv), scored on its own targets."""
    prepared = prepare_photos(folder, names, centre_crops, base.img_resolution, mode)
    if mode != "none" and prepared.record.get("align") != "eg3d":
        raise SystemExit(f"--align {mode} did not align {folder}: {prepared.note}")
    targets = prepared.images.to(args.device)
    cfg = PersonalizeConfig(steps=args.steps, invert_steps=args.invert_steps, rank=args.rank)
    G = copy.deepcopy(base)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        summary = personalize(G, names, prepared.images, f"{tmp}/adapter", cfg, identity=identity,
                              camera_init=prepared.init, alignment=prepared.record, crops_png=prepared.sheet,
                              log=lambda _: None, progress=False)
        # what the adapter holds: each photo's latent and camera, in the order of `names`
        ws = load_file(f"{tmp}/adapter/{LATENTS}")["ws"].to(args.device)
        cams = read_cameras(f"{tmp}/adapter/{CAMERAS}", names).to(args.device)
        if args.save_crops:
            Path(args.save_crops).mkdir(parents=True, exist_ok=True)
            shutil.copy(f"{tmp}/adapter/crops.png", Path(args.save_crops) / f"crops_{mode}.png")
    minutes = (time.time() - t0) / 60
    after, before = score_fit(G, ws, cams, targets, identity), score_fit(base, ws, cams, targets, identity)
    yaw, pitch = yaw_pitch_degrees(cams)
    return {"align": mode, "detector": prepared.record.get("detector", "-"), "photos": names,
            "psnr": after["psnr"], "identity": after["identity"], "inversion_psnr": before["psnr"],
            "inversion_identity": before["identity"], "yaw_degrees": yaw, "pitch_degrees": pitch,
            "landmark_pose_degrees": prepared.record.get("landmark_pose_degrees"),
            "steps": args.steps, "invert_steps": args.invert_steps, "camera_steps": cfg.camera_steps,
            "minutes": minutes, "trainable": summary["trainable_parameters"], "identity_network": summary["identity"]}


def run_real(args) -> tuple[dict, dict]:
    torch.manual_seed(0)
    t_start = time.time()
    base = _base_generator(args.base)[0].to(args.device)
    identity = load_identity_encoder().to(args.device)
    names, centre_crops = load_photos(args.real_photos, resolution=base.img_resolution)
    meta = {"photos_folder": str(args.real_photos), "photos": len(names), "base": args.base or "embedded genfast-heads",
            "resolution": base.img_resolution, "steps": args.steps, "invert_steps": args.invert_steps,
            "rank": args.rank, "device": str(args.device),
            "generator_parameters": sum(q.numel() for q in base.parameters())}
    rows = {}
    for mode in (*REAL_MODES, args.align):
        if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes} reached: stopping after {len(rows)} rows")
            break
        print(f"[bench] personalizing {len(names)} photos, align={mode} ...", flush=True)
        rows[mode] = run_real_row(base, identity, args.real_photos, names, centre_crops, mode, args)
        if args.json:
            _write_json(args.json, rows, meta, key="real_photos")
    return rows, meta


def report_real(rows: dict[str, dict], meta: dict) -> None:
    if not rows:
        print("no real-photo row finished")
        return
    print(f"\nMy3DGen on real photos: {meta['photos']} photos of {meta['photos_folder']}, base {meta['base']} "
          f"({meta['generator_parameters']:,} parameters, {meta['resolution']}x{meta['resolution']}), LoRA rank "
          f"{meta['rank']} + symmetry, {meta['steps']} steps, {meta['invert_steps']} inversion steps, {meta['device']}")
    print(f"  {'row':<22}{'PSNR mean':>10}{'min':>7}{'max':>7}{'inv. PSNR':>10}{'identity':>10}{'min':>7}"
          f"{'max':>7}{'yaw (deg)':>16}{'pitch (deg)':>16}{'steps':>7}{'min':>6}")
    for mode, r in rows.items():
        p, s = _spread(r["psnr"]), _spread(r["identity"])
        label = "centre crop (none)" if mode == "none" else f"aligned ({r['detector']})"
        yaw, pitch = f"{min(r['yaw_degrees']):+.1f}..{max(r['yaw_degrees']):+.1f}", \
            f"{min(r['pitch_degrees']):+.1f}..{max(r['pitch_degrees']):+.1f}"
        print(f"  {label:<22}{p['mean']:>10.2f}{p['min']:>7.2f}{p['max']:>7.2f}"
              f"{_spread(r['inversion_psnr'])['mean']:>10.2f}{s['mean']:>10.4f}{s['min']:>7.4f}{s['max']:>7.4f}"
              f"{yaw:>16}{pitch:>16}{r['steps']:>7}{r['minutes']:>6.1f}")
    if "none" in rows and len(rows) > 1:
        other = next(m for m in rows if m != "none")
        d = [a - b for a, b in zip(rows[other]["psnr"], rows["none"]["psnr"], strict=True)]
        print(f"  aligned - centre crop, PSNR per photo: {sum(d) / len(d):+.2f} dB (better on "
              f"{sum(v > 0 for v in d)}/{len(d)} photos)")
    identity = next(iter(rows.values()))["identity_network"]
    print("  Caveat: each row is scored against its own fitting targets (the centre crops, or the aligned crops),\n"
          "  which differ in framing: the rows measure how well each pipeline's targets can be fitted, not one\n"
          "  common image. 'inv. PSNR' is the frozen base with the same latents and cameras (before the adapters).\n"
          f"  Identity similarity uses {identity}: an embedding of synthetic heads, a weak signal on real faces.")


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



def _is_real_json(path: str) -> bool:
    with open(path) as f:
        return "real_photos" in json.load(f)


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """Options that would change nothing in the chosen mode are refused, not ignored."""
    for name in ("steps", "invert_steps", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    if args.real_photos:
        synthetic_only = [n for n in ("identities", "first", "views", "lpips_weights", "report", "figure")
                          if getattr(args, n) != p.get_default(n)]
        if synthetic_only:
            p.error(f"--{synthetic_only[0].replace('_', '-')} has no effect with --real-photos (it is for the "
                    f"synthetic identities)")
        if not Path(args.real_photos).is_dir():
            p.error(f"--real-photos {args.real_photos} is not a folder")
        try:  # before minutes of fitting: an unwritable --json fails now
            if args.json:
                check_output(args.json, folder=False, what="--json")
        except ValueError as err:
            p.error(str(err))
    elif args.report and len(args.report) == 1 and _is_real_json(args.report[0]):
        if args.figure:
            p.error("--figure is for the synthetic identities; a --real-photos run has no figure")
    else:
        real_only = [n for n in ("base", "save_crops") if getattr(args, n) is not None]
        if args.align != p.get_default("align"):
            real_only.append("align")
        if real_only:
            p.error(f"--{real_only[0].replace('_', '-')} is for --real-photos (the synthetic identities are "
                    f"held-out heads of the embedded prior)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identities", type=int, default=2)
    p.add_argument("--first", type=int, default=0, help="index of the first held-out identity")
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--steps", type=int, default=300, help="adapter training steps (every row)")
    p.add_argument("--invert-steps", type=int, default=PersonalizeConfig.invert_steps,
                   help="latent inversion steps before training")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lpips-weights", help="AlexNet weights for LPIPS (default: torch's hub cache; never downloaded)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new identity (or --real-photos row) after this")
    p.add_argument("--json", help="write every identity's rows here (rewritten after each identity, or each --real-photos row)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="only print the table over these runs' identities (or of one --real-photos run)")
    p.add_argument("--figure", help="also plot the per-identity differences behind the claims (PNG)")
    p.add_argument("--real-photos", metavar="DIR",
                   help="a folder of photos of one person: personalize it with centre crops and with face "
                        "alignment (same steps) and compare the two rows (needs pip install 'genfast[faces]')")
    p.add_argument("--base", metavar="PATH",
                   help="with --real-photos: the base generator, a converted EG3D folder (default: the embedded "
                        "genfast-heads prior). For the official FFHQ-512 checkpoint, when you have "
                        "ffhq512-128.pkl (it is not downloaded): genfast convert-eg3d ffhq512-128.pkl ffhq512/ "
                        "then --base ffhq512/")
    p.add_argument("--align", choices=("dlib", "opencv"), default="dlib",
                   help="with --real-photos: the face detector of the aligned row (a face must be found in every photo)")
    p.add_argument("--save-crops", metavar="DIR",
                   help="with --real-photos: keep each row's contact sheet of what it fitted (crops_<align>.png)")
    args = p.parse_args(argv)
    _check_args(p, args)
    if args.real_photos or (args.report and _is_real_json(args.report[0])):
        if args.real_photos:
            rows, meta = run_real(args)
        else:
            with open(args.report[0]) as f:
                data = json.load(f)
            rows, meta = data["real_photos"], data["meta"]
        report_real(rows, meta)
        return 0
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
