import warnings

import numpy as np
import pytest
import torch
from tiny_pipelines import KINDS, SCHEDULERS, build, inputs

import genfast
from genfast.methods.feature_inheritance import (
    FeatureInheritanceConfig,
    calibrated_schedule,
    nonuniform_schedule,
    uniform_schedule,
)


@pytest.fixture(scope="module")
def pipes():
    return {kind: build(kind) for kind in KINDS}


def run(pipe, kind, **kw):
    return np.asarray(pipe(**inputs(kind, **kw)).images)


TRANSFORMER_KINDS = ("dit", "pixart")


def level_for(kind):
    return "block" if kind in TRANSFORMER_KINDS else "layer"


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def hook_leftovers(pipe):
    """Anything a hook could have left behind on the pipeline's modules or scheduler."""
    left = []
    for name in ("unet", "transformer", "controlnet"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        for mod_name, mod in model.named_modules():
            if hasattr(mod, "_diffusers_hook") or "forward" in mod.__dict__ or "_genfast_handles" in mod.__dict__:
                left.append(f"{name}.{mod_name}")
    if "set_timesteps" in pipe.scheduler.__dict__:
        left.append("scheduler.set_timesteps")
    if hasattr(pipe, "_genfast_handle"):
        left.append("pipe._genfast_handle")
    return left


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_pipeline_and_scheduler(pipes, kind, scheduler):
    pipe = pipes[kind]
    pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
    baseline = run(pipe, kind)
    state_before = {k: v.clone() for k, v in denoiser(pipe).state_dict().items()}

    with genfast.accelerate(pipe, "feature_inheritance", level=level_for(kind), interval=1):
        assert np.array_equal(run(pipe, kind), baseline), "an all-full schedule must equal the baseline"

    handle = genfast.accelerate(pipe, "feature_inheritance", level=level_for(kind), interval=3)
    first, second = run(pipe, kind), run(pipe, kind)
    assert not np.array_equal(first, baseline), "skipping must change the output"
    assert np.array_equal(first, second), "the same seed must give the same image on every call"
    assert handle.stats["partial"] > 0 and handle.stats["full"] > 0
    assert np.abs(first - baseline).mean() < 0.1, "reused features should stay close to the baseline"
    handle.remove()

    assert np.array_equal(run(pipe, kind), baseline), "remove() must restore bit-identical outputs"
    assert hook_leftovers(pipe) == []
    after = denoiser(pipe).state_dict()
    assert all(torch.equal(state_before[k], v) for k, v in after.items())


@pytest.mark.parametrize(
    "options",
    [
        dict(level="layer", branch=2),
        dict(level="layer", branch=0, branch_units=("attn1", "ff")),
        dict(level="block"),
        dict(level="block", blocks=("up_blocks.0", "mid_block")),
        dict(level="unit", units=("attn1", "attn2", "ff")),
        dict(level="unit", units=("resnet",)),
        dict(schedule="nonuniform", interval=3),
        dict(schedule="list", full_steps=(0, 1, 2, 5)),
    ],
    ids=str,
)
def test_levels_and_schedules_on_sd(pipes, options):
    pipe = pipes["sd"]
    pipe.scheduler = SCHEDULERS["ddim"](pipe.scheduler.config)
    baseline = run(pipe, "sd", steps=10)
    with genfast.accelerate(pipe, "feature_inheritance", **options) as handle:
        out = run(pipe, "sd", steps=10)
        assert np.array_equal(out, run(pipe, "sd", steps=10))
    assert not np.array_equal(out, baseline)
    assert handle.stats["partial"] > 0
    assert np.array_equal(run(pipe, "sd", steps=10), baseline)


def test_dit_unit_level_and_block_span(pipes):
    pipe = pipes["dit"]
    baseline = run(pipe, "dit")
    for options in (dict(level="unit", units=("attn1", "ff")), dict(level="block", blocks="0:3")):
        with genfast.accelerate(pipe, "feature_inheritance", **options):
            assert not np.array_equal(run(pipe, "dit"), baseline)
    assert np.array_equal(run(pipe, "dit"), baseline)


def test_batch_of_two_with_guidance(pipes):
    pipe = pipes["sd"]
    pipe.scheduler = SCHEDULERS["ddim"](pipe.scheduler.config)
    baseline = run(pipe, "sd", batch=2)
    with genfast.accelerate(pipe, "feature_inheritance", interval=2):
        out = run(pipe, "sd", batch=2)
    assert out.shape == baseline.shape == (2, 32, 32, 3)
    assert not np.array_equal(out, baseline)


def test_calibrated_schedule_measures_once_then_skips(pipes):
    pipe = pipes["sd"]
    pipe.scheduler = SCHEDULERS["ddim"](pipe.scheduler.config)
    baseline = run(pipe, "sd", steps=12)
    with genfast.accelerate(pipe, "feature_inheritance", schedule="calibrated", interval=3) as handle:
        assert handle.schedule_for(12) is None
        calibration_call = run(pipe, "sd", steps=12)
        mask = handle.schedule_for(12)
        out = run(pipe, "sd", steps=12)
    assert np.array_equal(calibration_call, baseline), "the calibration call runs every step full"
    assert mask[0] and sum(mask) == 4 and len(mask) == 12
    assert not np.array_equal(out, baseline)


def test_few_steps_run_unaccelerated_with_a_warning(pipes):
    pipe = pipes["sd"]
    pipe.scheduler = SCHEDULERS["ddim"](pipe.scheduler.config)
    baseline = run(pipe, "sd", steps=4)
    with genfast.accelerate(pipe, "feature_inheritance", interval=3), pytest.warns(UserWarning, match="unaccelerated"):
        out = run(pipe, "sd", steps=4)
    assert np.array_equal(out, baseline)


def test_state_resets_between_calls_of_different_lengths(pipes):
    pipe = pipes["sd"]
    pipe.scheduler = SCHEDULERS["ddim"](pipe.scheduler.config)
    with genfast.accelerate(pipe, "feature_inheritance", interval=3):
        a = run(pipe, "sd", steps=9)
        run(pipe, "sd", steps=6)
        def interrupt(pipe, step, timestep, kwargs):
            if step == 3:
                raise KeyboardInterrupt
            return kwargs

        with pytest.raises(KeyboardInterrupt):  # a call stopped mid-loop leaves no stale state behind
            pipe(**inputs("sd", steps=7), callback_on_step_end=interrupt)
        b = run(pipe, "sd", steps=9)
    assert np.array_equal(a, b)


# ---- errors


def test_unknown_method_lists_known_ones(pipes):
    with pytest.raises(ValueError, match="feature_inheritance"):
        genfast.accelerate(pipes["sd"], "warp_speed")
    assert "feature_inheritance" in genfast.list_methods()


def test_unsupported_objects_are_refused(pipes):
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        genfast.accelerate(torch.nn.Linear(2, 2), "feature_inheritance")
    with pytest.raises(ValueError, match="level='layer' needs a UNet"):
        genfast.accelerate(pipes["dit"], "feature_inheritance", level="layer")


def test_compiled_unet_is_refused_clearly(pipes):
    pipe = pipes["sd"]
    original = pipe.unet
    pipe.unet = torch.compile(original)
    try:
        with pytest.raises(TypeError, match="torch.compile"):
            genfast.accelerate(pipe, "feature_inheritance")
    finally:
        pipe.unet = original
    assert hook_leftovers(pipe) == []


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(interval=0), "interval"),
        (dict(level="pixel"), "level"),
        (dict(schedule="sometimes"), "schedule"),
        (dict(center=1.5), "center"),
        (dict(power=0.0), "power"),
        (dict(branch=-1), "branch"),
        (dict(branch=99), "branch must be in"),
        (dict(num_full_steps=0), "num_full_steps"),
        (dict(schedule="list", full_steps=()), "full_steps"),
        (dict(units=("conv",)), "units"),
        (dict(level="block", blocks=("up_blocks.9",)), "not blocks of this UNet"),
        (dict(speed="max"), "unknown option"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_options_name_the_option(pipes, options, message):
    with pytest.raises(ValueError, match=message):
        genfast.accelerate(pipes["sd"], "feature_inheritance", **options)
    assert hook_leftovers(pipes["sd"]) == []


def test_accelerating_twice_is_an_error_until_removed(pipes):
    pipe = pipes["sd"]
    handle = genfast.accelerate(pipe, "feature_inheritance")
    with pytest.raises(RuntimeError, match="already accelerated"):
        genfast.accelerate(pipe, "feature_inheritance")
    handle.remove()
    handle.remove()  # idempotent
    genfast.accelerate(pipe, "feature_inheritance").remove()
    assert hook_leftovers(pipe) == []


# ---- schedules as pure functions


def test_schedule_shapes():
    assert uniform_schedule(7, 3) == [True, False, False, True, False, False, True]
    mask = nonuniform_schedule(50, 10, center=0.3, power=1.4)
    assert mask[0] and sum(mask) == 10
    gaps = np.diff(np.flatnonzero(mask))
    centre = np.flatnonzero(mask)[np.argmin(np.abs(np.flatnonzero(mask) - 15))]
    assert gaps.min() <= 3 and centre in range(10, 21)
    changes = [0.0] + [0.01] * 20 + [1.0] * 5 + [0.01] * 4
    cal = calibrated_schedule(changes, 6)
    assert sum(cal) == 6 and cal[0]
    assert sum(cal[21:26]) >= 3, "full steps go where features change most"


def test_config_normalises_lists():
    cfg = FeatureInheritanceConfig(full_steps=[5, 0, 5, 2])
    assert cfg.schedule == "list" and cfg.full_steps == (0, 2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeatureInheritanceConfig(level="unit", units=["attn1"])


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(num_full_steps=4), "num_full_steps applies to schedule 'nonuniform' or 'calibrated' only"),
        (dict(schedule="list", full_steps=(0, 3), interval=2), "interval applies to schedule"),
        (dict(center=0.5), "center applies to schedule 'nonuniform'"),
        (dict(schedule="calibrated", power=2.0), "power applies to schedule 'nonuniform'"),
        (dict(level="block", branch=1), "branch applies to level='layer'"),
        (dict(level="unit", branch_units=("ff",)), "branch_units applies to level='layer'"),
        (dict(level="layer", blocks=("mid_block",)), "blocks applies to level='block'"),
        (dict(level="block", units=("ff",)), "units applies to level='unit'"),
        (dict(schedule="nonuniform", interval=2, num_full_steps=4), "not both"),
        (dict(schedule="uniform", full_steps=(0, 2)), None),  # full_steps alone selects the list schedule
    ],
    ids=str,
)
def test_options_that_would_do_nothing_are_refused(options, message):
    if message is None:
        assert FeatureInheritanceConfig(**options).schedule == "list"
        return
    with pytest.raises(ValueError, match=message):
        FeatureInheritanceConfig(**options)


