"""Simulated activation quantization with timestep-aware calibration (Q-Diffusion's two ideas).

The input of every quantized layer is fake-quantized per tensor -- int8 on the symmetric grid
[-127, 127], or fp8 e4m3 after dividing by a scale -- with a scale that depends on the current
denoiser call's timestep. A denoiser's activation ranges drift from the noisy first steps to the
clean last ones, so one scale for all steps clips some steps and wastes levels on others. The
timesteps seen during calibration, [lo, hi], are cut into `timestep_groups` equal ranges, each with
its own scales. Positions in the calibrated range rather than absolute values make the groups the
same whatever a pipeline passes as `timestep` (DDPM's 0..999, SD3's sigma*1000, Flux's sigma);
a later call outside [lo, hi] uses the nearest group.

Split skip (UNets): the first conv and the shortcut conv of every up-block resnet read
torch.cat([hidden, skip]), two tensors with different ranges (Q-Diffusion's "bimodal" shortcut
activations); each part gets its own scale. The channel where the skip begins is read from the up
blocks' `res_hidden_states_tuple` while calibrating.

Calibration is explicit: `handle.calibrate(*pipeline_args, **pipeline_kwargs)` (or `handle.prepare`,
which `genfast compare` calls) runs the pipeline once, all its steps, with the activations left
in float, and records each layer's input abs-max per timestep group. A call before that raises:
calibrating on the first call would return that call's images unquantized, or quantized with
statistics of the steps seen so far that the next call would not reproduce.

Hooks: a diffusers ModelHook on the denoiser reads each call's timestep (genfast.hooks, so other
methods' hooks stay intact); a torch forward pre-hook on each quantized layer replaces its input.
`detach()` takes them all off (the quantize handle's remove() calls it).
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks import ModelHook

from ..hooks import attach, detach

HOOK_NAME = "genfast_quant_activations"
QMAX = {"int8": 127.0, "fp8_e4m3": float(torch.finfo(torch.float8_e4m3fn).max)}
_TINY = 1e-12  # floor of a calibrated abs-max: a layer that only saw zeros still gets a usable scale
UNCALIBRATED = ("quantized activations are not calibrated yet: call handle.calibrate(...) once with the arguments "
                "of a pipeline call (e.g. handle.calibrate(prompt=[...], num_inference_steps=25)); it runs all "
                "the steps and records the activation ranges per timestep group")


def fake_quantize(x: torch.Tensor, scale: float, fmt: str) -> torch.Tensor:
    """`x` rounded onto the activation format's grid at `scale`; values past the range saturate."""
    if fmt == "int8":  # torch's own fake quantizer (keeps the dtype; straight-through gradient)
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, -127, 127)
    q = (x / scale).clamp(-QMAX[fmt], QMAX[fmt]).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale


def quantize_input(x: torch.Tensor, scales: list[float], split: int | None, fmt: str) -> torch.Tensor:
    """One scale for the whole tensor, or (split) one for channels [:split] and one for [split:]."""
    if split is None:
        return fake_quantize(x, scales[0], fmt)
    return torch.cat([fake_quantize(x[:, :split], scales[0], fmt), fake_quantize(x[:, split:], scales[1], fmt)], 1)


def _position(module: torch.nn.Module, name: str) -> int | None:
    """Where argument `name` sits among the positional arguments of module.forward (self excluded)."""
    params = list(inspect.signature(type(module).forward).parameters)[1:]
    return params.index(name) if name in params else None


def _argument(name: str, position: int | None, args: tuple, kwargs: dict):
    if name in kwargs:
        return kwargs[name]
    return args[position] if position is not None and position < len(args) else None


def _group(t: float, lo: float, hi: float, groups: int) -> int:
    """Which of `groups` equal ranges of [lo, hi] holds t (clamped to the first and last)."""
    if groups == 1 or hi <= lo:
        return 0
    return min(groups - 1, max(0, int((t - lo) / (hi - lo) * groups)))


class _TimestepHook(ModelHook):
    """On the denoiser: tells the owner each call's timestep before the call runs."""

    def __init__(self, owner: ActivationQuant):
        super().__init__()
        self.owner = owner

    def pre_forward(self, module, *args, **kwargs):
        t = _argument("timestep", self.owner._t_position, args, kwargs)
        # per-sample or per-token timesteps (LTX conditioning, Wan 2.2): the noisiest one
        self.owner._denoiser_call(None if t is None else float(torch.as_tensor(t).max()))
        return args, kwargs


