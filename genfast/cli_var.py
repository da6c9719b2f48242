"""`genfast train-var`: train the language-style generator (VQ tokenizer, then VAR transformer) on the class
shapes and write a VARPipeline folder.

``genfast train-var --size 2M --out DIR`` trains the tokenizer (genfast.training.vq_train), then a VAR
transformer of that size on its tokens (genfast.training.var_train); ``--tokenizer DIR`` reuses a trained
tokenizer (a VARPipeline folder or WORK/tokenizer) instead. ``VARPipeline.from_pretrained(DIR)`` loads the
result. Interrupted runs resume from --work-dir.
"""

from __future__ import annotations

import argparse

from .cli_distill import _number, add_run_options, finish_run, recipe_options

__all__ = ["add_train_var_parser", "cmd_train_var"]

# CLI option -> VARRecipe field; tokenizer_<x> -> VQRecipe field <x>; left at the recipe's default unless given
_FIELDS = ("steps", "batch_size", "lr", "warmup", "label_dropout", "label_smoothing", "pool_size", "seed",
           "checkpoint_every", "max_minutes", "mixed_precision", "eval_every", "eval_images")
_TOKENIZER_FIELDS = ("steps", "batch_size", "lr", "restart_every")


def cmd_train_var(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .io import check_output
    from .training.var_train import VARRecipe, train_var_generator
    from .training.vq_train import VQRecipe

    options = recipe_options(args, _FIELDS)
    recipe = VARRecipe(**options)  # validated before any loading
    tok_options = {f: getattr(args, f"tokenizer_{f}") for f in _TOKENIZER_FIELDS
                   if getattr(args, f"tokenizer_{f}") is not None}
    if args.tokenizer is not None and tok_options:
        given = ", ".join(f"--tokenizer-{f.replace('_', '-')}" for f in tok_options)
        raise ValueError(f"{given} has no effect with --tokenizer (a trained tokenizer is reused): drop one of them")
    tok_recipe = VQRecipe(**{"seed": recipe.seed, **tok_options}) if args.tokenizer is None else None
    out = check_output(args.out, folder=True)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    result = train_var_generator(args.size, out, work, recipe, tok_recipe, tokenizer=args.tokenizer, half=args.half,
                                 progress=not args.quiet)

    def save():  # train_var_generator has written the folder already
        print(f"wrote the VARPipeline to {out} (per-step logs: {work / 'tokenizer.work' / 'train_log.jsonl'}, "
              f"{work / 'transformer.work' / 'train_log.jsonl'})")

    return finish_run(result is not None, work, save)


def add_train_var_parser(subparsers) -> argparse.ArgumentParser:
    from .generators.var import VAR_CONFIGS

    p = subparsers.add_parser(
        "train-var", help="train the language-style generator (VQ tokenizer + VAR transformer) on the class shapes",
        description=(
            "Train a multi-scale residual VQ tokenizer on the class-conditional shapes (24 classes), then a VAR-style "
            "next-scale transformer on its tokens (cross-entropy, label dropout for classifier-free guidance, EMA; "
            "the budget of train-class), and write a VARPipeline folder. The tokenizer's held-out PSNR and "
            "codebook usage go to training.json. Interrupted runs resume from --work-dir."
        ),
    )
    p.add_argument("--size", required=True, choices=tuple(VAR_CONFIGS), help="the transformer's named size")
    p.add_argument("--out", metavar="DIR", required=True, help="the VARPipeline folder to write")
    p.add_argument("--work-dir", metavar="DIR", help="checkpoints, token pool, trained tokenizer and logs "
                                                     "(default: OUT.work); rerun to resume")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="DIR",
                     help="reuse this trained tokenizer (a VARPipeline folder, or WORK/tokenizer of an earlier run)")
    tok.add_argument("--tokenizer-steps", type=_number("--tokenizer-steps", int, 1),
                     help="tokenizer training steps (default 2000)")
    p.add_argument("--tokenizer-batch-size", type=_number("--tokenizer-batch-size", int, 1),
                   help="tokenizer batch size (default 32)")
    p.add_argument("--tokenizer-lr", type=_number("--tokenizer-lr", strict=True),
                   help="tokenizer peak learning rate (default 3e-4)")
    p.add_argument("--tokenizer-restart-every", type=_number("--tokenizer-restart-every", int),
                   help="move unused codes onto batch latents every N tokenizer steps (default 100; 0: never)")
    add_run_options(p, steps="transformer steps (default 4000)", lr="peak learning rate (default 5e-4)",
                    pool="images tokenized once for the transformer (default 20000)",
                    eval_every="log the class accuracy of the EMA weights every N transformer steps (default 0: never)",
                    eval_images="images sampled per evaluation (default 48; needs --eval-every)",
                    half="store the weights in fp16 (half the size)", mixed_precision="for the transformer",
                    max_minutes="checkpoint and stop after this long (both stages together); rerun to resume")
    p.add_argument("--label-dropout", type=_number("--label-dropout"),
                   help="chance a label is replaced by the null class, for guidance (default 0.1)")
    p.add_argument("--label-smoothing", type=_number("--label-smoothing"),
                   help="cross-entropy label smoothing (default 0; VAR uses 0.1)")
    p.add_argument("--seed", type=_number("--seed", int), help="default 0 (both stages)")
    p.set_defaults(func=cmd_train_var)
    return p
