"""Feature inheritance: training-free step skipping (A-SDM's tuning-free path, DeepCache's idea).

On a *full* step the denoiser runs whole and the outputs of chosen modules are kept. On a
*partial* step those modules hand back a feature from the last full steps instead of computing,
so only the rest of the network runs. What is reused is the level:

  layer  (UNet) the shallow branch runs: conv_in, the first `branch` down-path units, and the
         up-path layers that consume them; every deeper module is reused (DeepCache's scheme,
         branch=0 is DeepCache's cache_branch_id=0). `branch_units` additionally reuses
         attention / feed-forward outputs inside the fresh branch. The default on UNets.
  block  whole blocks reuse their output: UNet down/mid/up blocks by name, or for transformer
         denoisers (DiT, PixArt, SD3, Flux, Sana, AuraFlow, HunyuanDiT, LTX, Wan, CogVideoX ...)
         a span of transformer blocks, which add their kept residual to the fresh input; dual-
         stream blocks keep one residual per stream. The default on transformers.
  unit   inside every transformer block reuse self-attention (attn1), cross-attention (attn2)
         or feed-forward (ff) outputs; inside resnets reuse the residual branch.

How a kept feature is handed back is `reuse`: "copy" returns the last full step's feature;
"taylor" forecasts it from the last `order`+1 full steps by polynomial extrapolation in the
step index (TaylorSeer's finite-difference forecast), so a partial step follows the trend.

Which steps are full is the schedule: `uniform` (every `interval`-th), `nonuniform` (dense
around `center`, power law), an explicit `full_steps` list, or `calibrated` (one calibration
call measures how fast the reused features move per step -- for "taylor", how far they bend
from the forecast -- and puts the full steps where the accumulated change is largest).
Steps are counted as denoiser calls since the pipeline's last `scheduler.set_timesteps`,
never looked up by timestep value, so schedulers that repeat timesteps (Heun) and img2img's
shortened schedules count right. Pipelines that call the denoiser twice per step inside
diffusers' `cache_context("cond")` / `("uncond")` get one count and one set of kept features
per context.

Everything is attached as diffusers `ModelHook`s (genfast.hooks); `remove()` detaches
them and deletes what the registry left on the modules, so the pipeline is exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from ..api import Handle, claim, register_method
from ..hooks import attach, detach
from ..pipelines import denoiser_of
from ..pipelines.blocks import BlockIO, denoiser_kind, transformer_blocks

HOOK_PREFIX = "genfast_fi"
LEVELS = ("layer", "block", "unit")
REUSE = ("copy", "taylor")
MAX_ORDER = 3
SCHEDULES = ("uniform", "nonuniform", "calibrated", "list")
UNITS = ("attn1", "attn2", "ff", "resnet")
MIN_STEPS = 5  # pipelines with fewer steps run unaccelerated


# which option matters where: given anywhere else it would do nothing, so it is refused
_LEVEL_OPTIONS = {"branch": "layer", "branch_units": "layer", "blocks": "block", "units": "unit"}
_SCHEDULE_OPTIONS = {"center": ("nonuniform",), "power": ("nonuniform",), "num_full_steps": ("nonuniform", "calibrated"),
                     "interval": ("uniform", "nonuniform", "calibrated"), "full_steps": ("list",)}
_REUSE_OPTIONS = {"order": "taylor"}
_DEFAULTS = dict(interval=3, center=0.3, power=1.4, branch=0, branch_units=(), units=("attn1", "attn2", "ff"),
                 order=1)


@dataclass
class FeatureInheritanceConfig:
    """Options left as None take their default where they matter; one given where it does nothing is an error.

    Defaults: level "layer" on a UNet and "block" on a transformer (or the level the other
    options belong to), interval 3, center 0.3, power 1.4, branch 0, branch_units (), units
    attn1+attn2+ff, order 1; blocks: the deepest down block, the mid block and the first up
    block (UNet) or every transformer block but the first and the last (never none).
    """

    level: str | None = None  # None: "layer" on a UNet, "block" on a transformer
    schedule: str = "uniform"
    reuse: str = "copy"  # copy: the last full step's feature; taylor: forecast from the last full steps
    order: int | None = None  # taylor: degree of the forecast (1 linear, 2 quadratic, 3 cubic)
    interval: int | None = None  # uniform: every interval-th step is full; nonuniform/calibrated: ceil(n/interval) full
    num_full_steps: int | None = None  # nonuniform / calibrated: the count of full steps, instead of interval
    full_steps: tuple[int, ...] | None = None  # schedule="list": 0-based denoiser-call indices
    center: float | None = None  # nonuniform: where full steps crowd, as a fraction of the steps
    power: float | None = None  # nonuniform: how strongly they crowd (1 = uniform)
    branch: int | None = None  # layer: down-path units that stay fresh after conv_in
    branch_units: tuple[str, ...] | None = None  # layer: units reused inside the fresh branch too
    blocks: tuple[str, ...] | None = None  # block: UNet block names, or "start:stop" spans of a DiT
    units: tuple[str, ...] | None = None  # unit: which units are reused

    def __post_init__(self):
        if self.level is None:  # the options given may name the level
            implied = sorted({lvl for name, lvl in _LEVEL_OPTIONS.items() if getattr(self, name) is not None})
            if len(implied) > 1:
                raise ValueError(f"options for levels {implied} given together; set level to one of them")
            self.level = implied[0] if implied else None
        if self.level is not None and self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.reuse not in REUSE:
            raise ValueError(f"reuse must be one of {REUSE}, got {self.reuse!r}")
        if self.order is not None and self.reuse != "taylor":
            raise ValueError("order applies to reuse='taylor' only; with reuse='copy' it would do nothing: drop it "
                             "or set reuse='taylor'")
        if self.full_steps is not None and self.schedule == "uniform":
            self.schedule = "list"  # full_steps alone means the list schedule
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name, level in _LEVEL_OPTIONS.items():
            if getattr(self, name) is not None and self.level not in (level, None):
                raise ValueError(f"{name} applies to level='{level}' only; with level={self.level!r} it would do "
                                 f"nothing: drop it or set level='{level}'")
        for name, schedules in _SCHEDULE_OPTIONS.items():
            if getattr(self, name) is not None and self.schedule not in schedules:
                raise ValueError(f"{name} applies to schedule {' or '.join(map(repr, schedules))} only; with "
                                 f"schedule={self.schedule!r} it would do nothing: drop it")
        if self.interval is not None and self.num_full_steps is not None:
            raise ValueError("give interval or num_full_steps, not both: both set the count of full steps")
        if self.schedule == "list":
            if not self.full_steps:
                raise ValueError("full_steps must be a non-empty list of step indices >= 0 for schedule='list'")
            self.full_steps = tuple(sorted({int(s) for s in self.full_steps}))
            if self.full_steps[0] < 0:
                raise ValueError(f"full_steps must be >= 0, got {self.full_steps}")
        # the defaults, where they matter: equal configs then mean equal work
        for name, value in _DEFAULTS.items():
            applies = _LEVEL_OPTIONS.get(name, self.level) == self.level and \
                self.schedule in _SCHEDULE_OPTIONS.get(name, SCHEDULES) and \
                _REUSE_OPTIONS.get(name, self.reuse) == self.reuse
            if applies and getattr(self, name) is None and not (name == "interval" and self.num_full_steps):
                setattr(self, name, value)
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if self.order is not None and (not isinstance(self.order, int) or not 1 <= self.order <= MAX_ORDER):
            raise ValueError(f"order must be an integer in [1, {MAX_ORDER}], got {self.order!r}")
        if self.num_full_steps is not None and (not isinstance(self.num_full_steps, int) or self.num_full_steps < 1):
            raise ValueError(f"num_full_steps must be an integer >= 1, got {self.num_full_steps!r}")
        if self.center is not None and not 0.0 <= self.center <= 1.0:
            raise ValueError(f"center must be in [0, 1] (a fraction of the steps), got {self.center}")
        if self.power is not None and not 0.1 <= self.power <= 10.0:
            raise ValueError(f"power must be in [0.1, 10], got {self.power}")
        if self.branch is not None and (not isinstance(self.branch, int) or self.branch < 0):
            raise ValueError(f"branch must be an integer >= 0, got {self.branch!r}")
        for name in ("units", "branch_units", "blocks"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        for name in ("units", "branch_units"):
            bad = [u for u in getattr(self, name) or () if u not in UNITS]
            if bad:
                raise ValueError(f"{name} must be drawn from {UNITS}, got {bad}")
        if self.level == "unit" and not self.units:
            raise ValueError(f"units must name at least one of {UNITS} for level='unit'")
        if self.blocks is not None and (not self.blocks or len(set(self.blocks)) != len(self.blocks)):
            raise ValueError(f"blocks must name each block or span once, got {self.blocks}")

    def for_denoiser(self, kind: str) -> FeatureInheritanceConfig:
        """This config with the level filled in for a 'unet' or 'transformer' denoiser."""
        if self.level is not None:
            return self
        return dataclasses.replace(self, level="layer" if kind == "unet" else "block")


# ---------------------------------------------------------------- schedules

def uniform_schedule(n: int, interval: int) -> list[bool]:
    return [i % interval == 0 for i in range(n)]


def nonuniform_schedule(n: int, count: int, center: float, power: float) -> list[bool]:
    """`count` full steps crowded around center*n: offsets |x|^power of evenly spaced x."""
    count = max(1, min(count, n))
    c = center * (n - 1)
    full = {0}
    for x in torch.linspace(-1, 1, count).tolist():
        reach = c if x < 0 else (n - 1 - c)
        full.add(round(c + math.copysign(abs(x) ** power, x) * reach))
    _top_up(full, n, count)
    return [i in full for i in range(n)]


def calibrated_schedule(changes: list[float], count: int) -> list[bool]:
    """Full steps splitting the accumulated feature change into `count` equal parts.

    changes[i] is how much the reused features moved from step i-1 to step i (changes[0]
    ignored). Where features move fast, full steps come close together.
    """
    n = len(changes)
    count = max(1, min(count, n))
    full = {0}
    cumulative, total = [], 0.0
    for c in changes[1:]:
        total += max(c, 0.0)
        cumulative.append(total)
    if total > 0:
        for m in range(1, count):
            target = m * total / count
            full.add(next(i + 1 for i, v in enumerate(cumulative) if v >= target))
    order = sorted(range(1, n), key=lambda i: -changes[i])
    for i in order:  # duplicates collapsed: add the steps that change most
        if len(full) >= count:
            break
        full.add(i)
    return [i in full for i in range(n)]


def _top_up(full: set, n: int, count: int):
    for i in range(n):
        if len(full) >= count:
            break
        full.add(i)


def full_step_mask(cfg: FeatureInheritanceConfig, n: int, changes: list[float] | None = None) -> list[bool] | None:
    """Which of a call's n denoiser calls run full. None: calibrated, and not measured yet."""
    if cfg.schedule == "uniform":
        return uniform_schedule(n, cfg.interval)
    if cfg.schedule == "list":
        return [i == 0 or i in cfg.full_steps for i in range(n)]  # step 0: nothing to reuse yet
    count = cfg.num_full_steps or math.ceil(n / cfg.interval)
    if cfg.schedule == "nonuniform":
        return nonuniform_schedule(n, count, cfg.center, cfg.power)
    return None if changes is None else calibrated_schedule(changes, count)


