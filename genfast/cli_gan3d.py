"""The 3D commands of `genfast`: convert-eg3d, render, personalize, interpolate.

``genfast convert-eg3d PKL OUT`` turns an official EG3D pickle into safetensors + config.json without
running its code; personalize/interpolate drive `genfast.training.personalize` (outside `gan3d/`,
which keeps model code only).
"""

from __future__ import annotations

import argparse

__all__ = ["add_convert_eg3d_parser", "add_head_photos_parser", "add_personalize_parsers", "add_render_parser",
           "cmd_convert_eg3d"]


def cmd_convert_eg3d(args: argparse.Namespace) -> int:
    from .gan3d.generator import parameter_counts
    from .gan3d.loader import CONFIG_NAME, WEIGHTS_NAME, convert_eg3d, load_converted

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

    from .gan3d.cameras import MAX_YAW
    from .gan3d.video import VIDEO_FORMATS, map_z, render_orbit, write_video
    from .io import check_output

    bad = [o for o in args.out if Path(o).suffix.lower() not in VIDEO_FORMATS]
    if bad:  # before minutes of rendering
        raise ValueError(f"cannot write {bad[0]}: give a file name ending in {' or '.join(VIDEO_FORMATS)}")
    for name, value, low in (("--frames", args.frames, 1), ("--fps", args.fps, 1), ("--scale", args.scale, 1)):
        if value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    if not 0 < args.yaw_range <= MAX_YAW:
        raise ValueError(f"--yaw-range must be in (0, {MAX_YAW}] rad (the orbit's half-width), got {args.yaw_range}")
    if not 0 <= args.truncation <= 1:
        raise ValueError(f"--truncation must be in [0, 1] (0: the average head, 1: none), got {args.truncation}")
    if args.adapter is not None and args.identity is not None:
        raise ValueError("--identity has no effect with --adapter (it renders the adapter's person); give one")
    for out in args.out:
        check_output(out, folder=False)
    G, train_z = _base_generator(args.checkpoint)
    if args.adapter is not None:
        from .gan3d.adapter import load_personalized

        G, photo_ws, _, _ = load_personalized(G, args.adapter)
    with torch.no_grad():
        if args.adapter is not None:
            ws = photo_ws.mean(0, keepdim=True)  # the person's average appearance over their photos
        elif args.identity is not None:
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
                                             "genfast-heads prior); with --adapter, the adapter's base")
    parser.add_argument("--adapter", help="a folder written by `genfast personalize`: render that person")
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


def cmd_head_photos(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .data.heads import render_head, sample_identity
    from .gan3d.cameras import MAX_YAW, ffhq_intrinsics, sample_cameras
    from .gan3d.photos import write_cameras
    from .io import atomic_dir, check_output

    for name, value, low in (("--views", args.views, 1), ("--size", args.size, 16), ("--identity", args.identity, 0)):
        if value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    if not 0 <= args.yaw_max <= MAX_YAW:
        raise ValueError(f"--yaw-max must be in [0, {MAX_YAW}] rad, got {args.yaw_max}")
    out = check_output(args.out, folder=True)
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is a folder with files in it; give a new folder name")
    # FFHQ-like views (mostly near frontal, a few wide) of one procedural head, as bench/my3dgen.py draws them
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + args.identity)
    cams = sample_cameras(args.views, g, yaw_max=args.yaw_max, intrinsics=ffhq_intrinsics())
    images = render_head(sample_identity(args.seed, args.identity), cams, args.size)
    names = [f"{i:02d}.png" for i in range(args.views)]
    with atomic_dir(out) as tmp:
        for name, image in zip(names, images, strict=True):
            pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            Image.fromarray(np.ascontiguousarray(pixels)).save(tmp / name)
        write_cameras(tmp / "dataset.json", names, cams.float())  # their true cameras, for --cameras
    print(f"wrote {out}: {args.views} {args.size}x{args.size} views of synthetic head {args.identity} (seed "
          f"{args.seed}) and dataset.json with their cameras")
    return 0


