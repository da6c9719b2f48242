"""Number formats for weights: what a code means and how a float weight becomes codes and scales.

Every format turns a 2-D weight (output rows x flattened inputs; a Conv2d kernel is flattened to
its row) into one unsigned code per element, `bits` wide, plus the scales that give the codes
their size. The codes are then bit-packed (`pack.py`). The arithmetic is torchao's wherever it
has it: its affine integer primitives for int2..int8, torch's float8 dtypes, its sub-byte float
encoders for fp6/fp4/fp3/fp2, its MX (`to_mx`, E8M0 scale per 32) and NVFP4 (`nvfp4_quantize`, E4M3
scale per 16 over an fp32 tensor scale) reference code. What genfast adds is the common
code layout, so that one packer and one checkpoint format serve them all, and Conv2d support.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchao.prototype.custom_fp_utils import _f32_to_floatx_unpacked, _floatx_unpacked_to_f32
from torchao.prototype.mx_formats.kernels import unpack_uint4
from torchao.prototype.mx_formats.mx_tensor import get_fp_scale, to_mx
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)


@dataclass(frozen=True)
class Format:
    name: str
    family: str  # "int", "float" (scaled by channel / group / tensor), "mx", "nvfp4" (own block scales)
    bits: int  # bits per element code
    ebits: int = 0  # float formats: exponent and mantissa bits
    mbits: int = 0
    block: int | None = None  # mx / nvfp4: elements per scale, fixed by the format

    @property
    def max_value(self) -> float:
        """The largest finite element value (float formats: OCP / IEEE-style, no inf; int: 2**(bits-1) - 1)."""
        if self.family == "int":
            return float(2 ** (self.bits - 1) - 1)
        if (self.bits, self.ebits) == (8, 4):  # e4m3fn (fp8_e4m3, mxfp8): all-ones mantissa at the top exponent is NaN
            return 448.0
        if (self.bits, self.ebits) == (8, 5):  # e5m2: IEEE-like, the top exponent is inf / NaN
            return 57344.0
        bias = 2 ** (self.ebits - 1) - 1
        return 2.0 ** (2**self.ebits - 1 - bias) * (2 - 2.0**-self.mbits)


FORMATS: dict[str, Format] = {f"int{b}": Format(f"int{b}", "int", b) for b in range(2, 9)}
FORMATS.update({
    "fp8_e4m3": Format("fp8_e4m3", "float", 8, 4, 3),
    "fp8_e5m2": Format("fp8_e5m2", "float", 8, 5, 2),
    "fp6_e3m2": Format("fp6_e3m2", "float", 6, 3, 2),
    "fp6_e2m3": Format("fp6_e2m3", "float", 6, 2, 3),
    "fp4_e2m1": Format("fp4_e2m1", "float", 4, 2, 1),
    # the 3- and 2-bit floats of the bit-width sweep (issue 19): no mantissa, every level a power of two or 0.
    # e2m0 (bias 1): 0, ±1, ±2, ±4; e1m0 (bias 0): 0, ±2, a ternary grid (|w| <= amax / 2 rounds to 0).
    # torchao's sub-byte float codec takes mbits = 0 (exponent 0 is the subnormal zero): nothing new below
    "fp3_e2m0": Format("fp3_e2m0", "float", 3, 2, 0),
    "fp2_e1m0": Format("fp2_e1m0", "float", 2, 1, 0),
    "mxfp8": Format("mxfp8", "mx", 8, 4, 3, block=32),
    "mxfp6": Format("mxfp6", "mx", 6, 2, 3, block=32),
    "mxfp4": Format("mxfp4", "mx", 4, 2, 1, block=32),
    "nvfp4": Format("nvfp4", "nvfp4", 4, 2, 1, block=16),
})

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_MX_ELEM = {"mxfp8": torch.float8_e4m3fn, "mxfp6": "fp6_e2m3", "mxfp4": torch.float4_e2m1fn_x2}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def parse_granularity(granularity: str) -> int | None:
    """'channel' -> None, 'tensor' -> 0, 'group:N' -> N (validated)."""
    if granularity == "channel":
        return None
    if granularity == "tensor":
        return 0
    g = re.fullmatch(r"group:(\d+)", str(granularity))
    if not g or int(g.group(1)) < 2:
        raise ValueError(f"granularity must be 'channel', 'tensor' or 'group:N' with N >= 2, got {granularity!r}")
    return int(g.group(1))


@dataclass
class Encoded:
    """A weight as codes and scales. codes: uint8, one per element of the (rows, padded cols) matrix."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None  # asymmetric integers: the zero point (uint8), per scale
    tensor_scale: torch.Tensor | None = None  # nvfp4: the fp32 scale over the block scales


def padded_cols(fmt: Format, cols: int, granularity: str) -> int:
    """Rows are zero-padded to a whole number of blocks / groups (a 3x3 conv row of 36 into 64, say)."""
    size = fmt.block or parse_granularity(granularity) or 0
    return math.ceil(cols / size) * size if size else cols


def _block_shape(fmt: Format, granularity: str, rows: int, cols: int) -> tuple[int, int]:
    g = parse_granularity(granularity)
    return (rows, cols) if g == 0 else (1, cols) if g is None else (1, g)


def _int_range(fmt: Format, symmetric: bool) -> tuple[int, int, torch.dtype]:
    if symmetric:
        return -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1, torch.int8
    return 0, 2**fmt.bits - 1, torch.uint8