# ---------------------------------------------------------------- hooks

DEFAULT_CONTEXT = "default"


@dataclass
class _Track:
    """Where one context (the whole call, or diffusers' "cond" / "uncond") is in the current call."""

    index: int = 0
    first: int = 0  # the index of its first call
    n_calls: int = 0
    full_mask: list[bool] = field(default_factory=list)
    calibrating: bool = False
    changes: list[float] = field(default_factory=list)
    kept: dict[int, _Kept] = field(default_factory=dict)  # reuse hook -> what it kept


@dataclass
class _StepState:
    """Shared by every hook of one accelerated pipeline."""

    pipe: object
    config: FeatureInheritanceConfig
    tracks: dict[str, _Track] = field(default_factory=dict)
    track: _Track | None = None  # the one the running denoiser call belongs to
    running: str = DEFAULT_CONTEXT  # its name
    full: bool = True
    calibration: dict[int, list[float]] = field(default_factory=dict)  # n_calls -> changes, summed over contexts
    measuring: set[int] = field(default_factory=set)  # n_calls being calibrated by the running call
    follow: object = None  # called before every denoiser call: picks up a swapped scheduler
    counts: dict[str, int] = field(default_factory=lambda: {"full": 0, "partial": 0})
    # diffusers' `cache_context` tells the stateful hooks of a model which context is running by
    # setting it on every StateManager they hold; this one only listens
    contexts: StateManager = field(default_factory=lambda: StateManager(_Track))
    timestep: object = None  # the running denoiser call's: where a loop without a begin index starts
    length: int | None = None  # denoiser calls in the running pipeline call, set by its first context

    def call_length(self) -> int:
        """Denoiser calls in this pipeline call, counted on the scheduler (which pipelines built from the
        same components share; the pipeline's own `_num_timesteps` would be the accelerated pipeline's,
        not the caller's). img2img's shortened loop starts at the scheduler's begin index, or, for
        schedulers without one (DDIM), where the call's first timestep sits in their timesteps."""
        if self.tracks and self.length is not None:  # a context joining late (SD3's skip-layer pass)
            return self.length
        sched = self.pipe.scheduler
        start = getattr(sched, "begin_index", None)
        if start is None:
            start = timestep_position(sched.timesteps, self.timestep)
        self.length = max(len(sched.timesteps) - start, 1)
        return self.length

    def reset(self):
        self.tracks.clear()
        self.measuring.clear()  # an interrupted calibration call must not record a partial run
        self.track = None
        self.full = True

    def context_name(self, kwargs) -> str:
        # read without StateManager.context, which raises when no context is set (UNet pipelines)
        name = self.contexts._context.name if self.contexts._context is not None else DEFAULT_CONTEXT
        if kwargs.get("skip_layers") is not None:  # SD3's skip-layer guidance: a third call per step
            name += "/skip_layers"
        return name

    def begin_call(self, args, kwargs) -> _Track:
        """Before a denoiser call: follow a swapped scheduler, note the timestep, enter its context."""
        self.follow()
        self.timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return self.enter(self.context_name(kwargs))

    def enter(self, name: str) -> _Track:
        track = self.tracks.get(name)
        if track is None:
            started = [t.index for t in self.tracks.values()]
            track = self.tracks[name] = self._begin()
            if started:  # a context that joins late (SD3's skip-layer pass from step 1) counts from there;
                # the contexts already running have been called this step
                track.index = min(max(started) - 1, track.n_calls - 1)
            track.first = track.index
        self.track, self.running = track, name
        return track

    def _begin(self) -> _Track:
        """A context's first denoiser call in this pipeline call: size its schedule."""
        n = self.call_length()
        order = getattr(self.pipe.scheduler, "order", 1) or 1
        if math.ceil(n / order) < MIN_STEPS:
            warnings.warn(
                f"feature_inheritance: this call has {math.ceil(n / order)} steps; pipelines with fewer than "
                f"{MIN_STEPS} run unaccelerated (too few steps to reuse anything)",
                stacklevel=4,
            )
            return _Track(n_calls=n, full_mask=[True] * n)
        measured = None if n in self.measuring else self.calibration.get(n)
        mask = full_step_mask(self.config, n, measured)
        if mask is None:  # calibrated, first call of this length: run it all full and measure
            self.measuring.add(n)
            self.calibration.pop(n, None)
            return _Track(n_calls=n, full_mask=[True] * n, calibrating=True, changes=[0.0] * n)
        return _Track(n_calls=n, full_mask=mask)

    def step_done(self):
        track = self.tracks.get(self.running)
        if track is None:
            return
        track.index += 1
        if track.index < track.n_calls:
            return
        if track.calibrating:  # every context measures; the schedule follows their sum
            total = self.calibration.get(track.n_calls, [0.0] * track.n_calls)
            self.calibration[track.n_calls] = [a + b for a, b in zip(total, track.changes)]
        del self.tracks[self.running]  # the context's last step: its next call starts afresh
        self.track = None
        if not self.tracks:
            self.measuring.clear()


