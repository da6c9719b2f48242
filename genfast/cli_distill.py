"""`genfast distill`: SAS distillation (with progressive incubation) of an assembled student.

``genfast distill --student DIR --out DIR`` trains the student a folder written by ``genfast
assemble`` holds against its teacher (default: the embedded genfast-mini) and writes the distilled
pipeline: the teacher's components with the student as unet, plus distill.json. Under ``accelerate
launch`` it runs on every process the launcher starts (genfast.training.loop).
"""

from __future__ import annotations

import argparse

__all__ = ["add_distill_parser", "cmd_distill"]


def _number(name: str, kind=float, low: float = 0.0, strict: bool = False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
        return value

    return parse


# CLI option -> DistillConfig field, for the options left unset unless given
_FIELDS = {"steps": "steps", "incubation_steps": "incubation_steps", "batch_size": "batch_size", "lr": "lr",
           "warmup": "warmup", "task_weight": "task", "kd_out_weight": "kd_out", "kd_feat_weight": "kd_feat",
           "sas_weight": "sas", "sas_encoder": "sas_encoder", "sas_batch": "sas_batch", "data": "data",
           "pool_size": "pool_size", "resolution": "resolution", "seed": "seed", "ema": "ema",
           "max_minutes": "max_minutes", "checkpoint_every": "checkpoint_every",
           "mixed_precision": "mixed_precision"}


def _plan(args: argparse.Namespace, teacher_config):
    """The AssemblyPlan of --preset, or of --plan (JSON text, or a file holding it: a plan, or a
    genfast_assembly.json whose "plan" it reads)."""
    import json
    from pathlib import Path

    from .assembly.plan import AssemblyPlan, plan_preset
    from .cli import CLIError

    if args.preset is not None:
        return plan_preset(args.preset, teacher_config)
    text = args.plan
    if not text.lstrip().startswith("{"):
        if not Path(text).is_file():
            raise CLIError(f"--plan {text!r} is neither JSON nor a file; give a plan such as "
                           f"'{{\"mid_block\": false, \"drop_stages\": 1}}'")
        text = Path(text).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(f"--plan is not valid JSON: {err}") from None
    return AssemblyPlan.from_dict(data.get("plan", data) if isinstance(data, dict) else data)


def cmd_distill(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .assembly.student import build_student, load_student
    from .cli import CLIError
    from .io import check_output
    from .models import load_mini, load_pipeline
    from .training.distill import DistillConfig, check_pipeline, run_distill, save_distilled

    options = {field: getattr(args, arg) for arg, field in _FIELDS.items() if getattr(args, arg) is not None}
    if args.no_feature_norm:
        options["feature_norm"] = False
    config = DistillConfig(**options)  # validated before any loading
    out = check_output(args.out, folder=True)
    if args.student is not None:
        student_dir = Path(args.student)
        if not student_dir.is_dir():
            raise CLIError(f"--student {student_dir} is not a folder; give one written by `genfast assemble`")
    teacher = load_pipeline(args.teacher) if args.teacher else load_mini()
    if args.student is None:  # assemble here, so one command makes the distilled student from the teacher
        student, _ = build_student(teacher.unet, _plan(args, teacher.unet.config))
    else:
        student = load_student(student_dir)
        if getattr(student, "genfast_plan", None) is None:
            raise CLIError(f"{student_dir} holds no assembled student (no unet/genfast_assembly.json); make one "
                           f"with `genfast assemble`")
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    try:
        check_pipeline(teacher, student)
    except TypeError as err:  # a teacher of another kind: one line, not a traceback
        raise CLIError(str(err)) from None
    student, finished = run_distill(teacher, student, work, config, progress=not args.quiet)
    def save():
        save_distilled(teacher, student, out, config, work)
        print(f"wrote the distilled pipeline to {out} (distill.json beside it holds the config and final losses; "
              f"the per-step log is {work / 'distill_log.jsonl'})")

    return finish_run(finished, work, save)


def recipe_options(args: argparse.Namespace, fields: tuple[str, ...]) -> dict:
    """A training command's recipe options: the given ones of `fields` (the rest stay at the recipe's
    defaults), and --ema X / --no-ema as the recipe's ema_decay / ema_power."""
    options = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.no_ema:
        options.update(ema_decay=None, ema_power=None)
    elif args.ema is not None:
        options["ema_decay"] = args.ema
    return options


def add_run_options(p: argparse.ArgumentParser, *, steps: str, lr: str, pool: str, eval_every: str,
                    eval_images: str, half: str = "store the weights in fp16 (half the size; load as fp32)",
                    max_minutes: str = "checkpoint and stop after this long; rerun to resume",
                    mixed_precision: str | None = None) -> None:
    """The options every training command shares (budget, EMA, pool, checkpoints, evaluation, output);
    the strings are each command's help texts, which name its defaults."""
    p.add_argument("--steps", type=_number("--steps", int, 1), help=steps)
    p.add_argument("--batch-size", type=_number("--batch-size", int, 1), help="default 64")
    p.add_argument("--lr", type=_number("--lr", strict=True), help=lr)
    p.add_argument("--warmup", type=_number("--warmup", int), help="warmup steps (default 200)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", type=float, help="EMA decay in (0, 1) (default 0.9995); the output holds the averages")
    ema.add_argument("--no-ema", action="store_true", help="no EMA: the output holds the last weights")
    p.add_argument("--pool-size", type=_number("--pool-size", int, 1), help=pool)
    p.add_argument("--checkpoint-every", type=_number("--checkpoint-every", int, 1), help="default 250")
    p.add_argument("--max-minutes", type=_number("--max-minutes", strict=True), help=max_minutes)
    p.add_argument("--eval-every", type=_number("--eval-every", int), help=eval_every)
    p.add_argument("--eval-images", type=_number("--eval-images", int, 1), help=eval_images)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help=mixed_precision)
    p.add_argument("--half", action="store_true", help=half)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def finish_run(finished: bool, work, save) -> int:
    """The end of a training command: a run stopped by --max-minutes says how to resume; a finished one is
    saved by `save()` on the main process only (under `accelerate launch` one process writes the folder)."""
    from accelerate import PartialState

    state = PartialState()
    if not finished:
        if state.is_main_process:
            print(f"stopped by --max-minutes; checkpoint in {work}. Run the same command again to resume.")
        return 0
    if state.is_main_process:
        save()
    state.wait_for_everyone()
    return 0


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill", help="distil an assembled student from its teacher (SAS + feature KD, progressive incubation)",
        description=(
            "Train the student UNet of a folder written by `genfast assemble` against its teacher: task loss, "
            "output KD, per-layer normalised feature KD, the semantic (SAS) term on decoded predictions, after "
            "optional incubation of each student block inside the frozen teacher. Writes the teacher's pipeline "
            "with the student as its unet, and distill.json. Interrupted runs resume from --work-dir."
        ),
    )
    p.add_argument("--teacher", metavar="DIR", help="the teacher pipeline folder (default: embedded genfast-mini)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--student", metavar="DIR", help="a pipeline (or unet) folder from genfast assemble")
    which.add_argument("--plan", metavar="JSON",
                       help="assemble the student here from an AssemblyPlan: JSON text or a file (a plan, or a "
                            "genfast_assembly.json)")
    which.add_argument("--preset", choices=("bk-base", "bk-small", "bk-tiny"),
                       help="assemble the student here with a BK-SDM preset")
    p.add_argument("--out", metavar="DIR", required=True, help="the distilled pipeline folder to write")
    p.add_argument("--work-dir", metavar="DIR", help="checkpoints, latent pool and log (default: OUT.work); "
                                                     "rerun to resume")
    p.add_argument("--steps", type=_number("--steps", int, 1), help="end-to-end steps (default 1000)")
    p.add_argument("--incubation-steps", type=_number("--incubation-steps", int),
                   help="steps of incubation before them, shared by the units (default 0: none)")
    p.add_argument("--batch-size", type=_number("--batch-size", int, 1), help="default 64")
    p.add_argument("--lr", type=_number("--lr", strict=True), help="peak learning rate (default 5e-4)")
    p.add_argument("--warmup", type=_number("--warmup", int), help="warmup steps of each phase (default 50)")
    p.add_argument("--task-weight", type=_number("--task-weight"), help="default 1")
    p.add_argument("--kd-out-weight", type=_number("--kd-out-weight"), help="default 1")
    p.add_argument("--kd-feat-weight", type=_number("--kd-feat-weight"), help="default 1")
    p.add_argument("--no-feature-norm", action="store_true",
                   help="feature KD as BK-SDM's plain MSE sum, not normalised per layer")
    p.add_argument("--sas-weight", type=_number("--sas-weight"), help="the semantic term's weight (default 1.0)")
    p.add_argument("--sas-encoder", metavar="PATH",
                   help="'evaluator' (default: genfast-mini's classifier) or a local CLIPVisionModelWithProjection "
                        "folder")
    p.add_argument("--sas-batch", type=_number("--sas-batch", int, 1),
                   help="samples per batch decoded for the SAS term (default 16)")
    p.add_argument("--data", help="'shapes' (default: genfast-mini's data) or a folder of images with .txt captions")
    p.add_argument("--pool-size", type=_number("--pool-size", int, 1), help="shapes images encoded (default 10000)")
    p.add_argument("--resolution", type=_number("--resolution", int, 8),
                   help="side of a data folder's images (default: the teacher's)")
    p.add_argument("--ema", type=float, help="EMA decay in (0, 1); the output holds the averaged weights")
    p.add_argument("--seed", type=_number("--seed", int), help="default 0")
    p.add_argument("--checkpoint-every", type=_number("--checkpoint-every", int, 1), help="default 250")
    p.add_argument("--max-minutes", type=_number("--max-minutes", strict=True),
                   help="checkpoint and stop after this long; rerun to resume")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distill)
    return p
