"""`genfast analyze`: which resnets, attentions and blocks of a UNet matter (genfast.assembly.analyze)."""

from __future__ import annotations

from .cli import CLIError, _positive, _read_prompts


def add_analyze_parser(subparsers) -> None:
    a = subparsers.add_parser(
        "analyze", help="bypass each resnet, attention and block of a UNet and rank them by output change, "
                        "with their shares of parameters and latency (analysis.json/.md, heatmap.png)")
    a.add_argument("pipeline", nargs="?", metavar="PIPELINE_DIR",
                   help="a local diffusers pipeline folder with a UNet2DConditionModel (default: embedded "
                        "genfast-mini)")
    a.add_argument("--prompt", action="append", help="a prompt (repeat for several); default: 16 shapes")
    a.add_argument("--prompts-file", help="a text file with one prompt per line")
    a.add_argument("--num-prompts", type=_positive("--num-prompts"),
                   help="use this many prompts (the given ones cycled or cut); default: all of them")
    a.add_argument("--steps", type=_positive("--steps"), default=25, help="denoising steps of each pipeline call")
    a.add_argument("--timesteps", type=_positive("--timesteps"), default=5,
                   help="how many evenly spaced denoising steps are captured and replayed (<= --steps)")
    a.add_argument("--guidance", type=float, default=5.0)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--batch-size", type=_positive("--batch-size"), default=8, help="prompts per pipeline call")
    a.add_argument("--device", default="cpu", help="where the pipeline runs (cpu, cuda ...)")
    a.add_argument("--out", default="outputs/analyze",
                   help="folder for analysis.json, analysis.md and heatmap.png (created; other files kept)")
    a.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from .assembly.analyze import NotAUNetPipelineError, analyze, check_settings
    from .io import check_output
    from .models import load_mini
    from .quant.saving import load_pipeline

    prompts = _read_prompts(args)
    if args.num_prompts is not None:
        prompts = [prompts[i % len(prompts)] for i in range(args.num_prompts)]
    check_settings(len(prompts), args.steps, args.timesteps)  # before loading anything
    out = check_output(args.out, folder=True, what="--out")
    pipe = load_pipeline(args.pipeline, args.device) if args.pipeline else load_mini(args.device)
    try:
        analysis = analyze(pipe, prompts, num_inference_steps=args.steps, timesteps=args.timesteps,
                           guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size)
    except NotAUNetPipelineError as err:
        raise CLIError(str(err)) from None
    analysis.save(out)
    print(f"{'unit':<32} {'kind':<9} {'params':>7} {'latency':>8} {'change':>8}")
    for u in analysis.ranked()[:10]:
        print(f"{u.name:<32} {u.kind:<9} {u.param_share:7.2%} {u.latency_share:8.2%} {u.output_change:8.4f}")
    print(f"wrote {out}/analysis.json, analysis.md, heatmap.png ({len(analysis.units)} units, "
          f"{analysis.meta['wall_s']:.1f} s)")
    return 0
