"""Multi-UNet switching: the student runs the first steps, the teacher the rest; composes with feature inheritance."""

import copy
import math
from contextlib import contextmanager
from fractions import Fraction

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tiny_pipelines import SCHEDULERS, build, inputs

import genfast
from genfast.api import handles_on, method_config
from genfast.methods.multi_unet import MultiUNetConfig, student_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def run(pipe, kind="sd", **kw):
    return np.asarray(pipe(**inputs(kind, **kw)).images)


def small_student(teacher, seed=1, **over):
    """A different, smaller UNet that takes the teacher's calls: two stages instead of three."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=16, in_channels=teacher.config.in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=teacher.config.cross_attention_dim,
    )
    config.update(over)
    return UNet2DConditionModel(**config).eval()


def expected_student_calls(n, switch_at):
    # the T-Stitch rule (i + 1) / n <= switch_at counted exactly: floor(switch_at * n)
    return math.floor(Fraction(str(switch_at)) * n)


@contextmanager
def call_counts(teacher, student):
    """Counts the student's calls and the teacher's own (its conv_in runs only when the teacher does)."""
    counts = {"student": 0, "teacher": 0}
    hooks = [student.register_forward_hook(lambda *_: counts.__setitem__("student", counts["student"] + 1)),
             teacher.conv_in.register_forward_hook(lambda *_: counts.__setitem__("teacher", counts["teacher"] + 1))]
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def leftovers(pipe):
    left = [name for name, mod in pipe.unet.named_modules()
            if hasattr(mod, "_diffusers_hook") or "forward" in mod.__dict__ or "_genfast_handles" in mod.__dict__]
    if "set_timesteps" in pipe.scheduler.__dict__:
        left.append("scheduler.set_timesteps")
    return left


def step_latents(pipe, kind="sd", **kw):
    latents = []

    def keep(pipe, step, timestep, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    pipe(**inputs(kind, **kw), callback_on_step_end=keep)
    return latents


# ---- outputs


def test_exact_copy_is_bit_equal_follows_dtype_and_removes_cleanly():
    pipe = build("sd")
    baseline = run(pipe, steps=10)
    student = copy.deepcopy(pipe.unet).double()  # follows the teacher's dtype: exact for float32 weights
    handle = genfast.accelerate(pipe, "multi_unet", student=student, switch_at=0.4)
    assert student.dtype == torch.float32 and pipe.unet is not student
    assert np.array_equal(run(pipe, steps=10), baseline)
    assert handle.stats == {"student": 4, "teacher": 6}
    assert handles_on(pipe.unet) == {"multi_unet": handle}
    handle.remove()
    assert np.array_equal(run(pipe, steps=10), baseline)
    assert leftovers(pipe) == [] and handles_on(pipe.unet) == {}


@pytest.mark.parametrize("switch_at", [0.25, 0.4, 0.5, 0.75])
def test_student_runs_exactly_the_rule_s_steps(switch_at):
    pipe = build("sd")
    student = small_student(pipe.unet)
    with genfast.accelerate(pipe, "multi_unet", student=student, switch_at=switch_at) as handle, \
            call_counts(pipe.unet, student) as counts:
        total = {"student": 0, "teacher": 0}
        for n in (5, 8, 10):
            run(pipe, steps=n)
            k = expected_student_calls(n, switch_at)
            assert k == student_steps(n, switch_at)
            total = {"student": total["student"] + k, "teacher": total["teacher"] + n - k}
            assert counts == total, (n, switch_at)
        assert handle.stats == total


@pytest.mark.parametrize("batch", [1, 2])
def test_first_steps_are_the_student_pipeline_s(batch):
    """With CFG (cond and uncond batched in one call): the first k latents are those of a pipeline
    whose unet IS the student; the teacher takes over at step k."""
    pipe = build("sd")
    student = small_student(pipe.unet)
    n, switch_at = 10, 0.4
    k = expected_student_calls(n, switch_at)
    plain = step_latents(pipe, steps=n, batch=batch)
    alone = step_latents(StableDiffusionPipeline(**{**pipe.components, "unet": student}), steps=n, batch=batch)
    with genfast.accelerate(pipe, "multi_unet", student=student, switch_at=switch_at):
        mixed = step_latents(pipe, steps=n, batch=batch)
    assert len(mixed) == n
    assert all(torch.equal(a, b) for a, b in zip(mixed[:k], alone[:k]))
    assert not torch.equal(mixed[k], alone[k])  # the teacher's step
    assert not torch.equal(mixed[-1], plain[-1])


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_a_scheduler_swapped_in_afterwards_is_followed(scheduler):
    pipe = build("sd")
    student = small_student(pipe.unet)
    with genfast.accelerate(pipe, "multi_unet", student=student, switch_at=0.4):
        run(pipe, steps=6)
        pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
        with call_counts(pipe.unet, student) as counts:
            run(pipe, steps=6)
        calls = len(pipe.scheduler.timesteps)  # Heun: two denoiser calls per step but the last
        assert counts == {"student": expected_student_calls(calls, 0.4),
                          "teacher": calls - expected_student_calls(calls, 0.4)}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_img2img_counts_its_shortened_loop(scheduler):
    """strength 0.75 of 8 steps: the loop starts at step 2 (DDIM has no begin index to say so)."""
    pipe = build("img2img")
    pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
    student = small_student(pipe.unet)
    with genfast.accelerate(pipe, "multi_unet", student=student, switch_at=0.5), \
            call_counts(pipe.unet, student) as counts:
        run(pipe, "img2img", steps=8)
    calls = counts["student"] + counts["teacher"]
    assert calls == (11 if scheduler == "heun" else 6)
    assert counts["student"] == expected_student_calls(calls, 0.5)


def test_sdxl_added_conditioning_reaches_the_student():
    pipe = build("sdxl")
    cond = {k: pipe.unet.config[k] for k in
            ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")}
    student = small_student(pipe.unet, **cond)
    with genfast.accelerate(pipe, "multi_unet", student=student, switch_at=0.4), \
            call_counts(pipe.unet, student) as counts:
        run(pipe, "sdxl", steps=5)
    assert counts == {"student": 2, "teacher": 3}
    with pytest.raises(ValueError, match="addition_embed_type"):
        genfast.accelerate(pipe, "multi_unet", student=small_student(pipe.unet))


def test_a_call_stopped_mid_loop_leaves_no_state_behind():
    pipe = build("sd")
    student = small_student(pipe.unet)
    with genfast.accelerate(pipe, "multi_unet", student=student, switch_at=0.4):
        a = run(pipe, steps=10)

        def interrupt(pipe, step, timestep, kwargs):
            if step == 2:
                raise KeyboardInterrupt
            return kwargs

        with pytest.raises(KeyboardInterrupt):
            pipe(**inputs("sd", steps=10), callback_on_step_end=interrupt)
        with call_counts(pipe.unet, student) as counts:
            b = run(pipe, steps=10)
    assert np.array_equal(a, b) and counts == {"student": 4, "teacher": 6}


def test_student_from_a_unet_folder_or_a_pipeline_folder(tmp_path):
    pipe = build("sd")
    student = small_student(pipe.unet)
    with genfast.accelerate(pipe, "multi_unet", student=student, switch_at=0.4):
        expected = run(pipe, steps=6)
    student.save_pretrained(tmp_path / "unet_only")
    StableDiffusionPipeline(**{**pipe.components, "unet": student}).save_pretrained(tmp_path / "pipeline")
    for folder in (tmp_path / "unet_only", tmp_path / "pipeline"):
        with genfast.accelerate(pipe, "multi_unet", student=str(folder), switch_at=0.4) as handle:
            assert isinstance(handle.student, UNet2DConditionModel) and handle.student is not student
            assert np.array_equal(run(pipe, steps=6), expected)
    assert leftovers(pipe) == []


def test_compare_recipe_parses_a_folder_student(tmp_path):
    from genfast.eval.variants import parse_method_spec

    pipe = build("sd")
    small_student(pipe.unet).save_pretrained(tmp_path / "student")
    variants = parse_method_spec(f"multi_unet:student={tmp_path / 'student'}:switch_at=0.3,0.5")
    assert [v.steps[0].config().switch_at for v in variants] == [0.3, 0.5]
    assert variants[0].steps[0].config().student == str((tmp_path / "student").resolve())
    chain = parse_method_spec(f"multi_unet:student={tmp_path / 'student'}+feature_inheritance:interval=3")
    assert [s.method for s in chain[0].steps] == ["multi_unet", "feature_inheritance"]


# ---- with feature inheritance


def sample_of(out):
    return out.sample if hasattr(out, "sample") else out[0]


def apply_both(pipe, student, order):
    options = {"multi_unet": dict(student=student, switch_at=0.4), "feature_inheritance": dict(interval=3)}
    return {name: genfast.accelerate(pipe, name, **options[name]) for name in order}


ORDERS = [("feature_inheritance", "multi_unet"), ("multi_unet", "feature_inheritance")]


def test_with_feature_inheritance_in_either_order():
    """Both orders do the same work; the teacher's first call after the switch runs whole (nothing
    kept from the student's steps or an earlier call), and the call after it reuses features."""
    pipe = build("sd")
    student = small_student(pipe.unet)
    n, k = 10, 4  # interval 3: full steps 0, 3, 6, 9; steps 4 and 5 are partial by the schedule
    results = {}
    for order in ORDERS:
        records = []

        def record(module, args, kwargs, out, records=records):
            records.append((args, kwargs, sample_of(out).clone()))

        hook = pipe.unet.register_forward_hook(record, with_kwargs=True)
        handles = apply_both(pipe, student, order)
        images = [run(pipe, steps=n), run(pipe, steps=n)]  # the second call must not see the first's features
        stats = {name: h.stats for name, h in handles.items()}
        for h in reversed(handles.values()):
            h.remove()
        hook.remove()
        assert len(records) == 2 * n
        for call in (0, 1):
            args, kwargs, out = records[call * n + k]
            assert torch.equal(sample_of(pipe.unet(*args, **kwargs)), out), f"{order}: first teacher call not whole"
            args, kwargs, out = records[call * n + k + 1]
            assert not torch.equal(sample_of(pipe.unet(*args, **kwargs)), out), f"{order}: step {k + 1} reused nothing"
        results[order] = images, stats
    (images_a, stats_a), (images_b, stats_b) = results.values()
    assert all(np.array_equal(a, b) for a, b in zip(images_a, images_b))
    assert stats_a == stats_b
    assert stats_a["multi_unet"] == {"student": 2 * k, "teacher": 2 * (n - k)}
    assert sum(stats_a["feature_inheritance"].values()) == 2 * n  # it counts every call, the student's too