def timestep_position(timesteps, timestep) -> int:
    """Where `timestep` first occurs in `timesteps` (0 when it does not, or is not known)."""
    if not isinstance(timesteps, torch.Tensor) or timestep is None:
        return 0
    t = timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep
    hits = (timesteps == torch.as_tensor(t, dtype=timesteps.dtype, device=timesteps.device)).nonzero()
    return int(hits[0, 0]) if len(hits) else 0


class _StepHook(ModelHook):
    """On the denoiser itself: decides full/partial before each call, counts after."""

    _is_stateful = True

    def __init__(self, state: _StepState):
        super().__init__()
        self.state = state
        self.contexts = state.contexts  # found by diffusers' cache_context through vars(hook)

    def pre_forward(self, module, *args, **kwargs):
        s = self.state
        track = s.begin_call(args, kwargs)
        # a context's first call has nothing to reuse yet
        s.full = track.full_mask[track.index] or track.index == track.first
        s.counts["full" if s.full else "partial"] += 1
        return args, kwargs

    def post_forward(self, module, output):
        self.state.step_done()
        return output

    def reset_state(self, module):
        self.state.reset()
        return module


def _tree(fn, *values):
    """fn over the tensors of equally nested tuples / lists; anything else comes from the first value."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return fn(*values)
    if isinstance(first, (tuple, list)):
        return type(first)(_tree(fn, *parts) for parts in zip(*values))
    return first


def _first_tensor(value):
    while isinstance(value, (tuple, list)):
        value = next((v for v in value if v is not None), None)
    return value


def _forecast_weights(steps: list[int], at: int) -> list[float]:
    """Lagrange weights of the polynomial through the kept steps, evaluated at step `at`."""
    weights = []
    for i, si in enumerate(steps):
        w = 1.0
        for j, sj in enumerate(steps):
            if j != i:
                w *= (at - sj) / (si - sj)
        weights.append(w)
    return weights


class _Kept:
    """A reused module's features from the last full steps of one context, and how to hand them back.

    copy keeps the last one. taylor keeps the last order+1 and forecasts along the polynomial
    through them -- the finite-difference Taylor expansion TaylorSeer uses, written as Lagrange
    weights so unequal gaps between full steps are exact. While fewer steps are kept, the
    forecast uses a lower degree (a single step is copied).
    """

    def __init__(self, config: FeatureInheritanceConfig):
        self.depth = (config.order + 1) if config.reuse == "taylor" else 1
        self.steps: list[int] = []
        self.values: list = []

    def add(self, step: int, value, calibrating: bool):
        self.steps.append(step)
        # a clone: the network may later change its own output in place
        self.values.append(_tree(lambda t: t.detach().clone(), value))
        # calibration compares each step with the forecast from the steps before it: one step more
        while len(self.steps) > self.depth + calibrating:
            del self.steps[0], self.values[0]

    def predict(self, step: int, skip_last: bool = False):
        steps, values = self.steps, self.values
        if skip_last:
            steps, values = steps[:-1], values[:-1]
        steps, values = steps[-self.depth:], values[-self.depth:]
        if len(steps) == 1:
            return values[0]
        weights = _forecast_weights(steps, step)
        return _tree(lambda *ts: sum(w * t for w, t in zip(weights, ts)), *values)

    def change(self) -> float:
        """How far the newest step strays from what the earlier ones forecast for it, relative to its size,
        as the 1/(degree+1) power: the error of a degree-d forecast over a gap g grows like g^(d+1), so
        spacing full steps evenly in this measure evens out the error (for copy: the plain step change)."""
        if len(self.steps) < 2:
            return 0.0
        guess = _first_tensor(self.predict(self.steps[-1], skip_last=True))
        new = _first_tensor(self.values[-1])
        if not isinstance(new, torch.Tensor) or guess.shape != new.shape:
            return 0.0
        degree = min(len(self.steps) - 1, self.depth) - 1
        rel = float((new.float() - guess.float()).norm() / (new.float().norm() + 1e-8))
        return rel ** (1.0 / (degree + 1))


class _ReuseHook(ModelHook):
    """Runs the module on full steps and keeps its output; hands it back on partial steps.

    mode="residual": keep output - input instead and return fresh input + residual (transformer
    blocks, one residual per stream), so the block still passes on what changed upstream of it.
    mode="resnet": the same for a resnet, whose input reaches the output through its shortcut.
    """

    _is_stateful = True

    def __init__(self, state: _StepState, module, mode: str = "output"):
        super().__init__()
        self.state = state
        self.mode = mode
        self.io = BlockIO(module) if mode == "residual" else None

    def _resnet_input(self, module, args, kwargs):
        x = args[0] if args else kwargs["input_tensor"]
        return module.conv_shortcut(x) if module.conv_shortcut is not None else x

    def _to_kept(self, module, out, args, kwargs):
        if self.mode == "output":
            return out
        if self.mode == "resnet":
            return out * module.output_scale_factor - self._resnet_input(module, args, kwargs)
        inputs = self.io.inputs(args, kwargs)
        if isinstance(out, torch.Tensor):
            return out - inputs[0]
        kept = list(out)
        for stream, index in enumerate(self.io.streams(out)):
            if index is not None and kept[index] is not None and inputs[stream] is not None:
                kept[index] = kept[index] - inputs[stream]
        return type(out)(kept)

    def _from_kept(self, module, kept, args, kwargs):
        if self.mode == "output":
            return kept
        if self.mode == "resnet":
            return (self._resnet_input(module, args, kwargs) + kept) / module.output_scale_factor
        inputs = self.io.inputs(args, kwargs)
        if isinstance(kept, torch.Tensor):
            return inputs[0] + kept
        out = list(kept)
        for stream, index in enumerate(self.io.streams(kept)):
            if index is not None and out[index] is not None and inputs[stream] is not None:
                out[index] = inputs[stream] + out[index]
        return type(kept)(out)

    def new_forward(self, module, *args, **kwargs):
        s, track = self.state, self.state.track
        kept = track.kept.get(id(self)) if track is not None else None
        if s.full or kept is None:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if track is not None:
                if kept is None:
                    kept = track.kept[id(self)] = _Kept(s.config)
                kept.add(track.index, self._to_kept(module, out, args, kwargs), track.calibrating)
                if track.calibrating:
                    track.changes[track.index] += kept.change()
            return out
        return self._from_kept(module, kept.predict(track.index), args, kwargs)

    def reset_state(self, module):
        self.state.reset()
        return module


# ---------------------------------------------------------------- what to reuse

# per-layer module lists of a UNet block, run in this order for each layer (AnimateDiff's blocks
# add a motion module after each resnet + attention)
_LAYER_LISTS = ("resnets", "attentions", "motion_modules")


def _layers(block):
    lists = [getattr(block, name) for name in _LAYER_LISTS if getattr(block, name, None) is not None]
    return [[modules[j] for modules in lists] for j in range(len(block.resnets))]


def _down_units(unet):
    """Down-path units that produce skip features, in order: conv_in, then per block its layers
    and its downsampler. Each entry: (block index, [modules])."""
    units = [(None, [unet.conv_in])]
    for i, block in enumerate(unet.down_blocks):
        units += [(i, layer) for layer in _layers(block)]
        if block.downsamplers is not None:
            units.append((i, list(block.downsamplers)))
    return units


def _up_layers(unet):
    return [(i, layer) for i, block in enumerate(unet.up_blocks) for layer in _layers(block)]


# unit name -> the attributes that hold it in diffusers' transformer blocks
_UNIT_ATTRS = {"attn1": ("attn1", "attn"), "attn2": ("attn2",), "ff": ("ff", "ff_context")}


def _branch_unit_modules(modules, names, blocks=()):
    """attn1 / attn2 / ff modules of the transformer blocks inside `modules` (or of `blocks`), and their resnets."""
    found = []
    blocks = list(blocks)
    for m in modules:
        for sub in m.modules():
            if "resnet" in names and isinstance(sub, ResnetBlock2D) and not (sub.up or sub.down):
                found.append((sub, "resnet"))
            if isinstance(sub, BasicTransformerBlock):
                blocks.append(sub)
    for block in blocks:
        found += [(getattr(block, a), "output") for u in names for a in _UNIT_ATTRS.get(u, ())
                  if isinstance(getattr(block, a, None), torch.nn.Module)]
    return found


def _unet_layer_plan(unet, cfg: FeatureInheritanceConfig):
    units = _down_units(unet)
    last = len(units) - 1
    if cfg.branch > last - 1:
        raise ValueError(
            f"branch must be in [0, {last - 1}] for this UNet ({last + 1} skip features); got {cfg.branch}"
        )
    plan = []
    fresh_modules = [unet.conv_in]
    # down path: units after the branch are reused; a block entirely past it is reused whole
    for b, block in enumerate(unet.down_blocks):
        idx = [k for k, (blk, _) in enumerate(units) if blk == b]
        if min(idx) > cfg.branch:
            plan.append((block, "output"))
            continue
        for k in idx:
            if k > cfg.branch:
                plan += [(m, "output") for m in units[k][1]]
            else:
                fresh_modules += units[k][1]
    plan.append((unet.mid_block, "output"))
    # up path: layer u consumes skip feature (last - u); it is fresh iff that feature is
    ups = _up_layers(unet)
    for b, block in enumerate(unet.up_blocks):
        idx = [u for u, (blk, _) in enumerate(ups) if blk == b]
        if all(last - u > cfg.branch for u in idx):
            plan.append((block, "output"))
            continue
        for u in idx:
            if last - u > cfg.branch:
                plan += [(m, "output") for m in ups[u][1]]
            else:
                fresh_modules += ups[u][1]
    if cfg.branch_units:
        plan += _branch_unit_modules(fresh_modules, cfg.branch_units)
    return plan


def _unet_block_plan(unet, cfg: FeatureInheritanceConfig):
    names = cfg.blocks or (f"down_blocks.{len(unet.down_blocks) - 1}", "mid_block", "up_blocks.0")
    modules = dict(unet.named_children())
    modules.update({f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)})
    modules.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
    allowed = [n for n in modules if n.startswith(("down_blocks.", "up_blocks.")) or n == "mid_block"]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"blocks {bad} are not blocks of this UNet; choose from {allowed}")
    return [(modules[n], "output") for n in names]


def default_span(n: int) -> str:
    """Every block but the first and the last, which see the fresh input and shape the output;
    never empty: a model with one or two blocks reuses its last."""
    return f"1:{n - 1}" if n >= 3 else f"{n - 1}:{n}"


def _transformer_block_plan(transformer, cfg: FeatureInheritanceConfig):
    blocks = [block for _, block in transformer_blocks(transformer)]
    n = len(blocks)
    chosen: list[int] = []
    for spec in cfg.blocks or (default_span(n),):
        try:
            start, stop = (int(x) if x else None for x in spec.split(":"))
            span = list(range(n))[slice(start, stop)]
        except ValueError:
            raise ValueError(f"blocks must be 'start:stop' spans over the {n} transformer blocks, got {spec!r}") from None
        if not span:
            raise ValueError(f"blocks={spec!r} selects none of the {n} transformer blocks")
        if set(span) & set(chosen):
            raise ValueError(f"blocks spans {cfg.blocks} overlap: name each transformer block once")
        chosen += span
    return [(blocks[i], "residual") for i in sorted(chosen)]


def _unit_plan(denoiser, cfg: FeatureInheritanceConfig):
    if denoiser_kind(denoiser) == "transformer":
        plan = _branch_unit_modules([], cfg.units, [b for _, b in transformer_blocks(denoiser)])
    else:
        plan = _branch_unit_modules([denoiser], cfg.units)
    if not plan:
        raise ValueError(f"no {cfg.units} units found in {type(denoiser).__name__}")
    return plan


# UNets whose blocks keep their layers in _LAYER_LISTS, so the layer plan reads them right
_UNETS = ("UNet2DConditionModel", "UNetMotionModel")


def _denoiser(pipe):
    try:
        denoiser = denoiser_of(pipe)
    except TypeError:
        denoiser = None
    if hasattr(denoiser, "_orig_mod"):
        raise TypeError(
            "feature_inheritance cannot serve a torch.compile'd denoiser: its hooks decide per step what to run, "
            "which a compiled graph cannot. Accelerate the uncompiled pipeline instead."
        )
    kind = denoiser_kind(denoiser) if isinstance(denoiser, torch.nn.Module) else None
    if kind == "unet" and type(denoiser).__name__ not in _UNETS:
        kind = None
    if kind is None:
        raise TypeError(
            f"feature_inheritance serves diffusers pipelines whose denoiser is a UNet ({', '.join(_UNETS)}: SD 1.x/2.x, "
            f"SDXL, img2img, inpaint, ControlNet, AnimateDiff) or a transformer with lists of blocks "
            f"(DiT, PixArt, SD3, Flux, Sana, AuraFlow, HunyuanDiT, LTX, Wan, CogVideoX ...); got "
            f"{type(pipe).__name__}" + (f" with a {type(denoiser).__name__}" if denoiser is not None else "")
        )
    return denoiser, kind


def _plan(pipe, cfg):
    """[(denoiser, [(module, mode)])] for the pipeline's denoiser and any second expert, and the config."""
    denoiser, kind = _denoiser(pipe)
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"{type(pipe).__name__} has no scheduler: feature_inheritance needs a diffusers pipeline")
    cfg = cfg.for_denoiser(kind)
    if kind == "transformer" and cfg.level == "layer":
        raise ValueError(
            "level='layer' needs a UNet (a shallow branch with skip connections); "
            "for transformers use level='block' (the default there) or level='unit'"
        )
    planners = {"layer": _unet_layer_plan, "block": _unet_block_plan, "unit": _unit_plan} if kind == "unet" else \
        {"block": _transformer_block_plan, "unit": _unit_plan}
    # Wan 2.2 hands the low-noise steps to `transformer_2`: it gets the same plan, and the step
    # count runs on across the hand-over
    expert = getattr(pipe, "transformer_2", None)
    denoisers = [denoiser] + ([expert] if isinstance(expert, torch.nn.Module) and expert is not denoiser else [])
    return [(d, planners[cfg.level](d, cfg)) for d in denoisers], cfg


