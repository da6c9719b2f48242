"""Feature inheritance on every transformer / video family diffusers ships, and forecasting."""

import inspect

import numpy as np
import pytest
import torch
from tiny_pipelines import NEW_KINDS, TWO_PASS, build, denoiser, inputs

import genfast
from genfast.methods.feature_inheritance import FeatureInheritanceConfig, _Kept
from genfast.pipelines.blocks import BlockIO, transformer_blocks

_PIPES = {}


def pipe_of(kind):
    if kind not in _PIPES:
        _PIPES[kind] = build(kind)
    return _PIPES[kind]


def run(pipe, kind, steps=8, **kw):
    out = pipe(**{**inputs(kind, steps=steps), **kw})
    frames = getattr(out, "frames", None)
    return np.asarray(out.images if frames is None else frames)


def leftovers(pipe):
    """Modules carrying hooks, instance forwards or handle records, and a wrapped set_timesteps."""
    models = {"": denoiser(pipe), "transformer_2.": getattr(pipe, "transformer_2", None)}
    found = {prefix + name for prefix, model in models.items() if model is not None
             for name, mod in model.named_modules()
             if hasattr(mod, "_diffusers_hook") or "forward" in mod.__dict__ or "_genfast_handles" in mod.__dict__}
    if "set_timesteps" in pipe.scheduler.__dict__:
        found.add("scheduler.set_timesteps")
    return found


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_every_family_runs_with_default_options(kind):
    pipe = pipe_of(kind)
    baseline = run(pipe, kind)
    # a pipeline that calls `cache_context` gives its denoiser diffusers' (empty) hook registry itself
    before = leftovers(pipe)
    with genfast.accelerate(pipe, "feature_inheritance", interval=1):
        assert np.array_equal(run(pipe, kind), baseline), "an all-full schedule must equal the baseline"

    handle = genfast.accelerate(pipe, "feature_inheritance")
    assert handle.config.level == ("layer" if kind == "animatediff" else "block")
    first, second = run(pipe, kind), run(pipe, kind)
    assert handle.stats["partial"] > 0
    assert not np.array_equal(first, baseline), "skipping must change the output"
    assert np.array_equal(first, second), "the same seed must give the same output on every call"

    with pytest.raises(KeyboardInterrupt):  # a call stopped mid-loop, with another step count
        pipe(**inputs(kind, steps=11), callback_on_step_end=interrupt)
    assert np.array_equal(run(pipe, kind), first), "an interrupted call must leave nothing behind"
    original = pipe.scheduler
    pipe.scheduler = type(original).from_config(original.config)  # swapped after accelerate: followed
    try:
        assert np.array_equal(run(pipe, kind), first)
    finally:
        pipe.scheduler = original
    handle.remove()
    assert np.array_equal(run(pipe, kind), baseline), "remove() must restore bit-identical outputs"
    assert leftovers(pipe) == before


def interrupt(pipe, step, timestep, kwargs):
    if step == 3:
        raise KeyboardInterrupt
    return kwargs


def takes_sigmas(pipe):
    return "sigmas" in inspect.signature(pipe.__call__).parameters and \
        "sigmas" in inspect.signature(pipe.scheduler.set_timesteps).parameters


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_user_sigmas_where_the_pipeline_takes_them(kind):
    pipe = pipe_of(kind)
    if not takes_sigmas(pipe):
        pytest.skip(f"{type(pipe).__name__} with {type(pipe.scheduler).__name__} takes no sigmas=")
    sigmas = np.linspace(1.0, 1 / 8, 8).tolist()
    baseline = np.asarray(run(pipe, kind, sigmas=sigmas))
    with genfast.accelerate(pipe, "feature_inheritance") as handle:
        accelerated = run(pipe, kind, sigmas=sigmas)
        assert handle.stats["partial"] > 0
    assert not np.array_equal(accelerated, baseline)
    assert np.array_equal(run(pipe, kind, sigmas=sigmas), baseline)


@pytest.mark.parametrize("kind", [k for k in NEW_KINDS if k != "animatediff"])
def test_forecasting_on_every_transformer_family(kind):
    pipe = pipe_of(kind)
    baseline = run(pipe, kind)
    with genfast.accelerate(pipe, "feature_inheritance", reuse="taylor", interval=2):
        taylor = run(pipe, kind)
        assert np.array_equal(run(pipe, kind), taylor)
    with genfast.accelerate(pipe, "feature_inheritance", interval=2):
        copy = run(pipe, kind)
    assert not np.array_equal(taylor, copy), "forecasting must not fall back to copying"
    assert not np.array_equal(taylor, baseline)
    assert np.array_equal(run(pipe, kind), baseline)


@pytest.mark.parametrize("kind", ["flux_truecfg", "wan"])
def test_two_passes_per_step_keep_one_schedule_per_context(kind):
    """cond and uncond run inside diffusers' cache_context: each follows the schedule on its own."""
    assert TWO_PASS[kind]
    pipe = pipe_of(kind)
    with genfast.accelerate(pipe, "feature_inheritance", interval=3) as handle:
        run(pipe, kind, steps=8)
    per_context = handle.schedule_for(8)
    assert handle.stats == {"full": 2 * sum(per_context), "partial": 2 * (8 - sum(per_context))}


