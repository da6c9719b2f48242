"""`genfast assemble`: prune a pipeline's UNet into a student that inherits the teacher's weights, and save it.

    genfast assemble [PIPELINE] --preset bk-small --out DIR
    genfast assemble [PIPELINE] --preset auto --target-latency 0.7 --out DIR
    genfast assemble --preset bk-tiny --condconv 2 --gri-window 4 --out DIR

The folder is a diffusers pipeline (every other component copied as is); unet/genfast_assembly.json
records the plan and which teacher module each student module came from.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .cli import CLIError, _positive, _read_prompts

__all__ = ["add_assemble_parser", "cmd_assemble"]

PRESET_CHOICES = ("bk-base", "bk-small", "bk-tiny", "auto")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-latency must be a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--target-latency must be in (0, 1) (the student's latency over the "
                                         f"teacher's), got {value}")
    return value


def _plan(args, pipe):
    from .assembly.plan import auto_plan, plan_preset

    if args.preset == "auto":
        if args.target_latency is None:
            raise CLIError("--preset auto needs --target-latency R (the student's UNet latency over the teacher's)")
        from .assembly.analyze import analyze

        analysis = analyze(pipe, _read_prompts(args), num_inference_steps=args.steps or 25,
                           timesteps=args.timesteps or 5)
        plan = auto_plan(analysis, pipe.unet.config, args.target_latency)
    else:
        if args.target_latency is not None:
            raise CLIError(f"--target-latency has no effect with --preset {args.preset}; use --preset auto")
        if args.prompts_file or args.prompt or args.steps is not None or args.timesteps is not None:
            raise CLIError(f"--prompt/--prompts-file/--steps/--timesteps set the analysis of --preset auto; they "
                           f"have no effect with --preset {args.preset}")
        plan = plan_preset(args.preset, pipe.unet.config)
    extra = {}
    if args.condconv is not None:
        extra.update(condconv_experts=args.condconv)
    if args.condconv_inherit is not None:
        if args.condconv is None:
            raise CLIError("--condconv-inherit has no effect without --condconv K")
        extra.update(condconv_inherit=args.condconv_inherit)
    if args.gri_window is not None:
        extra.update(gri_window=args.gri_window)
    if args.gri_pooled is not None:
        if args.gri_window is None:
            raise CLIError("--gri-pooled has no effect without --gri-window W")
        extra.update(gri_pooled=args.gri_pooled)
    return dataclasses.replace(plan, **extra)  # re-validated


def cmd_assemble(args) -> int:
    from .assembly.student import assemble, save_assembled
    from .io import check_output
    from .models import MINI, asset_path, load_pipeline

    out = check_output(args.out, folder=True)  # before any work
    src = Path(args.pipeline) if args.pipeline else asset_path(MINI)
    if not (src / "model_index.json").is_file():
        raise CLIError(f"no diffusers pipeline at {src}: expected a folder with model_index.json")
    if out.resolve() == src.resolve():
        raise CLIError(f"--out {out} is the teacher's own folder; write the student somewhere else")
    pipe = load_pipeline(src, args.device)
    if not hasattr(pipe, "unet"):
        raise CLIError(f"{src} is a {type(pipe).__name__} without a UNet; assembly prunes UNet2DConditionModels")
    plan = _plan(args, pipe)
    student = assemble(pipe, plan=plan)
    save_assembled(student, out)
    report = student.unet.genfast_report
    params = report["params"]
    print(f"{args.preset}: UNet {params['teacher'] / 1e6:.2f}M -> {params['student'] / 1e6:.2f}M parameters "
          f"({params['student'] / params['teacher']:.2f}x); {len(report['copied'])} modules inherited, "
          f"{len(report['fresh'])} freshly initialised, {len(report['removed'])} teacher modules removed"
          + (f", {sum(len(v) for v in report['experts'].values())} inherited ME-CondConv experts"
             if plan.condconv_experts else ""))
    for name, why in report["fresh"].items():
        print(f"  fresh {name}: {why}")
    print(f"wrote {out} (plan and inheritance report in {out}/unet/genfast_assembly.json)")
    return 0


def add_assemble_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser(
        "assemble", help="prune a pipeline's UNet into a smaller student with the teacher's weights (BK-SDM presets, "
                         "auto at a target latency) and save it as a pipeline folder",
        description="Build a student UNet (fewer layers per stage, no mid block, fewer stages) whose modules "
                    "inherit the teacher's weights, optionally with ME-CondConv experts seeded from the removed "
                    "kernels and GRI attention, and write the pipeline with it to --out (atomically).")
    a.add_argument("pipeline", nargs="?", metavar="PIPELINE_DIR",
                   help="a local diffusers pipeline folder with a UNet (default: embedded genfast-mini)")
    a.add_argument("--preset", required=True, choices=PRESET_CHOICES,
                   help="bk-base: one layer per stage; bk-small: also no mid block; bk-tiny: also no innermost stage "
                        "(SDXL shapes: halves the deepest transformer instead); auto: from an analysis, at "
                        "--target-latency")
    a.add_argument("--target-latency", type=_fraction, metavar="R",
                   help="with --preset auto: the student's UNet latency as a fraction of the teacher's, in (0, 1)")
    a.add_argument("--prompt", action="append", help="with --preset auto: a prompt for the analysis (repeat)")
    a.add_argument("--prompts-file", help="with --preset auto: a text file with one analysis prompt per line")
    a.add_argument("--steps", type=_positive("--steps"), help="with --preset auto: analysis steps (default 25)")
    a.add_argument("--timesteps", type=_positive("--timesteps"),
                   help="with --preset auto: captured steps per prompt the analysis bypasses units on (default 5)")
    a.add_argument("--condconv", type=_positive("--condconv"), metavar="K",
                   help="turn every student resnet conv into an ME-CondConv with K experts seeded from the removed "
                        "layers' kernels")
    a.add_argument("--condconv-inherit", choices=("exact", "fit"),
                   help="exact: only same-shape removed kernels become experts; fit (default): also crop/zero-pad")
    a.add_argument("--gri-window", type=_positive("--gri-window"), metavar="W",
                   help="GRI attention (windowed + pooled global summary) on every self-attention, window W")
    a.add_argument("--gri-pooled", type=_positive("--gri-pooled"), metavar="P",
                   help="side of GRI's pooled global summary (default 4)")
    a.add_argument("--device", default="cpu", help="where the teacher is loaded and the student built")
    a.add_argument("--out", required=True, help="the student pipeline folder to write (replaced if it exists)")
    a.set_defaults(func=cmd_assemble)
    return a
