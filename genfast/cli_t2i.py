"""`genfast train-t2i`: train a text-to-image denoiser with genfast-mini's recipe and write a StableDiffusionPipeline.

``genfast train-t2i --model ascan-t2i-mini --out DIR`` trains the AsCAN text model (or ``--model unet``,
genfast-mini's UNet from scratch, or a config.json of either) on genfast-mini's data with its denoiser
recipe (genfast.training.t2i) and genfast-mini's text encoder FROZEN, and writes a StableDiffusionPipeline
folder with genfast-mini's VAE, text encoder, tokenizer and scheduler, which
``StableDiffusionPipeline.from_pretrained(DIR)`` loads (after ``import genfast`` for a genfast denoiser).
Interrupted runs resume from --work-dir.
"""

from __future__ import annotations

import argparse

from .cli_distill import _number, add_run_options, finish_run, recipe_options

__all__ = ["add_train_t2i_parser", "cmd_train_t2i"]

# CLI option -> T2IRecipe field, for the options left at the recipe's default unless given
_FIELDS = ("steps", "batch_size", "lr", "warmup", "p_uncond", "min_snr_gamma", "pool_size", "seed",
           "checkpoint_every", "max_minutes", "mixed_precision", "eval_every", "eval_images")


def cmd_train_t2i(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .io import check_output
    from .models import load_mini
    from .training.t2i import T2IRecipe, build_t2i_unet, save_t2i_pipeline, train_t2i

    options = recipe_options(args, _FIELDS)
    recipe = T2IRecipe(**options)  # validated before any loading
    out = check_output(args.out, folder=True)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    base = load_mini()
    unet = build_t2i_unet(args.model, seed=recipe.seed, cross_attention_dim=base.text_encoder.config.hidden_size)
    t0 = time.time()
    unet, finished = train_t2i(unet, work, recipe, base=base, progress=not args.quiet)

    def save():
        save_t2i_pipeline(unet, out, recipe, base=base, half=args.half,
                          extra={"model_spec": args.model, "minutes_this_run": round((time.time() - t0) / 60, 1)})
        print(f"wrote the StableDiffusionPipeline to {out} (per-step log: {work / 'train_log.jsonl'})")

    return finish_run(finished, work, save)


def add_train_t2i_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-t2i", help="train a text-to-image denoiser (UNet, AsCAN) with genfast-mini's recipe",
        description=(
            "Train a UNet2DConditionModel-compatible denoiser on genfast-mini's data (captioned shapes, 40,000 "
            "images encoded once by its VAE) with its denoiser recipe (v-prediction, min-SNR weight, 10% empty "
            "captions for guidance, EMA; 4,500 steps of 64 by default). genfast-mini's text encoder stays "
            "frozen (genfast-mini trained its own jointly). Writes a StableDiffusionPipeline folder with "
            "genfast-mini's VAE, text encoder, tokenizer and scheduler. Interrupted runs resume from --work-dir."
        ),
    )
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="'unet' (genfast-mini's UNet2DConditionModel from scratch), 'ascan-<config>' (e.g. "
                        "ascan-t2i-mini), or a config.json of a UNet2DConditionModel or AsCANUNet2DConditionModel")
    p.add_argument("--out", metavar="DIR", required=True, help="the StableDiffusionPipeline folder to write")
    p.add_argument("--work-dir", metavar="DIR", help="checkpoints, latent pool and log (default: OUT.work); "
                                                     "rerun to resume")
    add_run_options(p, steps="default 4500", lr="peak learning rate (default 1e-3)",
                    pool="images encoded once (default 40000)",
                    eval_every="log the prompt accuracy of the EMA weights every N steps (default 500; 0: never)",
                    eval_images="held-out prompts per evaluation (default 64; needs --eval-every > 0)")
    p.add_argument("--p-uncond", type=_number("--p-uncond"),
                   help="chance a caption is left empty, for guidance (default 0.1)")
    p.add_argument("--min-snr-gamma", type=_number("--min-snr-gamma", strict=True),
                   help="min-SNR loss weight's gamma (default 5)")
    p.add_argument("--seed", type=_number("--seed", int), help="default 0")
    p.set_defaults(func=cmd_train_t2i)
    return p
