"""How well does the embedded 3D head prior (assets/genfast-heads) generalise to heads it never saw?

For held-out synthetic identities (seed 1; training used seed 0), one frontal view is given. A
latent w (one vector for every layer: "W" inversion) is fitted to that view with the generator
frozen, then the head is rendered from yaws across [-0.6, 0.6] rad and compared with the true
renders of the same head from the same cameras. Rows printed, in one run:
  - inverted from one frontal view  (the number the issue asks for)
  - the average head (w_avg, no fitting): what the prior gives without looking at the photo
  - training identities with their learned latents: how well the prior fits what it saw

    python bench/heads_prior.py [--identities 16] [--steps 200] [--figure docs/heads_prior.png]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm.auto import tqdm

from genfast.data.heads import render_views, sample_identity
from genfast.eval.faithfulness import faithfulness
from genfast.gan3d.video import map_z
from genfast.models import load_heads_prior
from genfast.training.heads import reconstruction_loss

YAWS = (-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6)


def truth(seed: int, ids, resolution: int):
    """(identities, yaws, 3, H, W) true renders in [0, 1] and their cameras (yaws, 25)."""
    views, cams = zip(*(render_views(sample_identity(seed, i), torch.tensor(YAWS), 0.0, resolution, supersample=2)
                        for i in ids), strict=True)
    return torch.stack(views), cams[0].float()


def render(G, ws, cams):
    """ws (N, num_ws, w_dim) from each camera in cams (V, 25) -> (N, V, 3, H, W) in [0, 1]."""
    out = []
    for c in cams:
        img = G.synthesis(ws, c[None].expand(len(ws), -1), deterministic=True)["image"]
        out.append((img.clamp(-1, 1) + 1) / 2)
    return torch.stack(out, 1)


def invert(G, target, cam, steps: int, lr: float):
    """Fit one w per target image (N, 3, H, W) in [0, 1] seen from cam (25,), generator frozen."""
    w = G.backbone.mapping.w_avg.detach().clone()[None].repeat(len(target), 1).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    c = cam[None].expand(len(target), -1)
    for _ in tqdm(range(steps), desc="invert"):
        ws = w[:, None].expand(-1, G.num_ws, -1)
        loss = reconstruction_loss(G.synthesis(ws, c, deterministic=True), target * 2 - 1, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return w.detach()[:, None].expand(-1, G.num_ws, -1)


def per_yaw(pred, true) -> list[dict]:
    return [{"yaw": y, **faithfulness(pred[:, k], true[:, k])} for k, y in enumerate(YAWS)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a prior written by genfast train-heads (default: the embedded one)")
    p.add_argument("--identities", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--figure", help="save true vs rendered views of a few held-out heads here")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    G, train_z = load_heads_prior(args.checkpoint)
    res = G.img_resolution
    ids = range(args.identities)
    frontal = YAWS.index(0.0)

    held_out, cams = truth(1, ids, res)
    ws = invert(G, held_out[:, frontal], cams[frontal], args.steps, args.lr)
    with torch.no_grad():
        rows = {"inverted from one frontal view": per_yaw(render(G, ws, cams), held_out)}
        avg = G.backbone.mapping.w_avg[None, None].expand(len(ids), G.num_ws, -1)
        rows["average head (no fitting)"] = per_yaw(render(G, avg, cams), held_out)
        seen, _ = truth(0, ids, res)
        rows["training identities, learned latents"] = per_yaw(render(G, map_z(G, train_z[: len(ids)]), cams), seen)

    print(f"\nPSNR (dB) / SSIM of {res}x{res} renders against the true views, {args.identities} identities, "
          f"yaw offsets in rad ({args.steps} inversion steps, lr {args.lr}, deterministic rendering)")
    print(f"  {'':<38}" + "".join(f"{y:>+14.1f}" for y in YAWS) + f"{'mean':>14}")
    for name, cells in rows.items():
        mean_psnr = sum(c["psnr"] for c in cells) / len(cells)
        mean_ssim = sum(c["ssim"] for c in cells) / len(cells)
        print(f"  {name:<38}" + "".join(f"{c['psnr']:>7.2f}/{c['ssim']:.3f}" for c in cells)
              + f"{mean_psnr:>7.2f}/{mean_ssim:.3f}")
    novel = [c["psnr"] for k, c in enumerate(rows["inverted from one frontal view"]) if k != frontal]
    # the identity embedding (assets/genfast-identity) that personalization's symmetry term uses
    from genfast.gan3d.identity import load_identity_encoder

    encoder = load_identity_encoder()
    with torch.no_grad():
        emb = encoder(held_out.flatten(0, 1) * 2 - 1).view(len(ids), len(YAWS), -1)
    sims = torch.einsum("ivd,jwd->ijvw", emb, emb)
    same = torch.eye(len(ids), dtype=torch.bool)[:, :, None, None].expand_as(sims)
    off = ~torch.eye(len(YAWS), dtype=torch.bool).expand_as(sims)
    print(f"  identity embedding on held-out heads across yaws: cos same identity {sims[same & off].mean():.3f}, "
          f"different identities {sims[~same].mean():.3f}")
    print(f"\n  novel-view PSNR of held-out heads inverted from one frontal view: {sum(novel) / len(novel):.2f} dB "
          f"(mean over the {len(novel)} non-frontal yaws; the frontal one is the fitted view)")
    if args.figure:
        from genfast.eval.plots import save_image_grid

        with torch.no_grad():
            pred = render(G, ws[:4], cams)
        images, titles = [], []
        for i in range(min(4, len(ids))):
            for source, label in ((held_out, "true"), (pred, "fit")):
                for k, y in enumerate(YAWS):
                    images.append((source[i, k].permute(1, 2, 0) * 255).round().byte().numpy())
                    titles.append(f"id {i} {label} yaw {y:+.1f}" + (" (given)" if k == frontal and label == "true"
                                                                    else ""))
        save_image_grid(images, titles, args.figure, columns=len(YAWS))
        print(f"  figure: {args.figure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "novel_view_psnr": sum(novel) / len(novel)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
