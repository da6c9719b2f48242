"""`genfast qat`: distillation-based quantization-aware training of a pipeline folder, saved like `genfast quantize`.

``genfast qat --pipeline DIR --weights int3 --top-k 8 --out DIR`` loads the float pipeline (a genfast
VARPipeline, a class-conditional DiTPipeline or a StableDiffusionPipeline folder), trains its denoiser
quantized against its own fp copy (genfast.training.qat.qat_distill), and writes the quantized pipeline
folder that `genfast quantize` would write (genfast.save_quantized: packed codes + scales, a JSON config)
with qat.json beside model_index.json: the QAT config, the per-step log and the held-out distillation
loss of round-to-nearest and of QAT. Interrupted runs resume from --work-dir (default OUT.work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .cli_distill import _number, finish_run

__all__ = ["add_qat_parser", "cmd_qat", "load_float_pipeline"]

QAT_JSON = "qat.json"
# CLI option -> QATConfig field, passed only when given (the config's defaults otherwise)
_FIELDS = ("loss", "topkld_reading", "top_k", "tail_weight", "steps", "batch_size", "lr", "lora_rank",
           "granularity", "seed", "pool_size", "checkpoint_every", "max_minutes")


def load_float_pipeline(path: str | Path, device: str = "cpu"):
    """A float pipeline folder in fp32 (what QAT trains): any diffusers pipeline folder or genfast VARPipeline."""
    import torch

    from .quant.saving import load_pipeline

    return load_pipeline(path, device, torch.float32)


def cmd_qat(args: argparse.Namespace) -> int:
    from . import __version__
    from .io import atomic_write_text
    from .quant.saving import check_out, is_quantized_folder, save_quantized
    from .training.qat import QATConfig, qat_distill

    config = QATConfig(weights=args.weights, **{f: getattr(args, f) for f in _FIELDS if getattr(args, f) is not None})
    out = check_out(args.out, what="--out")  # before any work
    src = Path(args.pipeline)
    if is_quantized_folder(src):
        raise ValueError(f"{src} is already a genfast quantized pipeline; QAT starts from the float pipeline it came "
                         f"from")
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    if work.resolve() == out.resolve():
        raise ValueError("--work-dir must not be --out: the output folder is replaced whole when saved")
    pipe = load_float_pipeline(src, args.device)
    if config.top_k is None and config.loss in ("auto", "topkld") and (src / "training.json").is_file():
        # TopKLD's K is the top-k this model is evaluated with: train-var records its sampling there
        sampling = json.loads((src / "training.json").read_text()).get("sampling") or {}
        if sampling.get("top_k"):
            config = dataclasses.replace(config, top_k=int(sampling["top_k"]))
    result = qat_distill(pipe, config, work, progress=not args.quiet)

    def save():
        save_quantized(result.pipe, out, result.handle)
        record = {"genfast_version": __version__, "source": str(src), "config": config.to_dict(),
                  "topkld_k": result.top_k, "heldout_loss": result.heldout, "log": result.log}
        atomic_write_text(out / QAT_JSON, json.dumps(record, indent=1) + "\n")
        held = result.heldout
        print(f"QAT {config.weights}, {config.steps} steps: held-out distillation loss {held['ptq']:.4g} (round to "
              f"nearest) -> {held['qat']:.4g}; wrote {out} (log: {out / QAT_JSON})")

    return finish_run(result.finished, work, save)


def add_qat_parser(subparsers) -> argparse.ArgumentParser:
    from .quant.formats import FORMATS
    from .training.kd_losses import LOSSES, READINGS

    p = subparsers.add_parser(
        "qat", help="quantization-aware training by distillation from the fp model; saves a quantized pipeline",
        description=(
            "Train a pipeline's denoiser with fake-quantized weights against its own fp copy, on the data it was "
            "trained on (class shapes): token models with TopKLD / forward KL / reverse KL / JS / logit MSE on the "
            "logits, diffusion models with a timestep-weighted output MSE. Optionally a LoRA inside the quantizer "
            "is trained instead of the weights. Writes the quantized pipeline folder (as `genfast quantize`) and "
            "qat.json. Interrupted runs resume from --work-dir."
        ),
    )
    p.add_argument("--pipeline", metavar="DIR", required=True,
                   help="a float pipeline folder: a VARPipeline (genfast train-var), a DiTPipeline (genfast "
                        "train-class) or a StableDiffusionPipeline (genfast-mini, genfast train-t2i)")
    p.add_argument("--weights", required=True, choices=tuple(FORMATS), metavar="FORMAT",
                   help=f"the weight format: {', '.join(FORMATS)}")
    p.add_argument("--loss", choices=("auto", "output", *LOSSES),
                   help="auto (default): topkld for a VARPipeline, output for a diffusion pipeline")
    p.add_argument("--topkld-reading", choices=READINGS,
                   help="TopKLD's reading: direction (default; reverse KL on the head, forward KL on the tail) or "
                        "head_tail (KL on head and tail + the head-mass term; forward KL itself at tail weight 1)")
    p.add_argument("--top-k", type=_number("--top-k", int, 1),
                   help="TopKLD's K: the top-k the sampler draws from when the model is evaluated (default: the "
                        "sampling top_k in the folder's training.json, else genfast's default for the codebook)")
    p.add_argument("--tail-weight", type=_number("--tail-weight"),
                   help="TopKLD's tail weight (lambda / alpha; default 1, where head_tail equals forward KL)")
    p.add_argument("--steps", type=_number("--steps", int, 1), help="training steps (default 200)")
    p.add_argument("--batch-size", type=_number("--batch-size", int, 1), help="default 32")
    p.add_argument("--lr", type=_number("--lr", strict=True), help="peak learning rate, cosine to 0 (default 1e-4)")
    p.add_argument("--lora-rank", type=_number("--lora-rank", int, 0),
                   help="0 (default): train the weights; r > 0: train a rank-r LoRA inside the quantizer, merged at "
                        "the end")
    p.add_argument("--granularity", help="channel (default), tensor or group:N; not for mx*/nvfp4 (fixed blocks)")
    p.add_argument("--seed", type=_number("--seed", int), help="batch order, noise, LoRA init (default 0)")
    p.add_argument("--pool-size", type=_number("--pool-size", int, 1),
                   help="training images encoded once and drawn from (default 2048)")
    p.add_argument("--checkpoint-every", type=_number("--checkpoint-every", int, 1), help="default 100 steps")
    p.add_argument("--max-minutes", type=_number("--max-minutes", strict=True),
                   help="checkpoint and stop after this long; rerun to resume")
    p.add_argument("--device", default="cpu", help="where to train (cpu, cuda ...)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="the quantized pipeline folder to write (new, empty, or a quantized folder, which is replaced)")
    p.add_argument("--work-dir", metavar="DIR", help="checkpoints, encoded data and the log (default: OUT.work); "
                                                     "rerun to resume")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_qat)
    return p
