"""QuantConfig(kernel=...): torchao's own kernels for the Linear layers it has a format for, genfast's
packed weights for the rest; "auto" on the CPU is "dequantize" exactly; remove() restores bit for bit."""

import importlib

import pytest
import torch
from restore_checks import assert_restored as _restored_as_before
from restore_checks import snapshot
from tiny_pipelines import build, inputs

import genfast
from genfast.quant.kernels import on_torchao
from genfast.quant.layers import is_quantized
from genfast.quant.quantize import quantizable

quantize_module = importlib.import_module("genfast.quant.quantize")  # genfast.quant.quantize is also the function


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return build("sd")


def _run(pipe):
    return pipe(**{**inputs("sd", steps=4), "output_type": "latent"}).images


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def assert_restored(model, snap):
    _restored_as_before(model, snap)
    assert not any("extra_repr" in m.__dict__ for m in model.modules()), "torchao's repr taken off"
    assert not any(on_torchao(m) or is_quantized(m) for m in model.modules())


def _quantized(pipe, **options):
    handle = genfast.quantize(pipe, genfast.QuantConfig(**options))
    try:
        return _run(pipe), handle.stats, {n: (on_torchao(m), is_quantized(m)) for n, m in handle.layers.items()}
    finally:
        handle.remove()


def test_torchao_int8_runs_close_to_dequantize_and_remove_restores(pipe):
    snap = snapshot(pipe.unet)
    base = _run(pipe)
    deq, _, _ = _quantized(pipe, weights="int8", kernel="dequantize")
    out, stats, where = _quantized(pipe, weights="int8", kernel="torchao")
    assert_restored(pipe.unet, snap)
    assert torch.equal(_run(pipe), base)
    layers = dict(quantizable(pipe.unet, genfast.QuantConfig().skip))
    # every Linear on torchao's Int8Tensor, every Conv2d still genfast's packed weight
    assert where == {n: (isinstance(m, torch.nn.Linear), isinstance(m, torch.nn.Conv2d)) for n, m in layers.items()}
    assert stats["torchao_layers"] == sum(isinstance(m, torch.nn.Linear) for m in layers.values()) > 0
    # torchao rounds int8 a little differently (amax/127.5 vs amax/127): measured here, its output
    # is as far from fp32 as genfast's (3.75e-3 vs 3.89e-3) and 1.5e-3 from genfast's
    assert _rel(out, base) <= 1.25 * _rel(deq, base)
    assert _rel(out, deq) <= 0.6 * _rel(deq, base)


@pytest.mark.parametrize("weights, granularity", [("fp8_e4m3", "channel"), ("fp8_e5m2", "tensor"), ("nvfp4", None)])
def test_torchao_float_formats_decode_to_genfast_values(pipe, weights, granularity):
    """torchao's fp8 and nvfp4 weights decode to genfast's values exactly: the same outputs bit for bit."""
    deq, _, _ = _quantized(pipe, weights=weights, granularity=granularity, kernel="dequantize")
    out, stats, _ = _quantized(pipe, weights=weights, granularity=granularity, kernel="torchao")
    assert stats["torchao_layers"] > 0
    assert torch.equal(out, deq)


@pytest.mark.parametrize("weights, granularity", [("int4", "group:16"), ("int6", "channel"), ("int8", "tensor")])
def test_torchao_int_formats_close_to_dequantize(pipe, weights, granularity):
    base = _run(pipe)
    deq, _, _ = _quantized(pipe, weights=weights, granularity=granularity, kernel="dequantize")
    out, stats, _ = _quantized(pipe, weights=weights, granularity=granularity, kernel="torchao")
    assert stats["torchao_layers"] > 0
    assert _rel(out, base) <= 1.25 * _rel(deq, base)
    assert _rel(out, deq) <= 0.6 * _rel(deq, base)


@pytest.mark.parametrize("weights, granularity", [("int8", "channel"), ("int4", "group:16"), ("fp8_e4m3", "channel"),
                                                  ("nvfp4", None)])
def test_auto_on_cpu_is_dequantize_exactly(pipe, weights, granularity):
    deq, deq_stats, deq_where = _quantized(pipe, weights=weights, granularity=granularity, kernel="dequantize")
    auto, auto_stats, auto_where = _quantized(pipe, weights=weights, granularity=granularity, kernel="auto")
    assert torch.equal(auto, deq)
    assert auto_stats == deq_stats and auto_stats["torchao_layers"] == 0
    assert auto_where == deq_where


@pytest.mark.parametrize("options, words", [
    (dict(weights="fp4_e2m1"), "no weight-only config for fp4_e2m1"),
    (dict(weights="mxfp8"), "no weight-only config for mxfp8"),
    (dict(weights="int3", granularity="tensor"), "int3 at granularity tensor"),
    # every Linear skipped: the Conv2d layers left are genfast's alone
    (dict(weights="int8", skip=("conv_in", "conv_out", "*attn*", "*proj*", "*ff*", "*linear*", "time_embedding*")),
     "Linear layers only"),
    # torchao's int8 per group needs whole groups along each row; the tiny UNet's rows are 16..128 wide
    (dict(weights="int8", granularity="group:48"), "multiples of"),
])
def test_torchao_refused_when_no_layer_can_use_it(pipe, options, words):
    snap = snapshot(pipe.unet)
    with pytest.raises(ValueError, match="kernel='torchao'") as error:
        genfast.quantize(pipe, genfast.QuantConfig(kernel="torchao", **options))
    assert words in str(error.value) and "kernel='dequantize'" in str(error.value)
    assert_restored(pipe.unet, snap)


def test_failure_part_way_puts_every_layer_back(pipe, monkeypatch):
    snap = snapshot(pipe.unet)
    calls = []
    real = quantize_module.to_torchao

    def failing(layer, route):
        calls.append(layer)
        if len(calls) == 5:
            raise RuntimeError("planted failure")
        real(layer, route)

    monkeypatch.setattr(quantize_module, "to_torchao", failing)
    with pytest.raises(RuntimeError, match="planted failure"):
        genfast.quantize(pipe, genfast.QuantConfig(weights="int8", kernel="torchao"))
    assert len(calls) == 5
    assert_restored(pipe.unet, snap)
