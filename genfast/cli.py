"""The `genfast` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DEFAULT_PROMPTS = [
    f"a {color} {shape}"
    for shape in ("circle", "square", "triangle", "star")
    for color in ("red", "green", "blue", "yellow")
]


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, no traceback."""


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {value}")
        return value

    return parse


def _read_prompts(args) -> list[str]:
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise CLIError(f"prompts file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise CLIError(f"prompts file {path} has no prompts: write one prompt per line")
        return prompts
    return args.prompt or DEFAULT_PROMPTS


def cmd_generate(args) -> int:
    import torch

    from .eval.plots import save_image_grid
    from .models import load_mini, load_pipeline

    prompts = _read_prompts(args)
    pipe = load_pipeline(args.pipeline) if args.pipeline else load_mini()
    images = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i : i + args.batch_size]
        gen = [torch.Generator().manual_seed(args.seed + i + j) for j in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=args.steps, guidance_scale=args.guidance,
                       generator=gen).images
    out = save_image_grid(images, prompts, args.out)
    print(f"wrote {out} ({len(images)} images, {args.steps} steps, guidance {args.guidance})")
    return 0


def cmd_train_mini(args) -> int:
    from .training.mini import MiniRecipe, train_mini

    overrides = {n: getattr(args, n) for n in ("clf_steps", "vae_steps", "unet_steps") if getattr(args, n) is not None}
    recipe = dataclasses.replace(MiniRecipe.tiny() if args.tiny else MiniRecipe(), **overrides)  # re-validated
    out = train_mini(args.out, args.work_dir, recipe)
    print(f"genfast-mini written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfast", description="Make generative models cheaper to run.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image grid with genfast-mini or a local pipeline")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several); default: 16 shapes")
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    g.add_argument("--pipeline", help="a local diffusers pipeline folder (default: embedded genfast-mini)")
    g.add_argument("--steps", type=_positive("--steps"), default=25)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=_positive("--batch-size"), default=16)
    g.add_argument("--out", default="outputs/grid.png")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-mini", help="train genfast-mini and its evaluator from scratch (CPU, ~1 h)")
    t.add_argument("--out", default="assets", help="where the models are written")
    t.add_argument("--work-dir", default=".genfast-train/mini", help="checkpoints; rerun to resume")
    t.add_argument("--clf-steps", type=_positive("--clf-steps"))
    t.add_argument("--vae-steps", type=_positive("--vae-steps"))
    t.add_argument("--unet-steps", type=_positive("--unet-steps"))
    t.add_argument("--tiny", action="store_true", help="a few steps of everything (smoke test)")
    t.set_defaults(func=cmd_train_mini)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as err:
        print(f"genfast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
