"""Weight formats and bit-packing: the value grids are the published ones, encoding rounds to the
nearest grid point, representable weights come back exactly, MX / NVFP4 agree with torchao."""

import math

import pytest
import torch
from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3
from torchao.prototype.mx_formats.mx_tensor import MXTensor
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

from genfast.quant.formats import FORMATS, decode, encode, get_format, padded_cols, value_grid
from genfast.quant.pack import pack_codes, packed_nbytes, unpack_codes

pytestmark = pytest.mark.usefixtures("one_thread")


INT = [f"int{b}" for b in range(2, 9)]
FLOAT = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp3_e2m0", "fp2_e1m0"]
BLOCK = ["mxfp8", "mxfp6", "mxfp4", "nvfp4"]


def spec_values(ebits: int, mbits: int, kind: str) -> set[float]:
    """Every finite value of a sign/exponent/mantissa format, from its definition.

    kind "ieee": the top exponent is inf/NaN (e5m2); "fn": only all-ones exponent and mantissa is
    NaN (e4m3fn); "mx": every code is finite (OCP MX fp6 / fp4)."""
    bias = 2 ** (ebits - 1) - 1
    values = set()
    for e in range(2**ebits):
        for m in range(2**mbits):
            if (kind == "ieee" and e == 2**ebits - 1) or (kind == "fn" and e == 2**ebits - 1 and m == 2**mbits - 1):
                continue
            v = m / 2**mbits * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias)
            values |= {v, -v}
    return values


@pytest.mark.parametrize("name,ebits,mbits,kind,top", [
    ("fp8_e4m3", 4, 3, "fn", 448.0), ("fp8_e5m2", 5, 2, "ieee", 57344.0), ("fp6_e3m2", 3, 2, "mx", 28.0),
    ("fp6_e2m3", 2, 3, "mx", 7.5), ("fp4_e2m1", 2, 1, "mx", 6.0),
    ("mxfp8", 4, 3, "fn", 448.0), ("mxfp6", 2, 3, "mx", 7.5), ("mxfp4", 2, 1, "mx", 6.0), ("nvfp4", 2, 1, "mx", 6.0),
])
def test_float_grids_are_the_published_formats(name, ebits, mbits, kind, top):
    fmt = get_format(name)
    grid = value_grid(fmt)
    assert sorted(grid.tolist()) == sorted(spec_values(ebits, mbits, kind))
    assert grid.max().item() == top and grid.min().item() == -top and fmt.max_value == top


