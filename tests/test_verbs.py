"""Verbs that compose: handles recorded on the modules they change, stacking, guards, removal order."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from test_feature_inheritance import hook_leftovers
from tiny_pipelines import build, inputs

import genfast
from genfast.api import Handle, handles_on


@pytest.fixture(scope="module")
def pipe():
    return build("sd")


def run(pipe, kind="sd", steps=9, **kw):
    return np.asarray(pipe(**inputs(kind, steps=steps, **kw)).images)


def snapshot(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}, {id(p) for p in pipe.unet.parameters()}


APPLY = {
    "quantize": lambda pipe: genfast.quantize(pipe, genfast.QuantConfig(weights="int4")),
    "feature_inheritance": lambda pipe: genfast.accelerate(pipe, "feature_inheritance", interval=3),
}


@pytest.mark.parametrize("first,second", [("quantize", "feature_inheritance"), ("feature_inheritance", "quantize")])
@pytest.mark.parametrize("remove_first", ["first", "second"])
def test_two_verbs_stack_and_come_off_in_either_order(pipe, first, second, remove_first):
    baseline = run(pipe)
    weights, param_ids = snapshot(pipe)
    alone = {}
    for name, make in APPLY.items():
        with make(pipe):
            alone[name] = run(pipe)
    assert not np.array_equal(alone["quantize"], baseline) and not np.array_equal(alone["feature_inheritance"], baseline)

    a, b = APPLY[first](pipe), APPLY[second](pipe)
    stacked = run(pipe)
    assert set(handles_on(pipe.unet)) == {"quantize", "feature_inheritance"}
    assert not np.array_equal(stacked, alone[first]) and not np.array_equal(stacked, alone[second])

    gone, kept = (a, b) if remove_first == "first" else (b, a)
    gone.remove()
    assert np.array_equal(run(pipe), alone[kept.method]), "the handle left on must work exactly as if alone"
    kept.remove()
    assert np.array_equal(run(pipe), baseline), "both off: bit-identical to the untouched pipeline"
    after, after_ids = snapshot(pipe)
    assert after_ids == param_ids and all(torch.equal(weights[k], v) for k, v in after.items())
    assert hook_leftovers(pipe) == [] and handles_on(pipe.unet) == {}


def test_stacking_order_does_not_change_the_result(pipe):
    with APPLY["quantize"](pipe), APPLY["feature_inheritance"](pipe):
        q_then_fi = run(pipe)
    with APPLY["feature_inheritance"](pipe), APPLY["quantize"](pipe):
        fi_then_q = run(pipe)
    assert np.array_equal(q_then_fi, fi_then_q)


def test_same_method_twice_is_refused_also_through_a_pipeline_sharing_the_denoiser(pipe):
    other = StableDiffusionImg2ImgPipeline(**pipe.components)
    for name, make in APPLY.items():
        handle = make(pipe)
        with pytest.raises(RuntimeError, match=f"already .* with '{name}'.*remove"):
            make(other)
        with pytest.raises(RuntimeError, match="StableDiffusionPipeline"):  # it names where the handle came from
            make(pipe)
        handle.remove()
        make(other).remove()  # free again once removed
    assert hook_leftovers(pipe) == []


def test_a_pipeline_sharing_the_denoiser_counts_its_own_steps(pipe):
    """pipe's handle sits on the shared UNet; img2img built from the same parts runs a shorter loop."""
    other = StableDiffusionImg2ImgPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    with genfast.accelerate(pipe, "feature_inheritance", interval=3):
        run(pipe, steps=12)  # the accelerated pipeline last ran 12 steps
        through_shared = np.asarray(other(**inputs("img2img", steps=9)).images)
    with genfast.accelerate(other, "feature_inheritance", interval=3):
        own = np.asarray(other(**inputs("img2img", steps=9)).images)
    assert np.array_equal(through_shared, own)


def test_a_handle_that_does_not_commute_must_come_off_last(pipe):
    """A method that replaces modules (assembly, real quantization) cannot come off under a later handle."""
    calls = []
    swapper = Handle(pipe, "swap_modules_example", None, lambda: calls.append("undo"),
                     modules=[pipe.unet], commutes=False)
    fi = genfast.accelerate(pipe, "feature_inheritance")
    with pytest.raises(RuntimeError, match="feature_inheritance.*must come off first"):
        swapper.remove()
    assert calls == [] and not swapper.removed
    fi.remove()
    swapper.remove()
    assert calls == ["undo"] and handles_on(pipe.unet) == {}


def test_scheduler_swapped_after_accelerate_is_followed(pipe):
    original = pipe.scheduler
    try:
        handle = genfast.accelerate(pipe, "feature_inheritance", interval=3)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)

        def interrupt(pipe_, step, timestep, kwargs):
            if step == 4:
                raise KeyboardInterrupt
            return kwargs

        with pytest.raises(KeyboardInterrupt):  # leaves a half-run call behind on the new scheduler
            pipe(**inputs("sd", steps=7), callback_on_step_end=interrupt)
        followed = run(pipe)
        handle.remove()
        assert "set_timesteps" not in pipe.scheduler.__dict__ and "set_timesteps" not in original.__dict__
        with genfast.accelerate(pipe, "feature_inheritance", interval=3):
            fresh = run(pipe)
        assert np.array_equal(followed, fresh)
    finally:
        pipe.scheduler = original


def test_accelerate_names_the_verb_of_another_method(pipe):
    with pytest.raises(ValueError, match="genfast.quantize"):
        genfast.accelerate(pipe, "quantize")
    assert set(genfast.list_methods("quantize")) == {"quantize"}


def test_user_timesteps_and_sigmas_pass_through_the_scheduler_wrapper(pipe):
    """diffusers' retrieve_timesteps inspects set_timesteps' signature before accepting them."""
    original = pipe.scheduler
    try:
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        sigmas = np.linspace(1.0, 0.05, 9).tolist()

        def with_sigmas():
            return np.asarray(pipe(**inputs("sd", steps=9), sigmas=sigmas).images)

        baseline = with_sigmas()
        with genfast.accelerate(pipe, "feature_inheritance", interval=3) as handle:
            accelerated = with_sigmas()
            assert handle.stats["partial"] > 0
        assert not np.array_equal(accelerated, baseline)
        assert np.array_equal(with_sigmas(), baseline)
    finally:
        pipe.scheduler = original
