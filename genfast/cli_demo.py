"""`genfast demo`: the Gradio app on the embedded models (or a local pipeline folder).

    genfast demo                          # http://127.0.0.1:7860, genfast-mini
    genfast demo --pipeline DIR --port 8000
"""

from __future__ import annotations

import argparse

from .cli import _positive

__all__ = ["add_demo_parser", "cmd_demo"]


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline first: no telemetry calls
    from .demo.app import launch
    from .demo.common import DemoModels

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = DemoModels(args.pipeline, device=device, workers=args.workers)
    models.warm_up()
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"[demo] serving on {args.host}: anyone who can reach this machine on port {args.port} can use it")
    launch(models, host=args.host, port=args.port, block=True)
    return 0


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="the Gradio demo: every capability side by side in a browser")
    p.add_argument("--pipeline", help="a local diffusers pipeline folder (default: the embedded genfast-mini)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workers", type=_positive("--workers"), default=2,
                   help="jobs that run on pipelines at once; each worker holds its own copy of the denoiser")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.set_defaults(func=cmd_demo)
    return p