def test_configs_that_do_the_same_work_are_equal():
    """A sweep can tell two rows apart only by what they do: defaults are filled in where they matter."""
    assert FeatureInheritanceConfig(level="layer") == FeatureInheritanceConfig(interval=3, branch=0)
    assert FeatureInheritanceConfig().for_denoiser("unet") == FeatureInheritanceConfig(level="layer")
    assert FeatureInheritanceConfig().for_denoiser("transformer") == FeatureInheritanceConfig(level="block")
    assert FeatureInheritanceConfig(reuse="taylor") == FeatureInheritanceConfig(reuse="taylor", order=1)
    assert FeatureInheritanceConfig(level="block") == FeatureInheritanceConfig(level="block", interval=3)
    assert FeatureInheritanceConfig(schedule="nonuniform") == FeatureInheritanceConfig(
        schedule="nonuniform", center=0.3, power=1.4, interval=3)
    assert FeatureInheritanceConfig(schedule="nonuniform", num_full_steps=4).interval is None
    assert FeatureInheritanceConfig() != FeatureInheritanceConfig(interval=2)


def test_dit_blocks_take_several_spans(pipes):
    pipe = pipes["dit"]
    with genfast.accelerate(pipe, "feature_inheritance", level="block", blocks="0:2") as one:
        whole = run(pipe, "dit")
    with genfast.accelerate(pipe, "feature_inheritance", level="block", blocks=("0:1", "1:2")) as two:
        split = run(pipe, "dit")
    with genfast.accelerate(pipe, "feature_inheritance", level="block", blocks="0:1"):
        first = run(pipe, "dit")
    assert np.array_equal(whole, split), "two spans covering blocks 0 and 1 reuse what 0:2 reuses"
    assert len(one.modules) == len(two.modules) == 3  # the transformer and its two blocks
    assert not np.array_equal(whole, first), "the second span is not ignored"
    with pytest.raises(ValueError, match="overlap"):
        genfast.accelerate(pipe, "feature_inheritance", level="block", blocks=("0:2", "1:3"))
    assert hook_leftovers(pipe) == []


