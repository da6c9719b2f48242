"""Bit-packing of element codes: n codes of b < 8 bits take exactly ceil(n / 8) * b bytes.

torchao's uintx bit-packer does the work: a b-bit code is split into power-of-two shards (a
6-bit code into 4 + 2 bits) and each shard packed densely; genfast stores the shards one after
another in a single uint8 tensor, so a checkpoint holds one flat tensor per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.prototype.dtypes.uintx.bitpacking import numbits, pack, unpack


def packed_nbytes(n: int, bits: int) -> int:
    return n if bits == 8 else -(-n // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 (any shape), every value < 2**bits -> flat uint8 of packed_nbytes(codes.numel(), bits)."""
    flat = codes.reshape(-1)
    if codes.dtype != torch.uint8 or (flat.numel() and int(flat.max()) >= 2**bits):
        # the packer would silently drop the high bits of a code that does not fit
        raise ValueError(f"codes must be uint8 below 2**{bits} to pack into {bits} bits")
    if bits == 8:
        return flat.clone()
    flat = F.pad(flat, (0, -flat.numel() % 8))
    return torch.cat([shard.reshape(-1) for shard in pack(flat, bits, dim=-1)])


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack_codes: uint8 codes of `shape`."""
    n = 1
    for s in shape:
        n *= s
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n} codes of {bits} bits "
                         f"({packed_nbytes(n, bits)} expected)")
    if bits == 8:
        return packed.reshape(shape).clone()
    padded = n + (-n % 8)
    shards, start = [], 0
    for width in numbits[bits]:
        size = padded * width // 8
        shards.append(packed[start:start + size])
        start += size
    return unpack(shards, bits, dim=-1)[:n].reshape(shape)