@pytest.mark.parametrize("order", ORDERS, ids="-then-".join)
@pytest.mark.parametrize("first_off", ["feature_inheritance", "multi_unet"])
def test_removing_either_first_leaves_the_other_working(order, first_off):
    pipe = build("sd")
    student = small_student(pipe.unet)
    baseline = run(pipe, steps=10)
    alone = {}
    for name in ("feature_inheritance", "multi_unet"):
        with apply_both(pipe, student, (name,))[name]:
            alone[name] = run(pipe, steps=10)
    handles = apply_both(pipe, student, order)
    handles.pop(first_off).remove()
    (other, handle), = handles.items()
    assert np.array_equal(run(pipe, steps=10), alone[other])
    handle.remove()
    assert np.array_equal(run(pipe, steps=10), baseline)
    assert leftovers(pipe) == []


# ---- errors


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(switch_at=0.0), "no effect"),
        (dict(switch_at=1.0), "removes the teacher entirely"),
        (dict(switch_at=-0.2), r"switch_at must be in \(0, 1\)"),
        (dict(switch_at=1.5), r"switch_at must be in \(0, 1\)"),
        (dict(switch_at=float("nan")), r"switch_at must be in \(0, 1\)"),
        (dict(switch_at="half"), "switch_at must be a number"),
        (dict(switch_at=True), "switch_at must be a number"),
        (dict(student=None), "student is required"),
        (dict(student="/nonexistent/student"), "is not a folder"),
        (dict(student=3), "student must be a folder path or a torch.nn.Module"),
        (dict(speed=2), "unknown option"),
    ],
)
def test_bad_options_name_the_option(options, message):
    options = {"student": torch.nn.Linear(1, 1), "switch_at": 0.4, **options}
    with pytest.raises(ValueError, match=message):
        method_config("multi_unet", options)


