"""Adapter size of genfast.gan3d.lora on the FFHQ-512 EG3D, next to My3DGen's published and measured counts.

Builds the generator on the meta device (no memory, no weights), so it runs in seconds:

    python bench/lora_params.py [--ranks 1 2 4]

Columns:
  LoRA             A/B tensors only (add_lora default, train_biases=False, conv_layout="my3dgen")
  loralib          the same with conv_layout="loralib" (My3DGen's original_conv_lora switch)
  +biases          with train_biases=True (conv + affine biases of the adapted layers)
  My3DGen-style    LoRA + biases + b4 const + noise_strength: what My3DGen's code actually trains
  My3DGen [M]      trainable count measured on My3DGen's wrappers (reference notes, section 1.1)
  published        WACV 2025 / v4: "240K vs 30.6M, 127x" (rank 1)
"""

from __future__ import annotations

import argparse

import torch

from genfast.gan3d import build_generator, eg3d_ffhq512_config, lora
from genfast.gan3d.generator import FFHQ512_PARAMETER_COUNTS

MY3DGEN_MEASURED = {1: 243_965, 2: 463_139, 4: 901_487}
PUBLISHED = {1: "240K"}
CONST_AND_NOISE = 8_192 + 17  # b4 const + the 17 noise_strength scalars My3DGen also trains


def adapter_counts(rank: int, train_biases: bool, conv_layout: str = "my3dgen") -> tuple[dict[str, int], int]:
    with torch.device("meta"):
        G = build_generator(eg3d_ffhq512_config())
        state = lora.add_lora(G, rank=rank, train_biases=train_biases, conv_layout=conv_layout)
    return lora.lora_parameter_breakdown(G), len(state.modulated) + len(state.affine)


def print_adapter_table(ranks=(1, 2, 4)) -> list[dict]:
    total = FFHQ512_PARAMETER_COUNTS["total"]
    rows = []
    header = (f"{'rank':>4} {'layers':>6} {'LoRA':>10} {'loralib':>10} {'+biases':>10} {'My3DGen-style':>14} {'My3DGen [M]':>12} "
              f"{'published':>9} {'% of G':>7} {'x fewer':>8}")
    print(f"FFHQ-512 EG3D generator: {total:,} parameters")
    print(header)
    print("-" * len(header))
    for rank in ranks:
        pure, layers = adapter_counts(rank, train_biases=False)
        with_biases, _ = adapter_counts(rank, train_biases=True)
        loralib, _ = adapter_counts(rank, train_biases=False, conv_layout="loralib")
        my3dgen_style = with_biases["total"] + CONST_AND_NOISE
        row = dict(rank=rank, layers=layers, lora=pure["lora"], loralib=loralib["lora"], with_biases=with_biases["total"],
                   my3dgen_style=my3dgen_style, my3dgen_measured=MY3DGEN_MEASURED.get(rank),
                   published=PUBLISHED.get(rank), breakdown=pure)
        rows.append(row)
        measured = f"{row['my3dgen_measured']:,}" if row["my3dgen_measured"] else "-"
        print(f"{rank:>4} {layers:>6} {pure['lora']:>10,} {loralib['lora']:>10,} {with_biases['total']:>10,} {my3dgen_style:>14,} "
              f"{measured:>12} {row['published'] or '-':>9} {100 * pure['lora'] / total:>6.2f}% "
              f"{total / pure['lora']:>7.0f}x")
    first = rows[0]["breakdown"]
    print(f"rank {rows[0]['rank']} LoRA breakdown: backbone conv {first['backbone_conv']:,}, backbone affine "
          f"{first['backbone_affine']:,}, SR conv {first['sr_conv']:,}, SR affine {first['sr_affine']:,}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    print_adapter_table(args.ranks)


if __name__ == "__main__":
    main()