def _scaled_rows(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w viewed as (number of scales, elements per scale)."""
    return w.reshape(-1, block[1]) if block[0] == 1 else w.reshape(1, -1)


def encode(weight: torch.Tensor, fmt: Format, granularity: str = "channel", symmetric: bool = True) -> Encoded:
    """weight: (rows, cols) float. Returns codes for (rows, padded_cols(...)) and the scales."""
    w = weight.detach().float()
    rows, cols = w.shape
    width = padded_cols(fmt, cols, granularity)
    if width != cols:
        w = F.pad(w, (0, width - cols))
    w = w.contiguous()
    if fmt.family == "int":
        qmin, qmax, dtype = _int_range(fmt, symmetric)
        block = _block_shape(fmt, granularity, rows, width)
        # NO_CLIPPING_ERR: the scale maps the largest magnitude onto qmax exactly, nothing clips
        mapping = MappingType.SYMMETRIC_NO_CLIPPING_ERR if symmetric else MappingType.ASYMMETRIC
        scale, zero = choose_qparams_affine(w, mapping, block, dtype, qmin, qmax, eps=1e-12,
                                            scale_dtype=torch.float32, zero_point_dtype=torch.int32)
        q = quantize_affine(w, block, scale, zero, dtype, qmin, qmax)
        # the zero point lies in [0, 2**bits - 1] (torchao clamps it there): a byte holds it, not int32's four
        return Encoded((q.int() - qmin).to(torch.uint8), scale, None if symmetric else zero.to(torch.uint8))
    if fmt.family == "float":
        block = _block_shape(fmt, granularity, rows, width)
        amax = _scaled_rows(w, block).abs().amax(dim=1, keepdim=True)
        scale = (amax / fmt.max_value).clamp_min(1e-12)
        x = (_scaled_rows(w, block) / scale).reshape(rows, width)
        return Encoded(_float_codes(x, fmt), scale.flatten())
    if fmt.family == "mx":
        scale_e8m0, _ = to_mx(w, _MX_ELEM[fmt.name], fmt.block)
        x = (w.reshape(rows, -1, fmt.block) / get_fp_scale(scale_e8m0).unsqueeze(-1)).reshape(rows, width)
        return Encoded(_float_codes(x, fmt), scale_e8m0.view(torch.uint8).flatten())
    # nvfp4: two-level scales exactly as torchao computes them
    tensor_scale = per_tensor_amax_to_scale(w.abs().amax()).clamp_min(1e-30)
    scales, packed = nvfp4_quantize(w, fmt.block, tensor_scale)
    return Encoded(unpack_uint4(packed).reshape(rows, width), scales.view(torch.uint8).flatten(), None,
                   tensor_scale.reshape(1))


def _float_codes(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    x = x.clamp(-fmt.max_value, fmt.max_value)  # saturate: the float8 casts would give NaN
    if fmt.bits == 8:
        return x.to(_FP8.get(fmt.name, torch.float8_e4m3fn)).view(torch.uint8)
    return _f32_to_floatx_unpacked(x.contiguous(), fmt.ebits, fmt.mbits)


def _float_values(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    if fmt.bits == 8:
        return codes.view(_FP8.get(fmt.name, torch.float8_e4m3fn)).float()
    # a table of torchao's decoder over all 2**bits codes: the same values, read with one gather
    # (torchao's bit arithmetic costs ~10x more, and this runs on every forward)
    return _value_table(fmt.ebits, fmt.mbits, codes.device)[codes.int()]


@functools.cache
def _value_table(ebits: int, mbits: int, device: torch.device) -> torch.Tensor:
    codes = torch.arange(2 ** (1 + ebits + mbits), dtype=torch.uint8)
    return _floatx_unpacked_to_f32(codes, ebits, mbits).to(device)


def decode(enc: Encoded, fmt: Format, granularity: str, symmetric: bool, cols: int) -> torch.Tensor:
    """The float32 (rows, cols) weight the codes stand for."""
    rows, width = enc.codes.shape
    if fmt.family == "int":
        qmin, qmax, dtype = _int_range(fmt, symmetric)
        block = _block_shape(fmt, granularity, rows, width)
        q = (enc.codes.int() + qmin).to(dtype)
        zero = enc.zero.int() if enc.zero is not None else torch.zeros_like(enc.scale, dtype=torch.int32)
        w = dequantize_affine(q, block, enc.scale, zero, dtype, qmin, qmax, output_dtype=torch.float32)
    elif fmt.family == "float":
        block = _block_shape(fmt, granularity, rows, width)
        x = _scaled_rows(_float_values(enc.codes, fmt), block)
        w = (x * enc.scale.reshape(-1, 1)).reshape(rows, width)
    elif fmt.family == "mx":
        x = _float_values(enc.codes, fmt).reshape(rows, -1, fmt.block)
        w = (x * get_fp_scale(enc.scale).reshape(rows, -1, 1)).reshape(rows, width)
    else:
        x = _float_values(enc.codes, fmt).reshape(rows, -1, fmt.block)
        block_scale = enc.scale.view(torch.float8_e4m3fn).float().reshape(rows, -1, 1)
        # tensor scale times block scale first, as torchao's NVFP4Tensor.dequantize: same rounding
        w = (x * (enc.tensor_scale * block_scale)).reshape(rows, width)
    return w[:, :cols]


def value_grid(fmt: Format) -> torch.Tensor:
    """Every value one element code stands for (before scaling), sorted; NaN codes left out."""
    codes = torch.arange(2**fmt.bits, dtype=torch.int32)
    if fmt.family == "int":
        return (codes - 2 ** (fmt.bits - 1)).float()
    values = _float_values(codes.to(torch.uint8), fmt)
    return values[values.isfinite()].unique()
