"""How GRI attention's cost grows with tokens next to full attention's: one diffusers Attention module.

    python bench/gri_scaling.py [--quick] [--sides 16 32 64 128] [--window 8] [--pooled 8]
                                [--device cuda] [--dtype fp16] [--repeats 7] [--out FILE.json]

One self-attention layer (64 channels, 8 heads, diffusers' Attention) on token grids side x side, run
with diffusers' AttnProcessor2_0 (full attention) and genfast's GRIAttnProcessor (regional window +
pooled global summary). Each side doubles the previous one, so each row has 4x the tokens: linear cost
grows 4x per row, quadratic 16x.

  time   median over --repeats rounds; in each round full and GRI run back to back (interleaved), so
         drift on a shared machine hits both alike
  FLOPs  torch.utils.flop_counter.FlopCounterMode on the meta device (shapes only, no memory), sdpa on
         its math backend so the attention matmuls are counted; projections included
--quick: sides 16 32 64, 3 repeats (a CPU check in a minute). Writes outputs/bench/gri_scaling.json
unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from genfast.assembly.gri import GRIAttnProcessor
from genfast.io import atomic_write_text, check_output

CHANNELS, HEADS = 64, 8
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _processors(window: int, pooled: int, side: int) -> dict:
    gri = GRIAttnProcessor(window, pooled)
    gri.grid.hw = (side, side)  # what install_gri's hook records from the latent
    return {"full": AttnProcessor2_0(), "gri": gri}


def count_flops(side: int, window: int, pooled: int, batch: int) -> dict[str, int]:
    with torch.device("meta"):
        attn = Attention(CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS)
        x = torch.empty(batch, side * side, CHANNELS)
    flops = {}
    for name, proc in _processors(window, pooled, side).items():
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            proc(attn, x)
        flops[name] = counter.get_total_flops()
    return flops


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side(side: int, window: int, pooled: int, batch: int, repeats: int, device, dtype) -> dict[str, float]:
    torch.manual_seed(0)
    attn = Attention(CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS).to(device, dtype).eval()
    x = torch.randn(batch, side * side, CHANNELS, device=device, dtype=dtype)
    procs = _processors(window, pooled, side)
    secs = {name: [] for name in procs}
    with torch.inference_mode():
        for name, proc in procs.items():  # warm-up: kernels chosen, masks cached
            proc(attn, x)
        for _ in range(repeats):
            for name, proc in procs.items():
                _sync(device)
                start = time.perf_counter()
                proc(attn, x)
                _sync(device)
                secs[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in secs.items()}


def _ratio(now, before):
    return now / before if before else float("nan")


def markdown(rows: list[dict], window: int, pooled: int) -> str:
    lines = [(f"GRI (window {window}, pooled {pooled}) vs full attention, {CHANNELS} channels, {HEADS} heads; "
             f"growth = this row / the previous (4x tokens: linear 4x, quadratic 16x)"), "",
             ("| grid | tokens | full ms | GRI ms | full/GRI time | full GFLOP | GRI GFLOP | full time growth | "
             "GRI time growth | full FLOP growth | GRI FLOP growth |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    previous = None
    for row in rows:
        growth = ["-"] * 4
        if previous is not None:
            growth = [f"{_ratio(row[k][m], previous[k][m]):.1f}x" for k in ("ms", "flops") for m in ("full", "gri")]
        lines.append(f"| {row['side']}x{row['side']} | {row['tokens']} | {row['ms']['full']:.2f} | "
                     f"{row['ms']['gri']:.2f} | {_ratio(row['ms']['full'], row['ms']['gri']):.2f}x | "
                     f"{row['flops']['full'] / 1e9:.3f} | {row['flops']['gri'] / 1e9:.3f} | " + " | ".join(growth) + " |")
        previous = row
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sides 16 32 64, 3 repeats")
    parser.add_argument("--sides", type=int, nargs="+", default=None, help="grid sides (default 16 32 64 128)")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--pooled", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--out", default="outputs/bench/gri_scaling.json")
    args = parser.parse_args(argv)
    sides = args.sides or ([16, 32, 64] if args.quick else [16, 32, 64, 128])
    repeats = args.repeats or (3 if args.quick else 7)
    if any(s < 1 for s in sides) or args.window < 1 or args.pooled < 1 or args.batch < 1 or repeats < 1:
        parser.error("--sides, --window, --pooled, --batch and --repeats must be >= 1")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output(out, folder=False)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    rows = []
    for side in sorted(sides):
        tokens = side * side
        if tokens <= args.window ** 2 + args.pooled ** 2:
            print(f"note: {side}x{side} has <= window^2 + pooled^2 tokens: GRI runs full attention there")
        secs = time_side(side, args.window, args.pooled, args.batch, repeats, device, dtype)
        rows.append(dict(side=side, tokens=tokens, ms={k: v * 1e3 for k, v in secs.items()},
                         flops=count_flops(side, args.window, args.pooled, args.batch)))
        print(f"{side}x{side}: full {rows[-1]['ms']['full']:.2f} ms, GRI {rows[-1]['ms']['gri']:.2f} ms", flush=True)
    table = markdown(rows, args.window, args.pooled)
    print()
    print(table)
    report = dict(window=args.window, pooled=args.pooled, channels=CHANNELS, heads=HEADS, batch=args.batch,
                  repeats=repeats, device=str(device), dtype=args.dtype, torch=torch.__version__,
                  threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(), rows=rows,
                  table=table)
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