def test_a_folder_without_a_unet_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds neither a UNet"):
        MultiUNetConfig(student=tmp_path, switch_at=0.4)


def test_incompatible_students_are_refused():
    pipe = build("sd")
    teacher = pipe.unet
    cases = [
        (small_student(teacher, cross_attention_dim=32), "cross_attention_dim: teacher 16"),
        (small_student(teacher, in_channels=9), "in_channels"),
        (small_student(teacher, out_channels=8), "out_channels"),
        (teacher, "pipeline's own unet"),
        (torch.nn.Linear(2, 2), "must be a diffusers UNet"),
    ]
    shared = small_student(teacher)
    shared.conv_in = teacher.conv_in
    cases.append((shared, "shares modules with the teacher"))
    for student, message in cases:
        with pytest.raises(ValueError, match=message):
            genfast.accelerate(pipe, "multi_unet", student=student)
        assert leftovers(pipe) == []
    controlnet = build("controlnet")
    with pytest.raises(ValueError, match="ControlNet"):
        genfast.accelerate(controlnet, "multi_unet", student=small_student(controlnet.unet))
    with genfast.accelerate(controlnet, "multi_unet", student=copy.deepcopy(controlnet.unet)):
        run(controlnet, "controlnet", steps=5)


def test_unsupported_pipelines_are_refused():
    with pytest.raises(TypeError, match="denoiser is a UNet"):
        genfast.accelerate(build("dit"), "multi_unet", student=torch.nn.Linear(1, 1))
    pipe = build("sd")
    teacher = pipe.unet
    pipe.unet = torch.compile(teacher)
    with pytest.raises(TypeError, match="torch.compile"):
        genfast.accelerate(pipe, "multi_unet", student=small_student(teacher))


def test_the_same_method_twice_is_refused_also_through_a_shared_component():
    pipe = build("sd")
    student = small_student(pipe.unet)
    handle = genfast.accelerate(pipe, "multi_unet", student=student)
    other = StableDiffusionPipeline(**pipe.components)
    for target in (pipe, other):
        with pytest.raises(RuntimeError, match="already accelerated with 'multi_unet'"):
            genfast.accelerate(target, "multi_unet", student=copy.deepcopy(student))
    handle.remove()
    handle.remove()  # idempotent
    genfast.accelerate(other, "multi_unet", student=student).remove()
    assert leftovers(pipe) == []


def test_a_switch_that_leaves_the_student_no_step_warns():
    pipe = build("sd")
    with genfast.accelerate(pipe, "multi_unet", student=small_student(pipe.unet), switch_at=0.1) as handle, \
            pytest.warns(UserWarning, match="none of this call's 5"):
        run(pipe, steps=5)
    assert handle.stats == {"student": 0, "teacher": 5}
