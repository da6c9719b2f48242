"""``genfast convert-eg3d PKL OUT``: an official EG3D pickle -> safetensors + config.json, without running its code."""

from __future__ import annotations

import argparse

__all__ = ["add_convert_eg3d_parser", "cmd_convert_eg3d"]


def cmd_convert_eg3d(args: argparse.Namespace) -> int:
    from .generator import parameter_counts
    from .loader import CONFIG_NAME, WEIGHTS_NAME, convert_eg3d, load_converted

    out = convert_eg3d(args.pkl, args.out)
    G = load_converted(out)  # read back: the folder on disk is what later commands will load
    counts = parameter_counts(G)
    print(
        f"wrote {out / WEIGHTS_NAME} and {out / CONFIG_NAME}: EG3D TriPlaneGenerator, "
        f"{counts['total']:,} parameters, {G.img_resolution}x{G.img_resolution} output, "
        f"neural rendering {G.neural_rendering_resolution}x{G.neural_rendering_resolution}"
    )
    return 0


def add_convert_eg3d_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert-eg3d",
        help="convert an official EG3D .pkl (e.g. ffhq512-128.pkl) to safetensors + config.json",
        description=(
            "Read an official EG3D network pickle without executing the source code embedded in it, rebuild "
            "G_ema as genfast's plain-PyTorch TriPlaneGenerator and write OUT/model.safetensors and "
            "OUT/config.json (atomically)."
        ),
    )
    parser.add_argument("pkl", help="EG3D network pickle, e.g. ffhq512-128.pkl")
    parser.add_argument("out", help="output folder (replaced if it exists)")
    parser.set_defaults(func=cmd_convert_eg3d)
    return parser


def cmd_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .video import VIDEO_FORMATS, map_z, render_orbit, write_video

    bad = [o for o in args.out if Path(o).suffix.lower() not in VIDEO_FORMATS]
    if bad:  # before minutes of rendering
        raise ValueError(f"cannot write {bad[0]}: give a file name ending in {' or '.join(VIDEO_FORMATS)}")
    if args.checkpoint is None or (Path(args.checkpoint) / "latents.safetensors").is_file():
        from ..training.heads import load_heads_prior

        G, train_z = load_heads_prior(args.checkpoint)  # the embedded prior, or one from train-heads
    else:
        from .loader import load_generator

        G, train_z = load_generator(args.checkpoint).eval().requires_grad_(False), None
    with torch.no_grad():
        if args.identity is not None:
            if train_z is None or not 0 <= args.identity < len(train_z):
                count = 0 if train_z is None else len(train_z)
                raise ValueError(f"--identity {args.identity}: this generator has {count} training identities; "
                                 f"use --seed for a new one")
            ws = map_z(G, train_z[args.identity : args.identity + 1], args.truncation)
        else:
            ws = map_z(G, torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(args.seed)), args.truncation)
        frames = render_orbit(G, ws, frames=args.frames, yaw_range=args.yaw_range)
    for out in args.out:
        write_video(frames, out, fps=args.fps, scale=args.scale)
        print(f"wrote {out}: {len(frames)} views, yaw ±{args.yaw_range} rad, {frames.shape[2]}x{frames.shape[1]} "
              f"x{args.scale}")
    return 0


def add_render_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("render", help="render a multi-view orbit of a 3D head as .gif / .mp4")
    parser.add_argument("--checkpoint", help="a converted EG3D folder or an official .pkl (default: embedded "
                                             "genfast-heads prior)")
    parser.add_argument("--seed", type=int, default=0, help="z ~ N(0, I) from this seed")
    parser.add_argument("--identity", type=int, help="instead of --seed: a training identity of the embedded prior")
    parser.add_argument("--truncation", type=float, default=1.0, help="truncation psi towards the average w")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--yaw-range", type=float, default=0.6, help="orbit half-width in radians")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--scale", type=int, default=4, help="enlarge each frame by this factor (nearest)")
    parser.add_argument("--out", action="append", required=True, help="orbit.gif or orbit.mp4 (repeat for both)")
    parser.set_defaults(func=cmd_render)
    return parser
