"""The `genfast` command."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

DEFAULT_PROMPTS = [
    f"a {color} {shape}"
    for shape in ("circle", "square", "triangle", "star")
    for color in ("red", "green", "blue", "yellow")
]


DEFAULT_COMPARE_METHOD = "feature_inheritance:interval=2,3,5"


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
    from .models import load_mini
    from .quant.saving import load_pipeline

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


def cmd_compare(args) -> int:
    import shlex

    from .eval.compare import CompareSettings, run_compare
    from .eval.variants import parse_variants

    methods = args.method or ([] if args.pipeline_variant else [DEFAULT_COMPARE_METHOD])
    variants = parse_variants(methods, args.pipeline_variant or [])  # bad specs fail before loading
    prompts = _read_prompts(args) if args.prompts_file else None
    settings = CompareSettings(
        pipeline=args.pipeline, prompts=prompts, num_images=args.num_images, steps=args.steps,
        guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, runs=args.runs,
        feature_space=args.feature_space, inception_weights=args.inception_weights,
        lpips_weights=args.lpips_weights, dtype=args.dtype, out=args.out,
        command=shlex.join(["genfast", *args.argv]),
    )
    report = run_compare(settings, variants)
    if report is not None:  # the main process
        for row in report["variants"]:
            print(f"{row['name']:<48} {row['speedup']:5.2f}x  PSNR {row['faithfulness']['psnr']:6.2f} dB")
        print(f"wrote {args.out}/report.md, report.json, grid.png, pareto.png")
    return 0


@contextlib.contextmanager
def _layer_progress(total: int, desc: str):
    """A tqdm bar over the layers genfast.quantize packs.

    genfast.quantize takes no progress callback; its quantize_layer registers each layer's weight as
    a buffer before packing it, which torch's global buffer-registration hook reports."""
    import torch
    from tqdm.auto import tqdm

    from .quant.quantize import LAYER_TYPES

    with tqdm(total=total, desc=desc, unit="layer") as progress:
        def tick(module, name, _buffer):
            if name == "weight" and isinstance(module, LAYER_TYPES):
                progress.update()

        hook = torch.nn.modules.module.register_module_buffer_registration_hook(tick)
        try:
            yield
        finally:
            hook.remove()


def cmd_quantize(args) -> int:
    import torch

    from .models import MINI, asset_path
    from .pipelines import denoiser_of
    from .quant import QuantConfig, quantize
    from .quant.quantize import quantizable
    from .quant.saving import check_out, folder_bytes, is_quantized_folder, load_pipeline, save_quantized, weights_dtype

    options = {} if args.skip is None else {"skip": tuple(args.skip)}
    # the folder stores genfast's packed codes whatever kernel would run them: never torchao's tensors
    config = QuantConfig(weights=args.weights, granularity=args.granularity, symmetric=args.symmetric,
                         kernel="dequantize", **options)
    out = check_out(args.out, what="--out")  # before any work
    src = Path(args.pipeline) if args.pipeline else asset_path(MINI)
    if is_quantized_folder(src):
        raise CLIError(f"{src} is already a genfast quantized pipeline; quantize the float pipeline it came from")
    if not (src / "model_index.json").is_file():
        raise CLIError(f"no diffusers pipeline at {src}: expected a folder with model_index.json")
    dtype = weights_dtype(src) if args.dtype == "auto" else getattr(torch, args.dtype)
    pipe = load_pipeline(src, args.device, dtype)
    model = denoiser_of(pipe)
    attr = next(name for name, c in pipe.components.items() if c is model)
    with _layer_progress(len(quantizable(model, config.skip)), f"quantizing {attr} to {config.weights}"):
        handle = quantize(pipe, config)
    save_quantized(pipe, out, handle)
    before, after = folder_bytes(src / attr), folder_bytes(out / attr)
    scales = config.granularity or f"block:{config.format.block}"
    print(f"{handle.stats['quantized_layers']} layers of {attr} -> {config.weights} ({scales}, {dtype}): "
          f"{attr}/ {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB on disk ({after / before:.3f}x); wrote {out}")
    return 0


def cmd_train_mini(args) -> int:
    from .training.mini import MiniRecipe, train_mini

    overrides = {n: getattr(args, n) for n in ("clf_steps", "vae_steps", "unet_steps") if getattr(args, n) is not None}
    recipe = dataclasses.replace(MiniRecipe.tiny() if args.tiny else MiniRecipe(), **overrides)  # re-validated
    out = train_mini(args.out, args.work_dir, recipe)
    print(f"genfast-mini written to {out}")
    return 0


