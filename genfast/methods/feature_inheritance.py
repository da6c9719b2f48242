"""Feature inheritance: training-free step skipping (A-SDM's tuning-free path, DeepCache's idea).

On a *full* step the denoiser runs whole and the outputs of chosen modules are kept. On a
*partial* step those modules hand back what they produced last time instead of computing, so
only the rest of the network runs. What is reused is the level:

  layer  (UNet) the shallow branch runs: conv_in, the first `branch` down-path units, and the
         up-path layers that consume them; every deeper module is reused (DeepCache's scheme,
         branch=0 is DeepCache's cache_branch_id=0). `branch_units` additionally reuses
         attention / feed-forward outputs inside the fresh branch.
  block  whole blocks reuse their output: UNet down/mid/up blocks by name, or for transformer
         (DiT / PixArt) denoisers a span of transformer blocks, which add their cached
         residual to the fresh input.
  unit   inside every transformer block reuse self-attention (attn1), cross-attention (attn2)
         or feed-forward (ff) outputs; inside resnets reuse the residual branch.

Which steps are full is the schedule: `uniform` (every `interval`-th), `nonuniform` (dense
around `center`, power law), an explicit `full_steps` list, or `calibrated` (one calibration
call measures how much the reused features change per step and puts the full steps where the
accumulated change is largest). Steps are counted as denoiser calls since the pipeline's
last `scheduler.set_timesteps`, never looked up by timestep value, so schedulers that repeat
timesteps (Heun) and img2img's shortened schedules count right.

Everything is attached as diffusers `ModelHook`s (genfast.hooks); `remove()` detaches
them and deletes what the registry left on the modules, so the pipeline is exactly as before.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from ..api import Handle, claim, register_method
from ..hooks import attach, detach
from ..pipelines import denoiser_of

HOOK_PREFIX = "genfast_fi"
LEVELS = ("layer", "block", "unit")
SCHEDULES = ("uniform", "nonuniform", "calibrated", "list")
UNITS = ("attn1", "attn2", "ff", "resnet")
MIN_STEPS = 5  # pipelines with fewer steps run unaccelerated


# which option matters where: given anywhere else it would do nothing, so it is refused
_LEVEL_OPTIONS = {"branch": "layer", "branch_units": "layer", "blocks": "block", "units": "unit"}
_SCHEDULE_OPTIONS = {"center": ("nonuniform",), "power": ("nonuniform",), "num_full_steps": ("nonuniform", "calibrated"),
                     "interval": ("uniform", "nonuniform", "calibrated"), "full_steps": ("list",)}
_DEFAULTS = dict(interval=3, center=0.3, power=1.4, branch=0, branch_units=(), units=("attn1", "attn2", "ff"))


@dataclass
class FeatureInheritanceConfig:
    """Options left as None take their default where they matter; one given where it does nothing is an error.

    Defaults: interval 3, center 0.3, power 1.4, branch 0, branch_units (), units attn1+attn2+ff,
    blocks: the deepest down block, the mid block and the first up block (UNet) or 1:n-1 (DiT).
    """

    level: str = "layer"
    schedule: str = "uniform"
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
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.full_steps is not None and self.schedule == "uniform":
            self.schedule = "list"  # full_steps alone means the list schedule
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name, level in _LEVEL_OPTIONS.items():
            if getattr(self, name) is not None and self.level != level:
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
                self.schedule in _SCHEDULE_OPTIONS.get(name, SCHEDULES)
            if applies and getattr(self, name) is None and not (name == "interval" and self.num_full_steps):
                setattr(self, name, value)
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
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

@dataclass
class _StepState:
    """Shared by every hook of one accelerated pipeline: where we are in the current call."""

    pipe: object
    config: FeatureInheritanceConfig
    index: int = 0
    n_calls: int | None = None
    full_mask: list[bool] | None = None
    full: bool = True
    calibrating: bool = False
    changes: list[float] = field(default_factory=list)
    calibration: dict[int, list[float]] = field(default_factory=dict)  # n_calls -> changes
    hooks: list = field(default_factory=list)
    follow: object = None  # called before every denoiser call: picks up a swapped scheduler
    counts: dict[str, int] = field(default_factory=lambda: {"full": 0, "partial": 0})

    def reset(self):
        self.index = 0
        self.n_calls = None
        self.full_mask = None
        self.full = True
        self.calibrating = False  # an interrupted calibration call must not record a partial run
        for hook in self.hooks:
            hook.cache = None

    def begin_call(self):
        """First denoiser call after a reset: size the schedule for this pipeline call."""
        sched = self.pipe.scheduler
        # counted on the scheduler, which pipelines built from the same components share (the
        # pipeline's own `_num_timesteps` would be the accelerated pipeline's, not the caller's);
        # img2img's shortened loop starts at the scheduler's begin index
        n = max(len(sched.timesteps) - (getattr(sched, "begin_index", None) or 0), 1)
        self.n_calls = n
        order = getattr(sched, "order", 1) or 1
        cfg = self.config
        if math.ceil(n / order) < MIN_STEPS:
            warnings.warn(
                f"feature_inheritance: this call has {math.ceil(n / order)} steps; pipelines with fewer than "
                f"{MIN_STEPS} run unaccelerated (too few steps to reuse anything)",
                stacklevel=2,
            )
            self.full_mask = [True] * n
            return
        self.full_mask = full_step_mask(cfg, n, self.calibration.get(n))
        if self.full_mask is None:  # calibrated, first call of this length: run it all full and measure
            self.full_mask = [True] * n
            self.calibrating = True
            self.changes = [0.0] * n

    def end_call(self):
        if self.calibrating:
            self.calibration[self.n_calls] = list(self.changes)
        self.reset()


class _StepHook(ModelHook):
    """On the denoiser itself: decides full/partial before each call, counts after."""

    _is_stateful = True

    def __init__(self, state: _StepState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        s = self.state
        s.follow()
        if s.n_calls is None:
            s.begin_call()
        s.full = s.full_mask[s.index] if s.index < len(s.full_mask) else True
        s.counts["full" if s.full else "partial"] += 1
        return args, kwargs

    def post_forward(self, module, output):
        s = self.state
        s.index += 1
        if s.index >= s.n_calls:  # the last step of this call: next call starts afresh
            s.end_call()
        return output

    def reset_state(self, module):
        self.state.reset()
        return module


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _first_tensor(value):
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def _rel_change(new, old) -> float:
    a, b = _first_tensor(new), _first_tensor(old)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return 0.0
    return float((a.float() - b.float()).norm() / (b.float().norm() + 1e-8))


class _ReuseHook(ModelHook):
    """Runs the module on full steps and keeps its output; hands it back on partial steps.

    mode="residual": keep output - input instead and return fresh input + residual (DiT
    blocks, resnets), so the block still passes on what changed upstream of it.
    """

    _is_stateful = True

    def __init__(self, state: _StepState, mode: str = "output"):
        super().__init__()
        self.state = state
        self.mode = mode
        self.cache = None
        state.hooks.append(self)

    def _skip_input(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        if self.mode == "resnet":
            shortcut = module.conv_shortcut(x) if module.conv_shortcut is not None else x
            return shortcut
        return x

    def new_forward(self, module, *args, **kwargs):
        s = self.state
        if s.full or self.cache is None:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.mode == "output":
                kept = _clone(out)
            else:
                scale = getattr(module, "output_scale_factor", 1.0) if self.mode == "resnet" else 1.0
                kept = (out * scale - self._skip_input(module, args, kwargs)).detach()
            if s.calibrating and self.cache is not None:
                s.changes[s.index] += _rel_change(kept, self.cache)
            self.cache = kept
            return out
        if self.mode == "output":
            return self.cache
        scale = getattr(module, "output_scale_factor", 1.0) if self.mode == "resnet" else 1.0
        return (self._skip_input(module, args, kwargs) + self.cache) / scale

    def reset_state(self, module):
        self.cache = None
        return module


# ---------------------------------------------------------------- what to reuse

def _down_units(unet):
    """Down-path units that produce skip features, in order: conv_in, then per block its layers
    and its downsampler. Each entry: (block index, [modules])."""
    units = [(None, [unet.conv_in])]
    for i, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            units.append((i, [resnet] + ([attns[j]] if attns is not None else [])))
        if block.downsamplers is not None:
            units.append((i, list(block.downsamplers)))
    return units


def _up_layers(unet):
    layers = []
    for i, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            layers.append((i, [resnet] + ([attns[j]] if attns is not None else [])))
    return layers


def _branch_unit_modules(modules, names):
    """attn1 / attn2 / ff modules of the transformer blocks inside `modules`, and their resnets."""
    found = []
    for m in modules:
        for sub in m.modules():
            if "resnet" in names and isinstance(sub, ResnetBlock2D) and not (sub.up or sub.down):
                found.append((sub, "resnet"))
            if isinstance(sub, BasicTransformerBlock):
                found += [(getattr(sub, u), "output") for u in ("attn1", "attn2", "ff")
                          if u in names and getattr(sub, u, None) is not None]
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


def _dit_block_plan(transformer, cfg: FeatureInheritanceConfig):
    blocks = transformer.transformer_blocks
    n = len(blocks)
    chosen: list[int] = []
    for spec in cfg.blocks or (f"1:{n - 1}",):
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
    plan = _branch_unit_modules([denoiser], cfg.units)
    if not plan:
        raise ValueError(f"no {cfg.units} units found in {type(denoiser).__name__}")
    return plan


def _denoiser(pipe):
    try:
        denoiser = denoiser_of(pipe)
    except TypeError:
        denoiser = None
    if hasattr(denoiser, "down_blocks"):
        return denoiser, "unet"
    if hasattr(denoiser, "transformer_blocks"):
        return denoiser, "dit"
    raise TypeError(
        f"feature_inheritance serves diffusers pipelines with a UNet2DConditionModel (`pipe.unet`: SD 1.x/2.x, "
        f"SDXL, img2img, inpaint, ControlNet) or a DiT/PixArt-style transformer (`pipe.transformer` with "
        f"transformer_blocks); got {type(pipe).__name__}"
    )


def _plan(pipe, cfg):
    denoiser, kind = _denoiser(pipe)
    if hasattr(denoiser, "_orig_mod"):
        raise TypeError(
            "feature_inheritance cannot serve a torch.compile'd denoiser: its hooks decide per step what to run, "
            "which a compiled graph cannot. Accelerate the uncompiled pipeline instead."
        )
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"{type(pipe).__name__} has no scheduler: feature_inheritance needs a diffusers pipeline")
    if kind == "unet":
        if type(denoiser).__name__ != "UNet2DConditionModel":
            raise TypeError(f"feature_inheritance serves UNet2DConditionModel; this pipeline has {type(denoiser).__name__}")
        plan = {"layer": _unet_layer_plan, "block": _unet_block_plan, "unit": _unit_plan}[cfg.level](denoiser, cfg)
    else:
        if cfg.level == "layer":
            raise ValueError(
                "level='layer' needs a UNet (a shallow branch with skip connections); "
                "for DiT/PixArt-style transformers use level='block' or level='unit'"
            )
        plan = {"block": _dit_block_plan, "unit": _unit_plan}[cfg.level](denoiser, cfg)
    return denoiser, plan


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
    denoiser, plan = _plan(pipe, config)
    modules = [denoiser] + [module for module, _ in plan]
    claim("feature_inheritance", modules)
    state = _StepState(pipe, config)
    attached = [attach(denoiser, _StepHook(state), f"{HOOK_PREFIX}_step")]
    for k, (module, mode) in enumerate(plan):
        attached.append(attach(module, _ReuseHook(state, mode), f"{HOOK_PREFIX}_{k}"))
    reset = _SchedulerReset(pipe, state)
    state.follow = reset.follow

    def undo():
        reset.undo()
        for entry in reversed(attached):
            detach(*entry)
        state.reset()

    return FeatureInheritanceHandle(pipe, config, state, undo, modules)
