"""`genfast train-class`: train a class-conditional denoiser on the class shapes and write a DiTPipeline.

``genfast train-class --model dit --steps 4000 --out DIR`` trains genfast's DiT baseline (or
``--model lamamba-mini``, ``--model ascan-mini``, or a config.json of any of them) with the one class-conditional recipe
(genfast.training.class_cond) and writes a DiTPipeline folder with genfast-mini's VAE and sampler,
which ``DiTPipeline.from_pretrained(DIR)`` loads. Interrupted runs resume from --work-dir.
"""

from __future__ import annotations

import argparse

from .cli_distill import _number, add_run_options, finish_run, recipe_options

__all__ = ["add_train_class_parser", "cmd_train_class"]

# CLI option -> ClassCondRecipe field, for the options left at the recipe's default unless given
_FIELDS = ("steps", "batch_size", "lr", "warmup", "label_dropout", "min_snr_gamma", "pool_size", "seed",
           "checkpoint_every", "max_minutes", "mixed_precision", "eval_every", "eval_images")


def cmd_train_class(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .io import check_output
    from .training.class_cond import ClassCondRecipe, build_denoiser, save_class_pipeline, train_class_conditional

    options = recipe_options(args, _FIELDS)
    if args.plain_loss:
        options["min_snr_gamma"] = None
    recipe = ClassCondRecipe(**options)  # validated before any loading
    out = check_output(args.out, folder=True)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    model = build_denoiser(args.model, args.params, args.layers, seed=recipe.seed)
    t0 = time.time()
    model, finished = train_class_conditional(model, work, recipe, progress=not args.quiet)
    def save():
        save_class_pipeline(model, out, recipe, half=args.half,
                            extra={"model_spec": args.model, "minutes_this_run": round((time.time() - t0) / 60, 1)})
        print(f"wrote the DiTPipeline to {out} (per-step log: {work / 'train_log.jsonl'})")

    return finish_run(finished, work, save)


def add_train_class_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-class", help="train a class-conditional denoiser (DiT, LaMamba-Diff, AsCAN) on the class shapes",
        description=(
            "Train a class-conditional denoiser on the class-conditional shapes (24 classes: shape x colour) in "
            "genfast-mini's latent space with one recipe for every backbone (v-prediction, min-SNR weight, "
            "label dropout for classifier-free guidance, EMA), and write a DiTPipeline folder. Interrupted "
            "runs resume from --work-dir."
        ),
    )
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="'dit' (the DiT baseline), 'lamamba-<config>' (e.g. lamamba-mini), 'ascan-<config>' "
                        "(ascan-mini, or its symmetric control ascan-mini-symmetric), or a config.json of any of them")
    p.add_argument("--params", type=_number("--params", int, 10_000),
                   help="the DiT baseline's parameter target (only with --model dit; default 2000000)")
    p.add_argument("--layers", type=_number("--layers", int, 1),
                   help="the DiT baseline's depth; its width is then the one nearest --params (only with --model dit)")
    p.add_argument("--out", metavar="DIR", required=True, help="the DiTPipeline folder to write")
    p.add_argument("--work-dir", metavar="DIR", help="checkpoints, latent pool and log (default: OUT.work); "
                                                     "rerun to resume")
    add_run_options(p, steps="default 4000", lr="peak learning rate (default 1e-3)",
                    pool="images encoded once (default 20000)",
                    eval_every="log the class accuracy of the EMA weights every N steps (default 0: never)",
                    eval_images="images sampled per evaluation (default 48; needs --eval-every)")
    p.add_argument("--label-dropout", type=_number("--label-dropout"),
                   help="chance a label is replaced by the null class, for guidance (default 0.1)")
    guard = p.add_mutually_exclusive_group()
    guard.add_argument("--min-snr-gamma", type=_number("--min-snr-gamma", strict=True),
                       help="min-SNR loss weight's gamma (default 5)")
    guard.add_argument("--plain-loss", action="store_true", help="unweighted MSE on v instead of min-SNR")
    p.add_argument("--seed", type=_number("--seed", int), help="default 0")
    p.set_defaults(func=cmd_train_class)
    return p