class ActivationQuant:
    """The activation side of a quantize handle: hooks, calibration, scales per timestep group.

    After calibration: `scales` {layer name: fp32 tensor (timestep_groups, parts)} where parts is 2
    for split layers (hidden, skip) and 1 otherwise; `splits` {layer name: channel where the skip
    begins}; `timestep_range` (lo, hi) seen while calibrating; `group_of(t)`.
    """

    def __init__(self, handle):
        config = handle.config
        self.format = config.activations
        self.groups = config.timestep_groups
        self.split_skip = config.split_skip
        self.model = handle.model
        self.layers = dict(handle.layers)
        self.state = "uncalibrated"  # -> "calibrating" -> "calibrated"; "detached" once removed
        self.scales: dict[str, torch.Tensor] = {}
        self.splits: dict[str, int] = {}
        self.timestep_range: tuple[float, float] | None = None
        self._names = {id(m): n for n, m in self.layers.items()}
        self._t_position = _position(self.model, "timestep")
        self._current = 0  # the timestep group of the running denoiser call
        self._use: dict[str, list[list[float]]] = {}  # scales as floats, [group][part], for the hooks
        self._timesteps: list[float | None] = []  # calibration: one per denoiser call
        self._records: dict[str, dict[int, torch.Tensor]] = {}  # calibration: layer -> call -> abs-max
        self._pending_splits: dict[str, int] = {}
        self._calls_seen = 0
        self._handles = []
        self._attached = False
        try:
            for name, layer in self.layers.items():
                self._handles.append(layer.register_forward_pre_hook(self._layer_hook(name)))
            attach(self.model, _TimestepHook(self), HOOK_NAME)
            self._attached = True
        except BaseException:
            self.detach()
            raise

    @property
    def calibrated(self) -> bool:
        return self.state == "calibrated"

    def group_of(self, t: float | None) -> int:
        """The timestep group whose scales a denoiser call at timestep `t` uses."""
        if t is None:
            if self.groups > 1:
                raise RuntimeError(f"{type(self.model).__name__} was called without a timestep: quantized activations "
                                   f"with timestep_groups={self.groups} need one (or use timestep_groups=1)")
            return 0
        if self.timestep_range is None:
            raise RuntimeError(UNCALIBRATED)
        return _group(t, *self.timestep_range, self.groups)

    # ------------------------------------------------------------ hooks

    def _denoiser_call(self, t: float | None) -> None:
        if self.state == "calibrating":
            self._timesteps.append(t)
        elif self.state == "calibrated":
            self._current = self.group_of(t)
        else:
            raise RuntimeError(UNCALIBRATED)

    def _layer_hook(self, name: str):
        def hook(module, args):
            if self.state == "calibrated":
                scales = self._use.get(name)
                if scales is None:
                    raise RuntimeError(f"{name} did not run during calibration, so its input has no scale: calibrate "
                                       f"with a call that runs it")
                return (quantize_input(args[0], scales[self._current], self.splits.get(name), self.format),) + args[1:]
            if self.state == "calibrating":
                self._record(name, args[0])
                return None
            raise RuntimeError(UNCALIBRATED)

        return hook

    def _record(self, name: str, x: torch.Tensor) -> None:
        if not self._timesteps:
            raise RuntimeError(f"{name} ran outside a call of {type(self.model).__name__} while calibrating")
        x = x.detach()
        split = self._pending_splits.get(name)
        if split is None:
            amax = x.abs().amax().float().reshape(1)
        else:
            amax = torch.stack([x[:, :split].abs().amax(), x[:, split:].abs().amax()]).float()
        calls = self._records.setdefault(name, {})
        i = len(self._timesteps) - 1
        calls[i] = amax if i not in calls else torch.maximum(calls[i], amax)

    def _up_block_hooks(self) -> list:
        """Pre-hooks on every block that concatenates skips (it takes `res_hidden_states_tuple`)."""
        hooks = []
        for block in self.model.modules():
            if isinstance(getattr(block, "resnets", None), torch.nn.ModuleList):
                position = _position(block, "res_hidden_states_tuple")
                if position is not None:
                    hooks.append(block.register_forward_pre_hook(self._skip_hook(position), with_kwargs=True))
        return hooks

    def _skip_hook(self, position: int):
        def hook(block, args, kwargs):
            skips = _argument("res_hidden_states_tuple", position, args, kwargs)
            # resnet i concatenates the hidden state (first) with skips[-1 - i] (diffusers' up blocks)
            for i, resnet in enumerate(block.resnets[:len(skips or ())]):
                conv1 = getattr(resnet, "conv1", None)
                if not isinstance(conv1, torch.nn.Conv2d):
                    continue
                split = conv1.in_channels - skips[-1 - i].shape[1]
                for conv in (conv1, getattr(resnet, "conv_shortcut", None)):
                    name = self._names.get(id(conv))
                    if name is None or not 0 < split < conv.in_channels or conv.in_channels != conv1.in_channels:
                        continue
                    if self._pending_splits.setdefault(name, split) != split:
                        raise RuntimeError(f"{name}: the skip begins at channel {split} in one call and "
                                           f"{self._pending_splits[name]} in another")

        return hook

    # ------------------------------------------------------------ calibration

    def calibrate(self, pipe, *args, **kwargs) -> dict:
        """Run `pipe(*args, **kwargs)` once with the activations in float, recording their ranges; then quantize.

        Calibrating again replaces the scales. If the call fails, the previous calibration (if any) stays.
        Returns a summary: denoiser calls seen, the timestep range, layers calibrated, split layers.
        """
        if self.state == "detached":
            raise RuntimeError("this quantize handle was removed; quantize again to calibrate")
        previous = self.state
        self.state, self._timesteps, self._records, self._pending_splits = "calibrating", [], {}, {}
        hooks = self._up_block_hooks() if self.split_skip else []
        try:
            with torch.no_grad():
                pipe(*args, **kwargs)
            self._finish()
        except BaseException:
            self.state = previous
            raise
        finally:
            for h in hooks:
                h.remove()
            self._records, self._timesteps = {}, []
        self.state = "calibrated"
        return {"denoiser_calls": self._calls_seen, "timestep_range": self.timestep_range, "layers": len(self.scales),
                "split_layers": len(self.splits)}

    def _finish(self) -> None:
        ts = self._timesteps
        model = type(self.model).__name__
        if not ts:
            raise RuntimeError(f"the calibration call never ran the quantized {model}: pass the arguments of a "
                               f"pipeline call")
        if None in ts:
            if self.groups > 1:
                raise ValueError(f"timestep_groups={self.groups} needs the timestep of each {model} call, but it was "
                                 f"called without one: use timestep_groups=1")
            timestep_range = (0.0, 0.0)
        else:
            timestep_range = (min(ts), max(ts))
        groups = [0 if t is None else _group(t, *timestep_range, self.groups) for t in ts]
        scales = {}
        for name, calls in self._records.items():
            amax = torch.stack(list(calls.values())).cpu()
            per_group = torch.full((self.groups, amax.shape[1]), -1.0)
            for g, a in zip((groups[i] for i in calls), amax):
                per_group[g] = torch.maximum(per_group[g], a)
            seen = [g for g in range(self.groups) if per_group[g, 0] >= 0]
            for g in range(self.groups):  # a group no call fell in borrows from the nearest one
                if per_group[g, 0] < 0:
                    per_group[g] = per_group[min(seen, key=lambda h: (abs(h - g), h))]
            scales[name] = per_group.clamp_min(_TINY) / QMAX[self.format]
        self.scales, self.timestep_range, self._calls_seen = scales, timestep_range, len(ts)
        self.splits = {n: s for n, s in self._pending_splits.items() if n in scales}
        self._use = {n: s.tolist() for n, s in scales.items()}

    # ------------------------------------------------------------ removal

    def detach(self) -> None:
        """Take every hook off (idempotent); the layers then see float inputs again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._attached:
            detach(self.model, HOOK_NAME)
            self._attached = False
        self.state = "detached"


def attach_activations(handle) -> ActivationQuant:
    """Hook the quantize handle's layers and denoiser for simulated activation quantization."""
    return ActivationQuant(handle)
