"""Multi-UNet switching: a small student UNet runs the first denoising steps, the teacher the rest.

T-Stitch's rule (small model first): step i of a call's n denoiser calls (0-based) runs the
student when (i + 1) / n <= switch_at, the teacher otherwise -- so floor(switch_at * n) steps go
to the student. The early, high-noise steps lay out the image and tolerate a weaker model; the
teacher's later steps refine the details. With a student r times the teacher's cost the call
costs about switch_at * r + (1 - switch_at) of the plain one.

`pipe.unet` stays the teacher object (other methods still find it): a diffusers `ModelHook` on it
hands the call, with the same arguments, to the student on the student's steps. Steps are counted
the way feature inheritance counts them (its `_StepState`: denoiser calls since the scheduler's
timesteps were last set, one count per diffusers `cache_context`), so img2img's shortened loops,
second-order schedulers (Heun: every denoiser call counts) and a scheduler swapped in after
accelerate() count right. A new call is seen by the scheduler handing out a new `timesteps`
tensor (every `set_timesteps` makes one), not by wrapping `set_timesteps`: a second wrapper there
would not come off cleanly when removed out of order with feature inheritance's.

With feature inheritance on the same pipeline (applied before or after): the teacher's kept
features belong to one call and the teacher runs the call's last steps without a break, so its
first call after the switch finds nothing kept and runs whole; nothing from the student's steps or
an earlier call is reused. Feature inheritance counts every denoiser call, the student's included,
in both orders (its schedule stays on the scheduler's steps): where its hook sits inside ours, the
student's steps pass through that hook's pre/post_forward. Its stats therefore count the student's
calls too (as full or partial, though no teacher feature was involved).

Adapters loaded into the teacher (LoRA, IP-Adapter) do not reach the student, and ControlNet /
T2I-Adapter residuals fit only a student with the teacher's down path (checked at apply time).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.hooks import ModelHook

from ..api import Handle, claim, register_method
from ..hooks import attach, detach
from ..pipelines.blocks import denoiser_kind
from .feature_inheritance import HOOK_PREFIX as FI_PREFIX
from .feature_inheritance import _StepState, _Track

METHOD = "multi_unet"
HOOK_NAME = "genfast_multi_unet"
FI_STEP_HOOK = f"{FI_PREFIX}_step"  # feature inheritance's step counter on the denoiser


@dataclass
class MultiUNetConfig:
    """student: a UNet folder, a pipeline folder (its unet/ is used) or a module; it follows the
    teacher's dtype and device. switch_at: the fraction of steps the student runs, in (0, 1)."""

    student: str | os.PathLike | torch.nn.Module | None = None
    switch_at: float = 0.4

    def __post_init__(self):
        if self.student is None:
            raise ValueError("student is required: a UNet folder, a pipeline folder (its unet/ is used) or a "
                             "torch.nn.Module, e.g. genfast.accelerate(pipe, 'multi_unet', student='out/student')")
        if isinstance(self.student, (str, os.PathLike)):
            path = Path(self.student).expanduser()
            if not path.is_dir():
                raise ValueError(f"student={os.fspath(self.student)!r} is not a folder: give a UNet folder "
                                 f"(config.json + weights), a pipeline folder (its unet/ is used) or a module")
            pipeline = (path / "model_index.json").is_file()
            if not (path / "unet" / "config.json" if pipeline else path / "config.json").is_file():
                raise ValueError(f"student={os.fspath(self.student)!r} holds neither a UNet (config.json) nor a "
                                 f"pipeline (model_index.json + unet/config.json); save one with save_pretrained")
            self.student = str(path.resolve())  # one folder, one config: equal configs do equal work
        elif not isinstance(self.student, torch.nn.Module):
            raise ValueError(  # noqa: TRY004 -- config errors are ValueErrors
                f"student must be a folder path or a torch.nn.Module, got {type(self.student).__name__}")
        s = self.switch_at
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ValueError(f"switch_at must be a number in (0, 1), got {s!r}")  # noqa: TRY004 -- a config error
        if s == 0:
            raise ValueError("switch_at=0 gives the student no step, so it would have no effect; switch_at must be "
                             "in (0, 1), the fraction of steps the student runs (e.g. 0.4)")
        if s == 1:
            raise ValueError("switch_at=1 gives the student every step and removes the teacher entirely; to run "
                             "the student alone make it the pipeline's unet (e.g. "
                             "StableDiffusionPipeline.from_pretrained(DIR, unet=student)); switch_at must be in (0, 1)")
        if not 0 < s < 1:
            raise ValueError(f"switch_at must be in (0, 1), the fraction of steps the student runs; got {s}")
        self.switch_at = float(s)


