"""genfast.quantize on real denoisers: every format runs, more bits come closer to float, the
checkpoint tensors are packed codes, and remove() puts back the very same float weights."""

import numpy as np
import pytest
import torch
from restore_checks import assert_restored, snapshot
from tiny_pipelines import build, denoiser, inputs

import genfast
from genfast.quant import layers as quant_layers
from genfast.quant.config import QuantConfig
from genfast.quant.formats import FORMATS, decode, encode, get_format, padded_cols
from genfast.quant.layers import is_quantized, stored
from genfast.quant.pack import packed_nbytes
from genfast.quant.quantize import quantizable

pytestmark = pytest.mark.usefixtures("one_thread")


def _denoiser_call(pipe, kind):
    """The arguments of the denoiser's first call in a pipeline run, to replay it directly."""
    seen = []
    hook = denoiser(pipe).register_forward_pre_hook(lambda m, a, k: seen.append((a, k)) if not seen else None,
                                                    with_kwargs=True)
    try:
        pipe(**inputs(kind, steps=1))
    finally:
        hook.remove()
    return seen[0]


@torch.no_grad()
def _run(model, call):
    args, kwargs = call
    return model(*args, **kwargs)[0]


@pytest.mark.parametrize("kind", ["sd", "pixart"])
def test_every_format_quantizes_and_remove_restores_the_float_model(kind):
    pipe = build(kind)
    model, call = denoiser(pipe), _denoiser_call(pipe, kind)
    baseline, before = _run(model, call), snapshot(model)
    errors = {}
    for name in FORMATS:
        handle = genfast.quantize(pipe, weights=name)
        assert handle.model is model and handle.layers
        assert all(is_quantized(layer) for layer in handle.layers.values())
        out = _run(model, call)
        assert out.shape == baseline.shape and torch.isfinite(out).all()
        errors[name] = ((out - baseline).abs().mean() / baseline.abs().mean()).item()
        assert errors[name] > 0, f"{name} changed nothing"
        handle.remove()
        assert_restored(model, before)  # the same Parameters and buffers: the same outputs
    assert torch.equal(_run(model, call), baseline)
    assert errors["int2"] > errors["int4"] > errors["int8"]
    assert errors["fp4_e2m1"] > errors["fp6_e2m3"] > errors["fp8_e4m3"]
    # MX: mxfp6 (e2m3) and mxfp8 (e4m3) both carry 3 mantissa bits; e4m3's wider exponent range
    # serves small weights, e2m3 clips less at the top of a block (7.5 of 8 vs 448 of 512 under
    # the spec's floor scale), so neither is closer in general -- both are closer than mxfp4
    assert errors["mxfp4"] > max(errors["mxfp6"], errors["mxfp8"])


def test_a_quantized_pipeline_call_and_its_exact_undo():
    pipe = build("sd")
    baseline = pipe(**inputs("sd", steps=2)).images
    with genfast.quantize(pipe, weights="int4", granularity="group:16", symmetric=False):
        quantized = pipe(**inputs("sd", steps=2)).images
    assert not np.array_equal(quantized, baseline)
    assert np.abs(quantized - baseline).mean() < 0.1
    assert np.array_equal(pipe(**inputs("sd", steps=2)).images, baseline)


@pytest.mark.parametrize("weights,granularity,symmetric", [("int4", "group:8", False), ("nvfp4", None, None),
                                                           ("fp6_e3m2", "channel", None)])
def test_assigning_a_weight_requantizes_it(weights, granularity, symmetric):
    unet = build("sd").unet
    handle = genfast.quantize(unet, weights=weights, granularity=granularity, symmetric=symmetric)
    cfg = handle.config
    for name in ("down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"):
        layer = handle.layers[name]
        shape = layer.weight.shape
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        layer.weight = w
        enc = encode(w.reshape(shape[0], -1), cfg.format, cfg.granularity or "channel", bool(cfg.symmetric))
        expected = decode(enc, cfg.format, cfg.granularity or "channel", bool(cfg.symmetric), w[0].numel())
        assert is_quantized(layer) and torch.equal(layer.weight, expected.reshape(shape))
        with pytest.raises(ValueError, match="cannot replace"):
            layer.weight = torch.zeros(shape[0] + 1, *shape[1:])
    handle.remove()


@pytest.mark.parametrize("weights,granularity", [("int3", "group:16"), ("int4", "group:64"), ("int8", "channel"),
                                                 ("fp6_e2m3", "tensor"), ("mxfp4", None), ("nvfp4", None)])
