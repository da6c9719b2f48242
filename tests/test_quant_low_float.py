"""The 3- and 2-bit floats of the bit-width sweep (fp3_e2m0, fp2_e1m0): their value grids follow from the
format definition, encoding rounds to the nearest grid point and is idempotent, codes pack into 3 / 2 bits,
and genfast.quantize / save_quantized / load_pipeline serve them like every other format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import build, denoiser, inputs

import genfast
from genfast.quant.formats import decode, encode, get_format, value_grid
from genfast.quant.layers import is_quantized, stored
from genfast.quant.pack import pack_codes, packed_nbytes, unpack_codes

pytestmark = pytest.mark.usefixtures("one_thread")

LOW = {"fp3_e2m0": (3, 2), "fp2_e1m0": (2, 1)}  # name: (bits, exponent bits); no mantissa bits


def definition_grid(ebits: int) -> set[float]:
    """Sign, ebits exponent bits, no mantissa, bias 2**(ebits-1) - 1, every code finite (OCP MX style):
    exponent 0 is the subnormal 0 (mantissa 0), exponent e >= 1 is 2**(e - bias)."""
    bias = 2 ** (ebits - 1) - 1
    magnitudes = {0.0} | {2.0 ** (e - bias) for e in range(1, 2**ebits)}
    return magnitudes | {-m for m in magnitudes}


@pytest.mark.parametrize("name", LOW)
def test_grids_follow_the_definition(name):
    bits, ebits = LOW[name]
    fmt = get_format(name)
    assert (fmt.family, fmt.bits, fmt.ebits, fmt.mbits) == ("float", bits, ebits, 0)
    grid = value_grid(fmt)
    assert set(grid.tolist()) == definition_grid(ebits)
    assert fmt.max_value == grid.max().item() == -grid.min().item()


def test_the_grids_spelled_out():
    assert sorted(value_grid(get_format("fp3_e2m0")).tolist()) == [-4, -2, -1, 0, 1, 2, 4]
    assert sorted(value_grid(get_format("fp2_e1m0")).tolist()) == [-2, 0, 2]


def _weights(rows=7, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))


@pytest.mark.parametrize("granularity", ["channel", "group:8", "tensor"])
@pytest.mark.parametrize("name", LOW)
def test_encoding_rounds_to_a_nearest_grid_point_and_is_idempotent(name, granularity):
    fmt = get_format(name)
    w = _weights()
    once = decode(encode(w, fmt, granularity), fmt, granularity, True, w.shape[1])
    twice = decode(encode(once, fmt, granularity), fmt, granularity, True, w.shape[1])
    assert torch.equal(once, twice)
    # per channel: the scale is the row's amax / max_value; each element lands on a nearest grid point
    if granularity == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / fmt.max_value
        grid = value_grid(fmt)
        x = w / scale
        best = (x.unsqueeze(-1) - grid).abs().min(dim=-1).values
        assert torch.allclose((x - once / scale).abs(), best, atol=1e-5)
        assert torch.allclose(once.abs().amax(dim=1), w.abs().amax(dim=1))  # amax is on the grid


@pytest.mark.parametrize("name", LOW)
def test_codes_pack_into_their_bits(name):
    fmt = get_format(name)
    codes = encode(_weights(5, 13, 1), fmt).codes
    assert int(codes.max()) < 2**fmt.bits
    packed = pack_codes(codes, fmt.bits)
    assert packed.numel() == packed_nbytes(codes.numel(), fmt.bits) == -(-codes.numel() // 8) * fmt.bits
    assert torch.equal(unpack_codes(packed, fmt.bits, tuple(codes.shape)), codes)


@pytest.mark.parametrize("name", LOW)
def test_quantize_save_and_load_give_the_same_outputs(name, tmp_path):
    pipe = build("sd")
    model = denoiser(pipe)
    baseline = pipe(**inputs("sd", steps=2)).images
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    handle = genfast.quantize(pipe, weights=name)
    fmt = get_format(name)
    for layer_name, layer in handle.layers.items():
        assert is_quantized(layer)
        w = float_weights[layer_name]
        flat = w.reshape(w.shape[0], -1)
        expected = decode(encode(flat, fmt), fmt, "channel", True, flat.shape[1]).reshape(w.shape)
        assert torch.equal(layer.weight, expected), layer_name
    quantized = pipe(**inputs("sd", steps=2)).images
    assert not np.array_equal(quantized, baseline)
    genfast.save_quantized(pipe, tmp_path / "q")
    loaded = genfast.load_pipeline(tmp_path / "q")
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(loaded(**inputs("sd", steps=2)).images, quantized)
    for layer_name, layer in handle.layers.items():
        for field, t in stored(denoiser(loaded).get_submodule(layer_name)).items():
            assert torch.equal(t, stored(layer)[field]), (layer_name, field)
    handle.remove()
    assert np.array_equal(pipe(**inputs("sd", steps=2)).images, baseline)
