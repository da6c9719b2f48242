"""Simulated integer weight quantization: the grid, the config, and exact restoration."""

import numpy as np
import pytest
import torch
from tiny_pipelines import build, inputs

import genfast
from genfast.quant.config import QuantConfig
from genfast.quant.quantize import quantizable


@pytest.mark.parametrize("granularity", ["channel", "tensor", "group:8"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weights_land_on_an_n_bit_grid(bits, symmetric, granularity):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits))
    cfg = QuantConfig(weights=f"int{bits}", granularity=granularity, symmetric=symmetric)
    q = fake_quantize(w, cfg)
    assert q.shape == w.shape and q.dtype == w.dtype
    if symmetric:  # the scale comes back the same (max |q| = max |w|); a rounded zero point may shift it
        assert torch.equal(fake_quantize(q, cfg), q), "a grid point rounds to itself"
    rows = q.reshape(1, -1) if granularity == "tensor" else q.reshape(-1, 8) if granularity == "group:8" \
        else q.reshape(16, -1)
    assert max(len(torch.unique(r)) for r in rows) <= 2**bits
    err = (q - w).abs().max() / w.abs().max()
    assert err < 2.0 / 2**bits + 1e-6, "rounding moves a weight by at most half a step"


def test_more_bits_are_closer_to_the_float_pipeline():
    pipe = build("sd")
    baseline = np.asarray(pipe(**inputs("sd")).images)
    errors = {}
    for bits in (2, 4, 8):
        with genfast.quantize(pipe, weights=f"int{bits}"):
            errors[bits] = np.abs(np.asarray(pipe(**inputs("sd")).images) - baseline).mean()
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.01
    assert np.array_equal(np.asarray(pipe(**inputs("sd")).images), baseline)


def test_default_skip_keeps_first_and_last_convs_and_embeddings():
    unet = build("sd").unet
    names = {name for name, _ in quantizable(unet, QuantConfig().skip)}
    assert "conv_in" not in names and "conv_out" not in names
    assert not any(n.startswith("time_embedding.") for n in names)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "down_blocks.0.resnets.0.conv1" in names


@pytest.mark.parametrize(
    "options,message",
    [(dict(weights="int9"), "weights must be one of"), (dict(weights="fp4"), "weights must be one of"),
     (dict(granularity="row"), "granularity"), (dict(granularity="group:1"), "granularity"),
     (dict(symmetric="yes"), "symmetric"), (dict(bits=4), "unknown option")],
)
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        genfast.quantize(torch.nn.Linear(4, 4), **options)


def test_errors_change_nothing():
    pipe = build("sd")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="not a multiple of 48"):
        genfast.quantize(pipe, weights="int4", granularity="group:48")
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        genfast.quantize(pipe, weights="int4", skip=("*",))
    with pytest.raises(ValueError, match="not both"):
        genfast.quantize(pipe, QuantConfig(), weights="int4")
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert genfast.api.handles_on(pipe.unet) == {}


def test_a_plain_module_quantizes_and_restores_its_parameter_objects():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    params = list(model.parameters())
    x = torch.randn(3, 8)
    y = model(x)
    with genfast.quantize(model, weights="int2", skip=()) as handle:
        assert handle.stats == {"quantized_layers": 2}
        assert not torch.equal(model(x), y)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert torch.equal(model(x), y)