def student_steps(n: int, switch_at: float) -> int:
    """How many of n denoiser calls the student runs: those with (i + 1) / n <= switch_at."""
    return sum((i + 1) / n <= switch_at for i in range(n))


# ---------------------------------------------------------------- counting and routing

@dataclass
class _Steps(_StepState):
    """Feature inheritance's per-context step counting, with the routing's own call boundaries:
    a call starts when the scheduler (or its timesteps tensor) is new."""

    scheduler: object = None
    timesteps: object = None
    counts: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})

    def __post_init__(self):
        self.follow = self._follow

    def _follow(self):
        scheduler = self.pipe.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if scheduler is not self.scheduler or timesteps is not self.timesteps:
            self.reset()  # a new call, or a swapped scheduler: also drops a call stopped mid-loop
            self.scheduler, self.timesteps = scheduler, timesteps

    def _begin(self) -> _Track:
        n = self.call_length()
        if student_steps(n, self.config.switch_at) == 0:
            warnings.warn(
                f"multi_unet: switch_at={self.config.switch_at} gives the student none of this call's {n} denoiser "
                f"calls (it runs those with (i + 1) / n <= switch_at); the teacher runs them all",
                stacklevel=4,
            )
        return _Track(n_calls=n)


class _RouteHook(ModelHook):
    """On the teacher: hands each call to the student or to the teacher's own forward."""

    _is_stateful = True

    def __init__(self, state: _Steps, student: torch.nn.Module):
        super().__init__()
        self.state = state
        self.student = student
        self.contexts = state.contexts  # found by diffusers' cache_context through vars(hook)

    def new_forward(self, teacher, *args, **kwargs):
        s = self.state
        track = s.begin_call(args, kwargs)
        if (track.index + 1) / track.n_calls <= s.config.switch_at:
            out = self._student_call(teacher, args, kwargs)
            s.counts["student"] += 1
        else:
            out = self.fn_ref.original_forward(*args, **kwargs)
            s.counts["teacher"] += 1
        s.step_done()
        return out

    def _student_call(self, teacher, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        _follow_teacher(self.student, teacher, sample.device if isinstance(sample, torch.Tensor) else None)
        # feature inheritance's step counter registered before us (inside this hook) would miss the
        # student's steps and fall out of step with the scheduler: it sees them as it would from outside
        registry = teacher._diffusers_hook
        inner = registry._hook_order[:registry._hook_order.index(HOOK_NAME)]
        counters = [registry.hooks[name] for name in reversed(inner) if name == FI_STEP_HOOK]
        for hook in counters:
            args, kwargs = hook.pre_forward(teacher, *args, **kwargs)
        out = self.student(*args, **kwargs)
        for hook in reversed(counters):
            out = hook.post_forward(teacher, out)
        return out

    def reset_state(self, module):
        self.state.reset()
        return module


def _first_param(module):
    return next(module.parameters(), None)


def _follow_teacher(student, teacher, device=None):
    """Move the student to the teacher's dtype and to `device` (the sample's; else the teacher's)."""
    ref, own = _first_param(teacher), _first_param(student)
    if ref is None or own is None:
        return
    dtype = getattr(teacher, "dtype", ref.dtype)
    device = device if device is not None else ref.device
    if getattr(student, "dtype", own.dtype) != dtype or own.device != device:
        student.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- checks

# config keys that shape how the UNet is called: a student must agree with the teacher on them
_CALL_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "time_cond_proj_dim", "addition_embed_type",
              "class_embed_type", "num_class_embeds", "encoder_hid_dim_type", "attention_type")
# keys that matter only when the teacher uses the conditioning they belong to
_DEPENDENT_KEYS = {
    "addition_time_embed_dim": lambda c: c.get("addition_embed_type") == "text_time",
    "projection_class_embeddings_input_dim":
        lambda c: c.get("addition_embed_type") == "text_time" or c.get("class_embed_type") == "projection",
    "encoder_hid_dim": lambda c: c.get("encoder_hid_dim_type") is not None,
}
# what shapes the down path's skip features, which ControlNet / T2I-Adapter residuals are added to
_DOWN_PATH_KEYS = ("block_out_channels", "layers_per_block", "down_block_types")


def _normalise(key, value, config):
    if isinstance(value, list):
        value = tuple(value)
    if key == "cross_attention_dim":  # an int, or one per block: the text encoder's width either way
        return tuple(sorted(set(value))) if isinstance(value, tuple) else (value,)
    if key == "layers_per_block" and isinstance(value, int):
        return (value,) * len(config.get("down_block_types", ()))
    return value