def add_head_photos_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "head-photos", help="render photos of a synthetic head (a folder to try `genfast personalize` on)",
        description="Render VIEWS photos of one procedural head (genfast.data.heads) from FFHQ-like cameras, as "
                    "PNGs, with an EG3D dataset.json of their true cameras. Seed 1 heads were never seen by the "
                    "embedded prior (it was trained on seed 0).")
    parser.add_argument("--identity", type=int, default=0, help="which head of the seed")
    parser.add_argument("--seed", type=int, default=1, help="1: held out from the embedded prior's training")
    parser.add_argument("--views", type=int, default=10, help="photos to render")
    parser.add_argument("--size", type=int, default=256, help="side of each photo in pixels")
    parser.add_argument("--yaw-max", type=float, default=0.8, help="widest yaw either side of frontal (rad)")
    parser.add_argument("--out", required=True, help="a new folder for the photos")
    parser.set_defaults(func=cmd_head_photos)
    return parser


def _base_generator(path):
    """(generator, training latents or None): the embedded prior or a train-heads folder (with its
    identities' latents), or a converted folder / official pickle (without)."""
    from pathlib import Path

    if path is None or (Path(path) / "latents.safetensors").is_file():
        from .models import load_heads_prior

        return load_heads_prior(path)
    from .gan3d.loader import load_generator

    return load_generator(path).eval().requires_grad_(False), None


def cmd_personalize(args: argparse.Namespace) -> int:
    from .gan3d.photos import load_photos, read_cameras
    from .training.personalize import PersonalizeConfig, check_adapter_out, personalize

    cfg = PersonalizeConfig(rank=args.rank, alpha=args.alpha, symmetry=args.symmetry, steps=args.steps,
                            conv_layout=args.conv_layout, invert_steps=args.invert_steps,
                            latent_space=args.latent_space, lr=args.lr, symmetry_every=args.symmetry_every,
                            symmetry_weight=args.symmetry_weight, batch=args.batch,
                            ckpt_every=args.checkpoint_every,
                            ckpt_minutes=args.checkpoint_minutes if args.checkpoint_minutes != 0 else None)
    check_adapter_out(args.out)  # before any work: nothing is loaded, fitted or written for a bad --out
    G, _ = _base_generator(args.base)
    names, photos = load_photos(args.photos, resolution=G.img_resolution)  # errors name the file, before any work
    cameras = read_cameras(args.cameras, names) if args.cameras else None
    from .data.faces import prepare_photos

    prepared = prepare_photos(args.photos, names, photos, G.img_resolution, args.align, cameras is not None)
    if prepared.note:
        print(f"[personalize] {prepared.note}")
    G = G.to(args.device)
    identity = None
    if args.arcface:
        from .gan3d.arcface import load_arcface

        identity = load_arcface(args.arcface)
    from .cli import CLIError
    from .training.loop import WorkDirLocked

    try:
        summary = personalize(G, names, prepared.images, args.out, cfg, cameras=cameras, identity=identity,
                              camera_init=prepared.init, alignment=prepared.record, crops_png=prepared.sheet)
    except WorkDirLocked as err:  # another run is using this --out: one line, not a traceback
        raise CLIError(str(err)) from err
    runs = len(summary["segments_minutes"])
    print(f"wrote {args.out}: {len(names)} photos, {summary['trainable_parameters']:,} trained parameters "
          f"({100 * summary['trainable_parameters'] / summary['generator_parameters']:.2f}% of "
          f"{summary['generator_parameters']:,}), {summary['minutes']:.1f} min"
          f"{f' over {runs} runs' if runs > 1 else ''}; perceptual term: "
          f"{summary['perceptual']}; symmetry identity network: {summary['identity']}")
    return 0