def cmd_train_heads(args) -> int:
    from .training.heads import HeadsRecipe, train_heads
    from .training.identity import train_identity

    names = {"steps": "steps", "identities": "identities", "max_minutes": "max_minutes"}
    overrides = {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}
    recipe = dataclasses.replace(HeadsRecipe.tiny() if args.tiny else HeadsRecipe(), **overrides)  # re-validated
    out = train_heads(args.out, args.work_dir, recipe)
    print(f"genfast-heads written to {out}")
    identity = Path(args.out).with_name("genfast-identity")
    if identity.exists():
        print(f"{identity} exists, skipping the identity embedding (delete it to retrain)")
    else:
        train_identity(args.work_dir, identity, steps=20 if args.tiny else 600)
        print(f"identity embedding written to {identity}")
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

    c = sub.add_parser("compare", help="baseline vs accelerated variants: speed, FID, faithfulness, report")
    c.add_argument("--method", action="append",
                   help="a registered method (any verb) with option sweeps, e.g. feature_inheritance:interval=2,3,5, "
                        "or a chain applied left to right, e.g. quantize:weights=int8+feature_inheritance:interval=3 "
                        "(a '+' before a method name starts the next method; other '+' join tuple values: "
                        "branch_units=attn1+attn2). Repeat for several; default, unless --pipeline-variant is "
                        f"given: {DEFAULT_COMPARE_METHOD}")
    c.add_argument("--pipeline-variant", action="append", metavar="DIR",
                   help="a diffusers pipeline folder (an assembled or quantized model) run as a variant, loaded "
                        "like the baseline and run on the same prompts and seeds (repeat for several)")
    c.add_argument("--pipeline", help="a local diffusers pipeline folder: text-to-image, or class-conditional "
                                      "(a DiTPipeline, e.g. from genfast train-class) (default: embedded genfast-mini)")
    c.add_argument("--prompts", dest="prompts_file",
                   help="a text file with one prompt per line, cycled to --num-images (default: held-out "
                        "genfast-mini evaluation prompts); for a DiTPipeline one class label per line, e.g. "
                        "'red circle' (default: the held-out classes, each in turn)")
    c.add_argument("--steps", type=_positive("--steps"), default=25)
    c.add_argument("--num-images", type=_positive("--num-images"), default=64)
    c.add_argument("--seed", type=int, default=0, help="image i has seed SEED + i")
    c.add_argument("--guidance", type=float, default=5.0)
    c.add_argument("--batch-size", type=_positive("--batch-size"), default=32)
    c.add_argument("--runs", type=_positive("--runs"), default=3, help="timed calls per variant (median)")
    c.add_argument("--feature-space", choices=("auto", "mini-features", "inception"), default="auto",
                   help="FID features; auto: Inception when its weights are on disk, else mini-features")
    c.add_argument("--inception-weights", help="clean-fid's inception-2015-12-05.pt (file or folder)")
    c.add_argument("--lpips-weights", help="torchvision's AlexNet weights for LPIPS (default: torch hub cache)")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    c.add_argument("--out", default="outputs/compare")
    c.set_defaults(func=cmd_compare)

    q = sub.add_parser("quantize", help="quantize a pipeline's denoiser and save it as a pipeline folder "
                                        "(bit-packed codes + scales in safetensors, a JSON config)")
    q.add_argument("pipeline", nargs="?", metavar="PIPELINE_DIR",
                   help="a local diffusers pipeline folder (default: embedded genfast-mini)")
    q.add_argument("--weights", required=True,
                   help="int2..int8, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, fp3_e2m0, fp2_e1m0, mxfp8, mxfp6, mxfp4, nvfp4")
    q.add_argument("--granularity", help="channel (default), tensor or group:N; not for mx*/nvfp4 (fixed blocks)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_const", const=True, default=None,
                     help="integer formats: a grid around 0 (the default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False,
                     help="integer formats: min/max with a zero point")
    q.add_argument("--skip", nargs="*", metavar="PATTERN",
                   help="module names (fnmatch patterns) left in float, replacing the default list (first and "
                        "last conv, embeddings); --skip alone quantizes every Linear and Conv2d")
    q.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="dtype the pipeline is loaded, quantized and saved in; auto: that of its weights on disk")
    q.add_argument("--device", default="cpu", help="where the weights are quantized (cpu, cuda ...)")
    q.add_argument("--out", required=True, help="the quantized pipeline folder to write (new, empty, or a "
                                                "quantized folder, which is replaced)")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("train-mini", help="train genfast-mini and its evaluator from scratch (CPU, ~1 h)")
    t.add_argument("--out", default="assets", help="where the models are written")
    t.add_argument("--work-dir", default=".genfast-train/mini", help="checkpoints; rerun to resume")
    t.add_argument("--clf-steps", type=_positive("--clf-steps"))
    t.add_argument("--vae-steps", type=_positive("--vae-steps"))
    t.add_argument("--unet-steps", type=_positive("--unet-steps"))
    t.add_argument("--tiny", action="store_true", help="a few steps of everything (smoke test)")
    t.set_defaults(func=cmd_train_mini)

    h = sub.add_parser("train-heads", help="train the embedded 3D head prior on synthetic heads (CPU, <= 80 min)")
    h.add_argument("--out", default="assets/genfast-heads", help="where the prior is written")
    h.add_argument("--work-dir", default=".genfast-train/heads", help="rendered data and checkpoints; rerun to resume")
    h.add_argument("--steps", type=_positive("--steps"))
    h.add_argument("--identities", type=_positive("--identities"))
    h.add_argument("--max-minutes", type=float, help="stop and write the prior after this long (default 75)")
    h.add_argument("--tiny", action="store_true", help="a few steps on a few heads (smoke test)")
    h.set_defaults(func=cmd_train_heads)

    from .cli_gan3d import add_convert_eg3d_parser, add_head_photos_parser, add_personalize_parsers, add_render_parser

    add_render_parser(sub)
    add_head_photos_parser(sub)
    add_personalize_parsers(sub)
    add_convert_eg3d_parser(sub)

    from .cli_analyze import add_analyze_parser
    from .cli_assemble import add_assemble_parser
    from .cli_class import add_train_class_parser
    from .cli_demo import add_demo_parser
    from .cli_distill import add_distill_parser
    from .cli_qat import add_qat_parser
    from .cli_sweep import add_sweep_parser
    from .cli_t2i import add_train_t2i_parser
    from .cli_var import add_train_var_parser

    add_analyze_parser(sub)
    add_assemble_parser(sub)
    add_distill_parser(sub)
    add_demo_parser(sub)
    add_train_class_parser(sub)
    add_train_t2i_parser(sub)
    add_train_var_parser(sub)
    add_qat_parser(sub)
    add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as err:
        print(f"genfast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