def _teacher(pipe):
    teacher = getattr(pipe, "unet", None)
    if hasattr(teacher, "_orig_mod"):
        raise TypeError("multi_unet cannot hook a torch.compile'd unet (its hook decides per step which model runs, "
                        "which a compiled graph cannot); apply it to the uncompiled pipeline")
    if not isinstance(teacher, torch.nn.Module) or denoiser_kind(teacher) != "unet":
        what = type(teacher).__name__ if teacher is not None else "no unet"
        raise TypeError(f"multi_unet serves diffusers pipelines whose denoiser is a UNet (pipe.unet: SD 1.x/2.x, "
                        f"SDXL, img2img, inpaint, ControlNet); got {type(pipe).__name__} with {what}")
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"{type(pipe).__name__} has no scheduler: multi_unet needs a diffusers pipeline")
    return teacher


def check_compatible(teacher, student, pipe=None) -> None:
    """Raise ValueError unless `student` accepts every call the pipeline makes to `teacher`."""
    if student is teacher:
        raise ValueError("student is the pipeline's own unet: switching to it would have no effect; give a "
                         "different (smaller) UNet")
    if not isinstance(getattr(student, "config", None), dict) or denoiser_kind(student) != "unet":
        raise ValueError(f"student must be a diffusers UNet (with a config and down/mid/up blocks), got "
                         f"{type(student).__name__}")
    if not isinstance(student, type(teacher)) and not isinstance(teacher, type(student)):
        raise ValueError(  # noqa: TRY004 -- an incompatible student is a bad value
            f"student is a {type(student).__name__}, the teacher a {type(teacher).__name__}: the pipeline calls "
            f"them alike only when they are the same kind of UNet")
    # shared modules would carry the teacher's hooks (feature inheritance's) into the student's steps
    teacher_modules = {id(m) for m in teacher.modules()}
    if any(id(m) in teacher_modules for m in student.modules()):
        raise ValueError("student shares modules with the teacher; hooks on one would run inside the other: "
                         "pass a copy (copy.deepcopy) or a separately loaded UNet")
    t, s = dict(teacher.config), dict(student.config)
    keys = list(_CALL_KEYS) + [k for k, applies in _DEPENDENT_KEYS.items() if applies(t)]
    has_residuals = pipe is not None and any(getattr(pipe, n, None) is not None for n in ("controlnet", "adapter"))
    if has_residuals:
        keys += _DOWN_PATH_KEYS
    differ = [(k, t.get(k), s.get(k)) for k in keys if _normalise(k, t.get(k), t) != _normalise(k, s.get(k), s)]
    if differ:
        lines = "; ".join(f"{k}: teacher {a!r}, student {b!r}" for k, a, b in differ)
        why = (" (the pipeline's ControlNet / T2I-Adapter adds residuals shaped for the teacher's down path)"
               if any(k in _DOWN_PATH_KEYS for k, _, _ in differ) else "")
        raise ValueError(f"the student cannot take the teacher's calls: {lines}{why}. Use a student assembled "
                         f"from this teacher (genfast.assemble) or one with the same inputs and conditioning")


def _load_student(student, teacher):
    if isinstance(student, torch.nn.Module):
        return student
    from ..assembly.student import load_student  # plain and genfast-assembled UNets; imported when needed

    return load_student(student, torch_dtype=getattr(teacher, "dtype", None))


# ---------------------------------------------------------------- apply

class MultiUNetHandle(Handle):
    def __init__(self, pipe, config, state, student, undo, modules):
        super().__init__(pipe, METHOD, config, undo, modules)
        self.state = state
        self.student = student

    @property
    def stats(self) -> dict:
        """Denoiser calls run by the student and by the teacher since the handle was made."""
        return dict(self.state.counts)


@register_method(METHOD, MultiUNetConfig,
                 "multi-UNet switching: a smaller student UNet runs the first steps, the teacher the rest")
def apply(pipe, config: MultiUNetConfig) -> MultiUNetHandle:
    teacher = _teacher(pipe)
    claim(METHOD, [teacher])  # before loading anything
    student = _load_student(config.student, teacher)
    check_compatible(teacher, student, pipe)
    _follow_teacher(student, teacher)
    state = _Steps(pipe, config)
    attached = attach(teacher, _RouteHook(state, student), HOOK_NAME)

    def undo():
        detach(*attached)
        state.reset()

    return MultiUNetHandle(pipe, config, state, student, undo, [teacher])


def expected_speedup(switch_at: float, cost_ratio: float) -> float:
    """T-Stitch's estimate of the speed-up: 1 / (switch_at * r + (1 - switch_at)), r = student/teacher cost."""
    return 1.0 / (switch_at * cost_ratio + (1.0 - switch_at))


__all__ = ["MultiUNetConfig", "MultiUNetHandle", "apply", "check_compatible", "expected_speedup", "student_steps"]