def _invalidate(denoiser):
    """diffusers caches which submodules carry hooks (for cache_context); hooks added or removed stale it."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


# ---------------------------------------------------------------- apply / remove

class _SchedulerReset:
    """Resets the step state whenever the pipeline sets its scheduler's timesteps, which every
    diffusers pipeline does once at the start of a call; the bound method is restored on remove.

    A scheduler swapped in after accelerate() (`pipe.scheduler = X.from_config(...)`) is followed:
    the denoiser's first call after the swap moves the wrapper to it and starts the count afresh.
    """

    def __init__(self, pipe, state):
        self.pipe = pipe
        self.state = state
        self.scheduler = None
        self.follow()

    def follow(self):
        scheduler = self.pipe.scheduler
        if scheduler is self.scheduler:
            return
        self.undo()
        self.state.reset()
        self.scheduler = scheduler
        self.had_own = "set_timesteps" in scheduler.__dict__
        self.original = original = scheduler.set_timesteps

        # wraps: diffusers' retrieve_timesteps reads the signature to see whether the scheduler
        # takes `timesteps=` / `sigmas=`; a bare (*args, **kwargs) would make it refuse them
        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            self.state.reset()
            return original(*args, **kwargs)

        scheduler.set_timesteps = set_timesteps

    def undo(self):
        if self.scheduler is None:
            return
        if self.had_own:
            self.scheduler.set_timesteps = self.original
        else:
            del self.scheduler.set_timesteps
        self.scheduler = None


class FeatureInheritanceHandle(Handle):
    def __init__(self, pipe, config, state, undo, modules):
        super().__init__(pipe, "feature_inheritance", config, undo, modules)
        self.state = state

    def prepare(self, **call_kwargs) -> None:
        """The calibrated schedule measures on one call with these arguments; other schedules need nothing."""
        if self.config.schedule == "calibrated":
            self.calibrate(**call_kwargs)

    @property
    def stats(self) -> dict:
        """Denoiser calls run full and partial since the handle was made."""
        return dict(self.state.counts)

    def calibrate(self, *args, **kwargs):
        """Run the pipeline once with all full steps to measure feature change (calibrated schedule).

        Returns the pipeline's output; later calls with as many steps use the measured schedule.
        """
        if self.config.schedule != "calibrated":
            raise ValueError("calibrate() is for schedule='calibrated'")
        self.state.calibration.clear()
        return self.target(*args, **kwargs)

    def schedule_for(self, n_calls: int) -> list[bool] | None:
        """The full/partial mask for a call of n_calls denoiser calls (None: not calibrated yet)."""
        return full_step_mask(self.config, n_calls, self.state.calibration.get(n_calls))


@register_method("feature_inheritance", FeatureInheritanceConfig,
                 "training-free step skipping: reuse block / layer / unit features between steps")
def apply(pipe, config: FeatureInheritanceConfig) -> FeatureInheritanceHandle:
    plans, config = _plan(pipe, config)
    modules = [m for denoiser, plan in plans for m in [denoiser] + [module for module, _ in plan]]
    claim("feature_inheritance", modules)
    state = _StepState(pipe, config)
    attached = []
    for denoiser, plan in plans:
        attached.append(attach(denoiser, _StepHook(state), f"{HOOK_PREFIX}_step"))
        for k, (module, mode) in enumerate(plan):
            attached.append(attach(module, _ReuseHook(state, module, mode), f"{HOOK_PREFIX}_{k}"))
        _invalidate(denoiser)
    reset = _SchedulerReset(pipe, state)
    state.follow = reset.follow

    def undo():
        reset.undo()
        for entry in reversed(attached):
            detach(*entry)
        for denoiser, _ in plans:
            _invalidate(denoiser)
        state.reset()

    return FeatureInheritanceHandle(pipe, config, state, undo, modules)