def test_the_model_holds_packed_codes_not_float_weights(weights, granularity):
    unet = build("sd").unet
    weights_before = {name: m.weight for name, m in unet.named_modules() if hasattr(m, "weight")}
    handle = genfast.quantize(unet, weights=weights, granularity=granularity)
    floats = {id(weights_before[name]) for name in handle.layers}
    fmt = get_format(weights)
    state = unet.state_dict(keep_vars=True)
    held = {id(t) for t in state.values()}
    total = 0
    for name, layer in handle.layers.items():
        tensors = stored(layer)
        rows, cols = layer.weight.shape[0], layer.weight[0].numel()
        codes = tensors["codes"]
        assert codes.dtype == torch.uint8
        assert codes.numel() == packed_nbytes(rows * padded_cols(fmt, cols, granularity or "channel"), fmt.bits)
        assert all(id(t) in held for t in tensors.values()), "the packed tensors are what the state_dict holds"
        assert f"{name}.weight" not in state
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert not floats & {id(p) for p in unet.parameters()}, "no float weight of a quantized layer is left"
    counts = ("quantized_layers", "packed_bytes")
    assert [handle.stats[k] for k in counts] == [len(handle.layers), total]
    handle.remove()
    assert [handle.stats[k] for k in counts] == [0, 0]


def test_default_skip_keeps_first_and_last_convs_and_embeddings():
    unet = build("sd").unet
    names = {name for name, _ in quantizable(unet, QuantConfig().skip)}
    assert "conv_in" not in names and "conv_out" not in names
    assert not any(n.startswith("time_embedding.") for n in names)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "down_blocks.0.resnets.0.conv1" in names


@pytest.mark.parametrize(
    "options,field",
    [(dict(weights="int9"), "weights"), (dict(weights="fp4"), "weights"),
     (dict(granularity="row"), "granularity"), (dict(granularity="group:1"), "granularity"),
     (dict(weights="mxfp4", granularity="group:32"), "granularity"),
     (dict(weights="nvfp4", granularity="channel"), "granularity"),
     (dict(symmetric="yes"), "symmetric"), (dict(weights="fp8_e4m3", symmetric=False), "symmetric"),
     (dict(weights="mxfp6", symmetric=False), "symmetric"),
     (dict(timestep_groups=4), "timestep_groups"), (dict(split_skip=False), "split_skip"),
     (dict(activations="int4"), "activations"), (dict(kernel="cuda"), "kernel"),
     (dict(skip=None), "skip"), (dict(skip=("conv_in", 3)), "skip"), (dict(bits=4), "unknown option")],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        genfast.quantize(torch.nn.Linear(4, 4), **options)
    if field != "unknown option":
        with pytest.raises(ValueError, match=field):
            QuantConfig(**options)


def test_nothing_to_quantize_is_refused():
    with pytest.raises(ValueError, match="skip"):
        genfast.quantize(build("sd"), weights="int4", skip=("*",))
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        genfast.quantize(torch.nn.Sequential(torch.nn.ReLU()), weights="int4")


def test_a_failure_midway_changes_nothing(monkeypatch):
    pipe = build("sd")
    before = snapshot(pipe.unet)
    calls = []

    def failing(*args, **kwargs):  # e.g. memory running out on the 6th layer
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("out of memory")
        return encode(*args, **kwargs)

    monkeypatch.setattr(quant_layers, "encode", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        genfast.quantize(pipe, weights="int4")
    assert_restored(pipe.unet, before)
    with pytest.raises(ValueError, match="not both"):
        genfast.quantize(pipe, QuantConfig(), weights="int4")
    assert_restored(pipe.unet, before)


def test_quantizing_twice_is_refused_and_leaves_the_first():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    x = torch.randn(3, 8)
    with genfast.quantize(model, weights="int4", skip=()) as handle:
        y = model(x)
        with pytest.raises(RuntimeError, match="already"):
            genfast.quantize(model, weights="int8", skip=())
        assert torch.equal(model(x), y) and all(is_quantized(m) for m in handle.layers.values())


def test_grouped_convolutions_quantize_per_output_channel_group():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=8, padding=1), torch.nn.Conv2d(8, 16, 3, groups=2))
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    y, before = model(x), snapshot(model)
    with genfast.quantize(model, weights="int4", granularity="group:4", skip=()) as handle:
        assert len(handle.layers) == 2
        assert all(m.weight.shape == before[2][f"{i}.weight"].shape for i, m in enumerate(model))
        assert 0 < (model(x) - y).abs().mean() < 0.1 * y.abs().mean()
    assert_restored(model, before)


def test_a_half_precision_module_keeps_its_dtype_and_parameter_order():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).half()
    before = snapshot(model)
    with genfast.quantize(model, weights="fp8_e4m3", skip=()) as handle:
        assert handle.stats["quantized_layers"] == 2
        assert all(m.weight.dtype == torch.float16 for m in handle.layers.values())
        assert all(isinstance(m, torch.nn.Linear) for m in handle.layers.values())
    assert_restored(model, before)
    assert type(model[0]) is torch.nn.Linear and type(model[2]) is torch.nn.Linear


@pytest.mark.parametrize("weights", ["int8", "mxfp4", "nvfp4"])
def test_a_quantized_model_follows_to_dtype(weights):
    """model.to(bfloat16) after quantize: the decoded weights come out in bfloat16 like the rest."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    with genfast.quantize(model, weights=weights, skip=()):
        y32 = model(x)
        model.to(torch.bfloat16)
        assert model[0].weight.dtype == torch.bfloat16
        y16 = model(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)
        model.to(torch.float32)