def test_e2m1_is_exactly_its_eight_magnitudes():
    magnitudes = {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    for name in ("fp4_e2m1", "mxfp4", "nvfp4"):
        assert set(value_grid(get_format(name)).tolist()) == magnitudes | {-v for v in magnitudes}


@pytest.mark.parametrize("name", INT)
def test_int_grids_have_two_to_the_bits_levels(name):
    bits = get_format(name).bits
    grid = value_grid(get_format(name))
    assert len(grid.unique()) == 2**bits
    assert torch.equal(grid.diff(), torch.ones(2**bits - 1)), "consecutive integers"


# --- weights on the grid come back exactly ------------------------------------------------------

def _units(rows, cols, granularity):
    """Index sets (row, column slice) sharing one scale."""
    if granularity == "tensor":
        return [(slice(None), slice(None))]
    size = cols if granularity == "channel" else int(granularity.split(":")[1])
    return [(r, slice(c, c + size)) for r in range(rows) for c in range(0, cols, size)]


@pytest.mark.parametrize("granularity", ["channel", "group:16", "tensor"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int6", "int8"])
def test_int_weights_on_the_grid_round_trip(name, symmetric, granularity):
    fmt, g = get_format(name), torch.Generator().manual_seed(1)
    levels = 2**fmt.bits
    rows, cols = 6, 48
    w = torch.empty(rows, cols)
    for k, (r, c) in enumerate(_units(rows, cols, granularity)):
        s = 2.0 ** -(k % 5)  # a power-of-two step per scale
        part = w[r, c]
        q = torch.randint(0, levels, part.shape, generator=g).float()
        q.view(-1)[:2] = torch.tensor([0.0, levels - 1.0])  # both ends of the grid: they fix the scale
        zero = levels // 2 if symmetric else int(torch.randint(1, levels - 1, (1,), generator=g))
        if symmetric:
            q.view(-1)[1] = levels // 2 - 1  # symmetric: [-2**(b-1), 2**(b-1) - 1]
        w[r, c] = (q - zero) * s
    enc = encode(w, fmt, granularity, symmetric)
    assert torch.equal(decode(enc, fmt, granularity, symmetric, cols), w)


@pytest.mark.parametrize("granularity", ["channel", "group:16", "tensor"])
@pytest.mark.parametrize("name", FLOAT)
def test_float_weights_on_the_grid_round_trip(name, granularity):
    fmt, g = get_format(name), torch.Generator().manual_seed(2)
    grid = value_grid(fmt)
    rows, cols = 6, 48
    w = torch.empty(rows, cols)
    for k, (r, c) in enumerate(_units(rows, cols, granularity)):
        part = w[r, c]
        v = grid[torch.randint(0, len(grid), part.shape, generator=g)]
        v.view(-1)[0] = -fmt.max_value if k % 2 else fmt.max_value  # the scale is amax / max exactly
        w[r, c] = v * 2.0 ** (3 - k % 7)
    assert torch.equal(decode(encode(w, fmt, granularity), fmt, granularity, True, cols), w)


@pytest.mark.parametrize("name", BLOCK)
def test_block_scaled_weights_on_the_grid_round_trip(name):
    fmt, g = get_format(name), torch.Generator().manual_seed(3)
    grid = value_grid(fmt)
    rows, cols = 4, 4 * fmt.block
    v = grid[torch.randint(0, len(grid), (rows, cols), generator=g)].reshape(rows, -1, fmt.block)
    v[..., 0] = fmt.max_value  # every block reaches the top of the grid
    if fmt.family == "mx":  # E8M0: any power of two per block
        scale = 2.0 ** torch.randint(-20, 10, (rows, cols // fmt.block, 1), generator=g).float()
    else:  # an E4M3 value per block over a power-of-two tensor scale (the block holding amax gets 448)
        e4m3 = value_grid(get_format("fp8_e4m3"))
        scale = e4m3[e4m3 > 0][torch.randint(0, int((e4m3 > 0).sum()), (rows, cols // fmt.block, 1), generator=g)]
        scale[0, 0] = 448.0
        scale = scale * 2.0**-5
    w = (v * scale).reshape(rows, cols)
    assert torch.equal(decode(encode(w, fmt), fmt, "channel", True, cols), w)


# --- rounding ----------------------------------------------------------------------------------

def _weights(rows, cols, seed):
    """Gaussian rows of very different sizes, one row of zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(2 * torch.randn(rows, 1, generator=g))
    w[-1] = 0
    return w


def _per_element(scale: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    s = scale.reshape(-1).float()
    if s.numel() == 1:
        return s.expand(rows, width)
    per_row = s.reshape(rows, -1)
    return per_row.repeat_interleave(width // per_row.shape[1], dim=1)


@pytest.mark.parametrize("granularity", ["channel", "group:16", "tensor"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", INT)
def test_int_rounding_moves_a_weight_by_at_most_half_a_step(name, symmetric, granularity):
    fmt = get_format(name)
    rows, cols = 8, 40  # 40 is not a multiple of 16: the last group is padded
    w = _weights(rows, cols, fmt.bits)
    enc = encode(w, fmt, granularity, symmetric)
    width = padded_cols(fmt, cols, granularity)
    assert enc.codes.dtype == torch.uint8 and enc.codes.shape == (rows, width)
    assert int(enc.codes.max()) < 2**fmt.bits
    d = decode(enc, fmt, granularity, symmetric, cols)
    assert d.shape == w.shape
    step = _per_element(enc.scale, rows, width)[:, :cols]
    assert ((d - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(d[-1], torch.zeros(cols)), "zero is on every integer grid"
    assert symmetric or (enc.zero.dtype == torch.uint8 and enc.zero.numel() == enc.scale.numel())


def _element_scale(enc, fmt, rows, width):
    if fmt.family == "float":
        return _per_element(enc.scale, rows, width)
    if fmt.family == "mx":  # E8M0: 2 ** (byte - 127)
        return _per_element(2.0 ** (enc.scale.float() - 127), rows, width)
    block = enc.scale.view(torch.float8_e4m3fn).float()
    return _per_element(block * enc.tensor_scale, rows, width)


@pytest.mark.parametrize("granularity", ["channel", "group:16"])
@pytest.mark.parametrize("name", FLOAT + BLOCK)
def test_float_rounding_picks_the_nearest_grid_point(name, granularity):
    fmt = get_format(name)
    granularity = "channel" if fmt.block else granularity
    rows, cols = 8, 40
    w = _weights(rows, cols, 7)
    enc = encode(w, fmt, granularity)
    width = padded_cols(fmt, cols, granularity)
    assert enc.codes.shape == (rows, width) and int(enc.codes.max()) < 2**fmt.bits
    d = decode(enc, fmt, granularity, True, cols)
    scale = _element_scale(enc, fmt, rows, width)[:, :cols]
    candidates = value_grid(fmt).reshape(-1, 1, 1) * scale  # every value each element could take
    nearest = (candidates - w).abs().amin(dim=0)
    assert ((d - w).abs() <= nearest + 1e-6 * w.abs() + 1e-30).all()
    assert ((candidates == d).any(dim=0)).all(), "the decoded weight lies on its scaled grid"


@pytest.mark.parametrize("name,granularity", [("int4", "group:64"), ("fp4_e2m1", "group:64"), ("mxfp4", None),
                                              ("nvfp4", None), ("int8", "channel")])
def test_a_3x3_conv_row_is_padded_to_whole_groups_and_comes_back_in_shape(name, granularity):
    fmt = get_format(name)
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)).reshape(8, 36)
    granularity = granularity or "channel"
    size = fmt.block or (64 if granularity == "group:64" else 36)
    enc = encode(w, fmt, granularity)
    assert enc.codes.shape == (8, math.ceil(36 / size) * size)
    d = decode(enc, fmt, granularity, True, 36)
    assert d.shape == (8, 36)
    assert (d - w).abs().max() < 0.5 * w.abs().max()


# --- torchao's reference code ---------------------------------------------------------------------

@pytest.mark.parametrize("name,elem", [("mxfp8", torch.float8_e4m3fn), ("mxfp6", DTYPE_FP6_E2M3),
                                       ("mxfp4", torch.float4_e2m1fn_x2)])
def test_mx_decodes_exactly_as_torchao(name, elem):
    fmt, w = get_format(name), _weights(16, 128, 11)
    ours = decode(encode(w, fmt), fmt, "channel", True, 128)
    theirs = MXTensor.to_mx(w, elem, 32).dequantize(torch.float32)
    assert torch.equal(ours, theirs)


def test_nvfp4_decodes_exactly_as_torchao():
    fmt = get_format("nvfp4")
    for seed in range(3):
        w = _weights(16, 128, seed)
        ours = decode(encode(w, fmt), fmt, "channel", True, 128)
        tensor_scale = per_tensor_amax_to_scale(w.abs().amax())
        theirs = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=tensor_scale).dequantize(torch.float32)
        assert torch.equal(ours, theirs)


# --- packing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 101])
def test_pack_round_trips_in_the_fewest_whole_groups_of_bytes(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    # n b-bit codes, padded to a whole group of 8 codes (= b bytes) unless stored byte per code
    expected = n if bits == 8 else math.ceil(n / 8) * bits
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == expected
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)


def test_pack_keeps_the_shape_and_refuses_what_does_not_fit():
    codes = torch.randint(0, 8, (5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, (5, 7)), codes)
    with pytest.raises(ValueError, match="below 2\\*\\*2"):
        pack_codes(codes | 4, 2)
    with pytest.raises(ValueError, match="packed bytes cannot hold"):
        unpack_codes(pack_codes(codes, 3)[:-1], 3, (5, 7))


def test_every_format_is_known_and_nothing_else():
    assert set(FORMATS) == set(INT + FLOAT + BLOCK)
    with pytest.raises(ValueError, match="unknown weight format 'int1'"):
        get_format("int1")
