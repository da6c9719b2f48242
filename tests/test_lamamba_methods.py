"""Feature inheritance (block level) and weight quantization on LaMamba-Diff in a DiTPipeline.

Block level reads LaMamba's 22 blocks (encoder, bottleneck, decoder; `LaMambaDiffModel.blocks()`)
as a transformer's block list: on a partial step a reused block adds the residual it kept on the
last full step to its fresh input; stem, resampling, added skips and final layer always run.
"""

import fnmatch

import numpy as np
import pytest
import torch
from restore_checks import assert_restored, snapshot
from tiny_pipelines import wake_gates

import genfast
from genfast.backbones import LaMambaDiffModel, lamamba_config
from genfast.pipelines.blocks import denoiser_kind, transformer_blocks
from genfast.pipelines.class_conditional import make_pipeline
from genfast.quant.config import DEFAULT_SKIP

STEPS = 6  # uniform schedule, interval 3: steps 0 and 3 full, four partial
# LaMamba's Linear / Conv2d layers that stay float: the conv stem, the time embedding, the final layer
FLOAT_LAYERS = {"stem", "time_embed.linear_1", "time_embed.linear_2", "final_expand.expand", "final_cond_proj",
                "final_adaLN_modulation.1", "proj_out"}


@pytest.fixture(scope="module")
def pipe(one_thread):
    torch.manual_seed(0)
    model = LaMambaDiffModel(**lamamba_config("mini")).eval()
    wake_gates(model)
    pipe = make_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(pipe):
    """The float pipeline's images, before any method touched it."""
    return _images(pipe)


def _images(pipe):
    return pipe(class_labels=[5, 23], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def _denoise(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([999, 700, 300, 20]), torch.tensor([0, 5, 23, 1000])).sample


def _ssm_calls(model):
    """Forward hooks counting how often each block's SS2D runs (a reused block skips it)."""
    counts = [0] * len(model.blocks())

    def counter(i):
        def hook(*_):
            counts[i] += 1
        return hook

    handles = [b.ssm.register_forward_hook(counter(i)) for i, b in enumerate(model.blocks())]
    return counts, handles


def test_blocks_are_the_models_own_in_call_order(pipe):
    model = pipe.transformer
    found = transformer_blocks(model)
    assert denoiser_kind(model) == "transformer"
    assert [b for _, b in found] == model.blocks() and len(found) == 22
    assert dict(model.named_modules())[found[-1][0]] is model.blocks()[-1]


@pytest.mark.parametrize("options,reused", [
    ({}, range(1, 21)),  # the default: every block but the first and the last
    ({"level": "block"}, range(1, 21)),
    ({"level": "block", "blocks": ("2:19",)}, range(2, 19)),  # DeepCache-like: outer stages fresh
])
def test_feature_inheritance_reuses_blocks_and_remove_restores(pipe, base, options, reused):
    counts, hooks = _ssm_calls(pipe.transformer)
    handle = genfast.accelerate(pipe, "feature_inheritance", **options)
    try:
        out = _images(pipe)
        assert handle.config.level == "block"
        assert handle.stats == {"full": 2, "partial": STEPS - 2}
        full = 2  # DiTPipeline's guidance halves share one denoiser call per step
        assert counts == [full if i in reused else STEPS for i in range(22)]
        assert np.isfinite(out).all()
        assert not np.array_equal(out, base)
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    assert np.array_equal(_images(pipe), base)


def test_all_full_steps_change_nothing(pipe, base):
    """With every step full the hooks only keep residuals: the output is the baseline's, bit for bit."""
    handle = genfast.accelerate(pipe, "feature_inheritance", interval=1)
    try:
        assert np.array_equal(_images(pipe), base)
        assert handle.stats == {"full": STEPS, "partial": 0}
    finally:
        handle.remove()


def test_int8_weights_close_to_float_and_remove_restores(pipe, base):
    model = pipe.transformer
    layers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    assert {n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in DEFAULT_SKIP)} == FLOAT_LAYERS
    base_eps, base_img = _denoise(model), base
    snap = snapshot(model)
    scan = {n: p.detach().clone() for n, p in model.named_parameters() if "x_proj" in n or "A_log" in n}
    handle = genfast.quantize(pipe, genfast.QuantConfig(weights="int8"))
    try:
        assert set(handle.layers) == layers - FLOAT_LAYERS
        assert handle.stats["quantized_layers"] == len(layers) - len(FLOAT_LAYERS)
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], v) for n, v in scan.items())  # the scan's own weights stay float
        eps, img = _denoise(model), _images(pipe)
    finally:
        handle.remove()
    # Per-channel symmetric int8 rounds a xavier-uniform row with RMS error max/(127 sqrt 12) = 0.39% of
    # its RMS; measured on this model: 0.40% relative error of the denoiser output and 61.6 dB PSNR of
    # the decoded 6-step images (int6: 1.6% and 50.0 dB; int4: 6.7% and 37.4 dB). The bounds leave
    # 2.5x / 11 dB of room; the relative error alone already tells int8 from int6.
    rel = ((eps - base_eps).norm() / base_eps.norm()).item()
    psnr = 10 * np.log10(1.0 / np.mean((img - base_img) ** 2))
    assert rel < 0.01, rel
    assert psnr > 50, psnr
    assert_restored(model, snap)
    assert torch.equal(_denoise(model), base_eps)
    assert np.array_equal(_images(pipe), base_img)


def test_quantized_and_inherited_together(pipe, base):
    """The two compose: int8 weights under feature inheritance, both removed leave the float pipeline."""
    snap = snapshot(pipe.transformer)
    quant = genfast.quantize(pipe, genfast.QuantConfig(weights="int8"))
    fi = genfast.accelerate(pipe, "feature_inheritance")
    try:
        out = _images(pipe)
        assert fi.stats == {"full": 2, "partial": STEPS - 2}
        assert np.isfinite(out).all()
    finally:
        fi.remove()
        quant.remove()
    assert_restored(pipe.transformer, snap)
    assert np.array_equal(_images(pipe), base)