def _photo_latent(G, img: str, ws, names: list[str], invert_steps: int, aligned: bool = False):
    """w (1, num_ws, w_dim) of `img`: the stored latent of one of the adapter's photos (by file name), or
    any other image file, fitted now: its camera, then its w, against the personalized generator.
    ``aligned``: the adapter's photos were face-aligned, so this one is too (its landmark pose starts the fit)."""
    from pathlib import Path

    from .gan3d.photos import load_photo
    from .training.personalize import PersonalizeConfig, device_of, fit_cameras, invert

    name = Path(img).name
    if name in names:
        return ws[names.index(name)][None]
    if not Path(img).is_file():
        raise ValueError(f"{img} is neither one of the adapter's photos ({', '.join(names)}) nor an image file")
    init = None
    if aligned:
        import torch

        from .data.faces import align_photo

        face = align_photo(img, G.img_resolution)
        image, init = face.tensor(), torch.tensor([[face.yaw, face.pitch]], dtype=torch.float64)
    else:
        image = load_photo(img, G.img_resolution)
    target = image[None].to(device_of(G)) * 2 - 1
    cfg = PersonalizeConfig(invert_steps=invert_steps)
    return invert(G, target, fit_cameras(G, target, cfg, init=init), cfg)


def cmd_interpolate(args: argparse.Namespace) -> int:

    import torch

    from .eval.plots import save_image_grid
    from .gan3d.adapter import load_personalized
    from .gan3d.cameras import frontal_camera
    from .gan3d.video import to_frames, write_video
    from .io import check_output
    from .training.personalize import PersonalizeConfig

    if args.steps < 2:
        raise ValueError(f"--steps must be an integer >= 2 (both ends are included), got {args.steps}")
    PersonalizeConfig(invert_steps=args.invert_steps)  # checks --invert-steps now, not after loading
    out = check_output(args.out, folder=True)
    G, ws, names, _ = load_personalized(_base_generator(args.base)[0], args.adapter)
    G = G.to(args.device).requires_grad_(False)  # adapters too: only new photos' latents are fitted here
    import json
    from pathlib import Path

    from .gan3d.adapter import SUMMARY

    aligned = json.loads((Path(args.adapter) / SUMMARY).read_text()).get("alignment", {}).get("align") == "eg3d"
    w_a, w_b = (_photo_latent(G, img, ws.to(args.device), names, args.invert_steps, aligned)
                for img in (args.img_a, args.img_b))
    t = torch.linspace(0, 1, args.steps, device=w_a.device)
    w = torch.lerp(w_a, w_b, t[:, None, None])  # straight lines in W, per layer
    with torch.no_grad():
        c = frontal_camera().float().to(w.device)[None].expand(len(t), -1)
        img = G.synthesis(w, c, deterministic=True)["image"]
    frames = to_frames(img)
    save_image_grid(list(frames), [f"t={float(v):.2f}" for v in t], out / "interpolation.png", columns=len(t))
    write_video(frames, out / "interpolation.gif", fps=6, scale=4)
    print(f"wrote {out}/interpolation.png and interpolation.gif: {args.steps} steps from {args.img_a} to {args.img_b}")
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_personalize_parsers(subparsers) -> None:
    from .data.faces import ALIGN_MODES
    from .gan3d.lora import CONV_LAYOUTS
    from .training.personalize import LATENT_SPACES, PersonalizeConfig

    p = subparsers.add_parser("personalize", help="My3DGen: adapt the 3D generator to one person from ~10 photos")
    p.add_argument("--photos", required=True, help="a folder of photos of one person (any size; read only)")
    p.add_argument("--cameras", help="an EG3D dataset.json with each photo's 25-number camera (default: fitted)")
    p.add_argument("--align", choices=ALIGN_MODES, default="auto",
                   help="face detection and EG3D-style alignment (pip install 'genfast[faces]'): dlib (HOG, OpenCV "
                        "cascade when it finds nothing) or opencv; none: centre crop; auto (default): aligned when "
                        "a face is found in every photo, square photos without faces (synthetic heads, dataset "
                        "crops) used as they are; the crops go to ADAPTER/crops.png")
    p.add_argument("--base", help="base generator: converted folder or EG3D .pkl (default: embedded genfast-heads)")
    p.add_argument("--rank", type=int, default=PersonalizeConfig.rank, help="adapter rank r (conv inner rank r*k)")
    p.add_argument("--alpha", type=float, default=PersonalizeConfig.alpha, help="adapter scale is alpha / r")
    p.add_argument("--conv-layout", choices=CONV_LAYOUTS, default="my3dgen",
                   help="shapes of the conv adapters: my3dgen (My3DGen's default, 240K at FFHQ-512 rank 1) or "
                        "loralib (~0.6x the conv adapter parameters)")
    p.add_argument("--steps", type=int, default=PersonalizeConfig.steps, help="adapter training steps")
    p.add_argument("--lr", type=float, default=PersonalizeConfig.lr, help="adapter learning rate (Adam)")
    p.add_argument("--symmetry-every", type=int, default=PersonalizeConfig.symmetry_every,
                   help="the symmetry term runs on every N-th step")
    p.add_argument("--symmetry-weight", type=float, default=PersonalizeConfig.symmetry_weight,
                   help="weight of the symmetry term")
    p.add_argument("--batch", type=int, default=PersonalizeConfig.batch,
                   help="photos rendered together; more are fitted and trained a batch at a time (gradient "
                        "accumulation), so memory is that of one batch, whatever the number of photos")
    p.add_argument("--checkpoint-every", type=int, default=PersonalizeConfig.ckpt_every,
                   help="checkpoint the training every N steps (a rerun resumes from the last one)")
    p.add_argument("--checkpoint-minutes", type=float, default=PersonalizeConfig.ckpt_minutes,
                   help="also checkpoint once this many minutes have passed since the last one (0: off)")
    p.add_argument("--invert-steps", type=int, default=PersonalizeConfig.invert_steps,
                   help="steps of the per-photo latent inversion that precedes training")
    p.add_argument("--latent-space", choices=LATENT_SPACES, default=PersonalizeConfig.latent_space,
                   help="invert each photo to one w (W) or to one w per layer (W+)")
    p.add_argument("--symmetry", action=argparse.BooleanOptionalAction, default=True,
                   help="the mirrored-camera identity regulariser (default on)")
    p.add_argument("--arcface", metavar="PTH",
                   help="ArcFace IR-SE50 weights (model_ir_se50.pth) for the symmetry and identity terms on real "
                        "faces (default: genfast's identity embedding, trained on the synthetic heads)")
    p.add_argument("--device", default=_default_device(), help="torch device (default: cuda when available)")
    p.add_argument("--out", required=True, help="the adapter folder to write (rerun to resume)")
    p.set_defaults(func=cmd_personalize)

    i = subparsers.add_parser("interpolate", help="novel appearances between two photos of a personalized adapter")
    i.add_argument("--adapter", required=True, help="a folder written by `genfast personalize`")
    i.add_argument("--base", help="the base the adapter was trained on (default: embedded genfast-heads)")
    i.add_argument("img_a", help="one of the adapter's photos (its file name), or any image file of the person "
                                 "(its camera and latent are fitted first)")
    i.add_argument("img_b", help="the same, for the other end")
    i.add_argument("--device", default=_default_device(), help="torch device (default: cuda when available)")
    i.add_argument("--steps", type=int, default=8, help="images from one end to the other, both included")
    i.add_argument("--invert-steps", type=int, default=PersonalizeConfig.invert_steps,
                   help="latent fitting steps for an image that is not one of the adapter's photos")
    i.add_argument("--out", required=True, help="a folder for interpolation.png and interpolation.gif")
    i.set_defaults(func=cmd_interpolate)