@pytest.mark.parametrize("processor", ["classic", "sliced", "sdpa"])
def test_attention_processors_underneath(pipes, processor):
    """Feature inheritance hooks modules, not attention math: any processor diffusers ships works below it."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = pipes["sd"]
    pipe.scheduler = SCHEDULERS["ddim"](pipe.scheduler.config)
    original = pipe.unet.attn_processors
    if processor == "sliced":
        pipe.enable_attention_slicing(1)
    else:
        pipe.unet.set_attn_processor(AttnProcessor() if processor == "classic" else AttnProcessor2_0())
    try:
        baseline = run(pipe, "sd")
        for options in (dict(), dict(level="unit", units=("attn1", "attn2"))):
            with genfast.accelerate(pipe, "feature_inheritance", interval=1, **options):
                assert np.array_equal(run(pipe, "sd"), baseline)
            with genfast.accelerate(pipe, "feature_inheritance", interval=3, **options):
                assert not np.array_equal(run(pipe, "sd"), baseline)
        assert np.array_equal(run(pipe, "sd"), baseline)
    finally:
        pipe.unet.set_attn_processor(original)


def test_img2img_without_a_begin_index_counts_its_shortened_loop(pipes):
    """DDIM has no set_begin_index: img2img's loop (strength < 1) is found from its first timestep."""
    pipe = pipes["img2img"]
    pipe.scheduler = SCHEDULERS["ddim"](pipe.scheduler.config)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    baseline = run(pipe, "img2img", steps=12)
    hook.remove()
    n = len(calls)
    assert n < 12, "the tiny img2img call runs a shortened loop"
    with genfast.accelerate(pipe, "feature_inheritance", schedule="calibrated", interval=3) as handle:
        assert np.array_equal(run(pipe, "img2img", steps=12), baseline)  # calibration: all full
        mask = handle.schedule_for(n)
        run(pipe, "img2img", steps=12)
        stats = dict(handle.stats)
    assert mask is not None and len(mask) == n, "the calibration was recorded for the loop's real length"
    assert stats["partial"] == n - sum(mask) > 0
