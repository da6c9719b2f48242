"""`genfast sweep-bits`: the bit-level scaling sweep (genfast.eval.sweep_bits) from the command line.

``genfast sweep-bits --var DIR [DIR ..] --dit DIR [DIR ..] [--bits 16 8 6 4 3 2] [--kinds int fp]
[--modes ptq qat] [--num-images N] [--qat-steps N] --out DIR`` measures every model x format x mode and
writes results.json, results.md and scaling.png into --out; rerun the same command to resume.
A model is named after its folder, or NAME=DIR names it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_distill import _number

__all__ = ["add_sweep_parser", "cmd_sweep_bits"]


def _models(args) -> list[tuple[str, str, Path]]:
    models = []
    for family, given in (("var", args.var or []), ("dit", args.dit or [])):
        for text in given:
            name, sep, folder = text.partition("=")
            folder = Path(folder if sep else text)
            models.append((family, name if sep else folder.resolve().name, folder))
    if not models:
        raise ValueError("give the models to sweep: --var VARPipeline folders and / or --dit DiTPipeline folders")
    names = [m[1] for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two models are named {twice[0]!r} (named after their folders): name them, NAME=DIR")
    return models


def cmd_sweep_bits(args: argparse.Namespace) -> int:
    from .eval.sweep_bits import formats_for, sweep_bits
    from .io import check_output

    models = _models(args)
    families = {m[0] for m in models}
    for option, family in (("var_top_k", "var"), ("var_top_p", "var"), ("dit_steps", "dit")):
        if getattr(args, option) is not None and family not in families:
            raise ValueError(f"--{option.replace('_', '-')} has no effect without --{family} models: drop it")
    qat_given = [o for o in ("qat_steps", "qat_loss", "qat_lora_rank") if getattr(args, o) is not None]
    if qat_given and "qat" not in args.modes:
        raise ValueError(f"--{qat_given[0].replace('_', '-')} has no effect without --modes qat: add it or drop the "
                         f"option")
    sampling = {}
    if args.var_top_k is not None or args.var_top_p is not None:
        sampling["var"] = {k: v for k, v in (("top_k", args.var_top_k), ("top_p", args.var_top_p)) if v is not None}
    if args.dit_steps is not None:
        sampling["dit"] = {"num_inference_steps": args.dit_steps}
    qat_options = {k: v for k, v in (("loss", args.qat_loss), ("lora_rank", args.qat_lora_rank)) if v is not None}
    out = check_output(args.out, folder=True)
    sweep_bits(models, formats_for(args.bits, args.kinds), out, modes=args.modes, num_images=args.num_images,
               qat_steps=args.qat_steps, granularity=args.granularity, sampling=sampling, qat_options=qat_options,
               device=args.device)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'scaling.png'}")
    return 0


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    from .eval.sweep_bits import BITS, KINDS, MODES

    p = subparsers.add_parser(
        "sweep-bits", help="quality against total model bits: every model x weight format x PTQ / QAT",
        description=(
            "The bit-level scaling sweep: each VARPipeline (--var) and DiTPipeline (--dit) folder, its denoiser "
            "rounded to float16 (the 16-bit row) and quantized to every --bits x --kinds format by round to "
            "nearest (ptq) and by distillation from the 16-bit model (qat), sampled for the balanced held-out "
            "classes with fixed seeds and judged by class accuracy, FID[mini-features] against held-out renders "
            "and PSNR to the 16-bit images. Total bits: quantized weights x bits + their stored scales + every "
            "other denoiser parameter x 16. Writes results.json (after every row), results.md and scaling.png; "
            "rerun the same command to resume."),
    )
    p.add_argument("--var", nargs="+", metavar="DIR", help="language-style models: VARPipeline folders (NAME=DIR "
                                                           "names one; default: the folder's name)")
    p.add_argument("--dit", nargs="+", metavar="DIR", help="diffusion-style models: DiTPipeline folders (NAME=DIR)")
    p.add_argument("--bits", nargs="+", type=int, choices=BITS, default=list(BITS), metavar="B",
                   help=f"bit widths, from {' '.join(map(str, BITS))} (default: all; 16, the float16 row, is always measured)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="int: int{B}; fp: fp8_e4m3, fp6_e2m3, fp4_e2m1, fp3_e2m0, fp2_e1m0 (default: both)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="ptq: round to nearest; qat: genfast.training.qat distillation (default: both)")
    p.add_argument("--num-images", type=_number("--num-images", int, 2), default=96,
                   help="images per row, the balanced held-out classes (default 96)")
    p.add_argument("--qat-steps", type=_number("--qat-steps", int, 1), help="QAT steps per row (default: QATConfig's)")
    p.add_argument("--qat-loss", choices=("topkld", "fkl", "rkl", "js", "logit_mse"),
                   help="the VAR models' distillation loss (default topkld, K = the sampler's top-k); DiT-style "
                        "models always distil their outputs")
    p.add_argument("--qat-lora-rank", type=_number("--qat-lora-rank", int), help="QATConfig.lora_rank (default 0)")
    p.add_argument("--granularity", default="channel", help="weight scales: channel (default), tensor or group:N")
    p.add_argument("--var-top-k", type=_number("--var-top-k", int),
                   help="VAR sampler's top-k, also TopKLD's K (default: the folder's, else 0 = off)")
    p.add_argument("--var-top-p", type=_number("--var-top-p"), help="VAR sampler's top-p (default: the folder's, "
                                                                    "else 0 = off)")
    p.add_argument("--dit-steps", type=_number("--dit-steps", int, 1),
                   help="DiT sampling steps (default: evaluate_pipeline's 20)")
    p.add_argument("--device", default="cpu", help="where models sample and train: cpu (default), cuda")
    p.add_argument("--out", metavar="DIR", required=True, help="the sweep's folder (resumed when it holds one)")
    p.set_defaults(func=cmd_sweep_bits)
    return p