def test_dual_stream_blocks_reuse_the_residual_of_both_streams():
    pipe = pipe_of("sd3")
    block = transformer_blocks(pipe.transformer)[1][1]
    io, seen = BlockIO(block), []

    def record(module, args, kwargs, out):
        seen.append((io.inputs(args, kwargs), out))

    hook = block.register_forward_hook(record, with_kwargs=True)
    try:
        with genfast.accelerate(pipe, "feature_inheritance", blocks="1:3", interval=3) as handle:
            run(pipe, "sd3", steps=8)
        mask = handle.schedule_for(8)
    finally:
        hook.remove()
    (h0, e0), (enc0, hid0) = seen[0]  # SD3's joint blocks return (encoder_hidden_states, hidden_states)
    assert not mask[1]
    (h1, e1), (enc1, hid1) = seen[1]
    torch.testing.assert_close(hid1, h1 + (hid0 - h0), rtol=0, atol=1e-6)
    torch.testing.assert_close(enc1, e1 + (enc0 - e0), rtol=0, atol=1e-6)
    assert not torch.equal(enc1, enc0), "the text stream is recomputed from its fresh input, not copied"


def test_taylor_forecast_is_exact_on_polynomials_of_its_order():
    x = torch.randn(3, 4)
    for order in (1, 2, 3):
        kept = _Kept(FeatureInheritanceConfig(reuse="taylor", order=order))
        def poly(s, order=order):
            return sum((s / 10) ** k * (k + 1) * x for k in range(order + 1))
        for step in (0, 3, 4, 9)[: order + 1]:
            kept.add(step, (poly(step), None), calibrating=False)
        forecast, untouched = kept.predict(12)
        torch.testing.assert_close(forecast, poly(12))
        assert untouched is None
    copy = _Kept(FeatureInheritanceConfig(reuse="copy"))
    copy.add(0, x, calibrating=False)
    copy.add(3, 2 * x, calibrating=False)
    assert torch.equal(copy.predict(5), 2 * x)


def test_twenty_consecutive_calls_do_not_drift():
    pipe = pipe_of("flux_truecfg")
    with genfast.accelerate(pipe, "feature_inheritance", reuse="taylor", schedule="calibrated", interval=3) as h:
        h.prepare(**inputs("flux_truecfg"))
        first = run(pipe, "flux_truecfg")
        for _ in range(19):
            assert np.array_equal(run(pipe, "flux_truecfg"), first)


def test_a_call_of_another_size_after_an_interrupted_one():
    pipe = pipe_of("flux")
    with genfast.accelerate(pipe, "feature_inheritance"):
        with pytest.raises(KeyboardInterrupt):
            pipe(**inputs("flux", steps=11), callback_on_step_end=interrupt)
        other_size = run(pipe, "flux", height=48, width=48)
    assert other_size.shape[1:3] == (48, 48)


def test_another_librarys_cache_attached_later_survives_remove():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = pipe_of("flux")
    baseline = run(pipe, "flux")
    config = FirstBlockCacheConfig(threshold=0.5)
    pipe.transformer.enable_cache(config)
    fbc_alone = run(pipe, "flux")
    pipe.transformer.disable_cache()
    assert not np.array_equal(fbc_alone, baseline), "the first-block cache skipped something"

    handle = genfast.accelerate(pipe, "feature_inheritance")
    pipe.transformer.enable_cache(config)
    try:
        handle.remove()
        assert np.array_equal(run(pipe, "flux"), fbc_alone)
    finally:
        pipe.transformer.disable_cache()
    assert np.array_equal(run(pipe, "flux"), baseline)


def test_sd3_skip_layer_guidance_runs_as_its_own_context():
    """SD3's skip-layer guidance calls the transformer a second time per step, outside any cache_context."""
    pipe = pipe_of("sd3")
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    baseline = run(pipe, "sd3", **slg)
    with genfast.accelerate(pipe, "feature_inheritance", interval=3) as handle:
        out = run(pipe, "sd3", **slg)
        assert np.array_equal(run(pipe, "sd3", **slg), out)
    mask = handle.schedule_for(8)
    # two calls of 8 steps and two skip-layer passes over steps 1..7, whose first has nothing to reuse
    assert sum(handle.stats.values()) == 2 * (8 + 7)
    assert handle.stats["full"] == 2 * (sum(mask) + 1 + sum(mask[2:]))
    assert not np.array_equal(out, baseline)


def test_wan22_second_expert_is_accelerated_too():
    pipe = pipe_of("wan22")
    with genfast.accelerate(pipe, "feature_inheritance") as handle:
        assert pipe.transformer_2 in handle.modules
        run(pipe, "wan22")
    mask = handle.schedule_for(8)
    # cond and uncond: both experts together follow one schedule of 8 steps
    assert handle.stats == {"full": 2 * sum(mask), "partial": 2 * (8 - sum(mask))}
