"""Which parts of a UNet matter: bypass each resnet, attention, resnet+attention layer and the mid
block in turn and measure how much the denoiser's output moves, next to its share of the
parameters and of the latency. This is the measurement BK-SDM and A-SDM prune by; the planner
(genfast.assembly.plan.auto_plan) and people both read it.

How: real pipeline calls with a fixed generator record the UNet's call inputs (args + kwargs) and
outputs at `timesteps` evenly spaced denoising steps. Each unit is then bypassed through a diffusers
`ModelHook` (genfast.hooks, detached afterwards) and the UNet replayed on every recorded input:
    output_change = ||out_bypassed - out|| / ||out||, averaged over the recorded calls.
Bypasses: a resnet becomes its shortcut (identity, or its conv_shortcut when channels change, with
its own up/downsampling and output_scale_factor), an attention (Transformer2DModel) hands back its
input hidden states, a layer does both, the mid block returns its input. Whole stages change the
resolution or the skip connections, so they cannot be bypassed: they get parameters and latency
only (output_change None), which the auto planner needs.

Latency: torch forward pre/post hooks time every unit module (time.perf_counter, the device
synchronised at each mark) over a few replayed calls; a share is a module's time over the whole
UNet call's. A layer's time is its resnet's plus its attention's; a stage's is measured around it,
so it holds its parts plus its down/upsampler and the glue between them.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.hooks import ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from genfast import hooks
from genfast.io import atomic_write_text

KINDS = ("resnet", "attention", "layer", "block", "stage")
FORMAT = "genfast-analysis/1"
JSON_NAME, MD_NAME, HEATMAP_NAME = "analysis.json", "analysis.md", "heatmap.png"
_HOOK_NAME = "genfast_analyze_bypass"
# arguments analyze() sets itself on every pipeline call
_OWN_CALL_ARGS = ("prompt", "num_inference_steps", "guidance_scale", "generator", "output_type",
                  "callback_on_step_end")


class NotAUNetPipelineError(TypeError):
    """The pipeline's denoiser is not a UNet2DConditionModel (a DiT, a video UNet ...)."""


@dataclass
class Unit:
    """One analysed part of the UNet; shares are fractions of the whole UNet (parameters, call time)."""

    name: str
    kind: str
    params: int
    param_share: float
    latency_share: float
    output_change: float | None
    per_timestep: list[float] | None


@dataclass
class Analysis:
    """units in UNet order; timesteps: the scheduler timestep of each captured step (the columns of
    per_timestep); steps: their indices in the denoising loop; meta: how the analysis was made."""

    units: list[Unit]
    timesteps: list[int]
    prompts: list[str]
    steps: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def ranked(self) -> list[Unit]:
        """The bypassable units, least output change first (the first candidates to remove)."""
        return sorted((u for u in self.units if u.output_change is not None), key=lambda u: u.output_change)

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"no unit {name!r} in this analysis; units: {', '.join(u.name for u in self.units)}")

    def markdown(self) -> str:
        m = self.meta
        lines = [
            "# UNet analysis",
            "",
            (f"{m.get('pipeline', 'pipeline')}, {len(self.prompts)} prompts, "
             f"{m.get('num_inference_steps', '?')} steps, guidance {m.get('guidance_scale') or 'pipeline default'}, "
             f"seed {m.get('seed', '?')}; captured steps {self.steps} (timesteps {self.timesteps}); "
             f"UNet {m.get('total_params', 0) / 1e6:.2f}M parameters."),
            "",
            ("Output change: relative L2 change of the UNet output when the unit is bypassed, mean over "
             "prompts and captured steps. Least change first."),
            "",
            "| rank | unit | kind | params | params share | latency share | output change |",
            "|---:|---|---|---:|---:|---:|---:|",
        ]
        for i, u in enumerate(self.ranked(), 1):
            lines.append(f"| {i} | {u.name} | {u.kind} | {u.params:,} | {u.param_share:.2%} | "
                         f"{u.latency_share:.2%} | {u.output_change:.4f} |")
        stages = [u for u in self.units if u.output_change is None]
        if stages:
            lines += ["", "Whole stages (not bypassable: they change resolution or skip connections):", "",
                      "| unit | kind | params | params share | latency share |", "|---|---|---:|---:|---:|"]
            lines += [f"| {u.name} | {u.kind} | {u.params:,} | {u.param_share:.2%} | {u.latency_share:.2%} |"
                      for u in stages]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Analysis:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a genfast analysis (format {data.get('format')!r}, expected {FORMAT!r})")
        units = [Unit(**u) for u in data["units"]]
        return cls(units=units, timesteps=list(data["timesteps"]), prompts=list(data["prompts"]),
                   steps=list(data.get("steps", [])), meta=dict(data.get("meta", {})))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write analysis.json, analysis.md and heatmap.png into out_dir (each file atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / JSON_NAME, json.dumps(self.to_dict(), indent=1) + "\n")
        atomic_write_text(out / MD_NAME, self.markdown())
        save_heatmap(self, out / HEATMAP_NAME)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Analysis:
        """An analysis saved by .save(): its folder or its analysis.json (plain JSON, nothing executed)."""
        path = Path(path)
        file = path / JSON_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {JSON_NAME} at {path}: give the folder Analysis.save() or "
                                    f"`genfast analyze --out` wrote")
        return cls.from_dict(json.loads(file.read_text()))


def save_heatmap(analysis: Analysis, path: str | os.PathLike) -> Path:
    """Ranked units (rows) x captured timesteps (columns), coloured by output change."""
    from genfast.eval.plots import _atomic_savefig, _pyplot

    plt = _pyplot()
    units = analysis.ranked()
    values = [u.per_timestep for u in units]
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(analysis.timesteps), 1.0 + 0.28 * max(len(units), 1)))
    image = ax.imshow(values or [[0.0]], aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(units)), [f"{u.name} ({u.kind})" for u in units], fontsize=7)
    ax.set_xticks(range(len(analysis.timesteps)),
                  [f"t={t}\nstep {s}" for t, s in zip(analysis.timesteps, analysis.steps)], fontsize=7)
    ax.set_xlabel("captured denoising step")
    ax.set_title("output change when bypassed (least first)", fontsize=9)
    if units and len(units) * len(analysis.timesteps) <= 600:
        top = max(max(v) for v in values) or 1.0
        for r, row in enumerate(values):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.6 * top else "white")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    try:
        return _atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------- the units


@dataclass
class _Spec:
    name: str
    kind: str
    parts: list  # [(module, bypass kind)]; a layer has two
    timed: list  # modules whose summed time is the unit's


def _unit_specs(unet: UNet2DConditionModel) -> list[_Spec]:
    specs = []

    def parts_of(prefix, block, with_layers):
        resnets = list(getattr(block, "resnets", None) or [])
        attentions = list(getattr(block, "attentions", None) or [])
        for j, r in enumerate(resnets):
            specs.append(_Spec(f"{prefix}.resnets.{j}", "resnet", [(r, "resnet")], [r]))
        for j, a in enumerate(attentions):
            if a is not None:
                specs.append(_Spec(f"{prefix}.attentions.{j}", "attention", [(a, "attention")], [a]))
        if with_layers:  # the BK-SDM unit: resnet j and the attention that follows it
            for j in range(min(len(resnets), len(attentions))):
                if attentions[j] is None:
                    continue
                pair = [(resnets[j], "resnet"), (attentions[j], "attention")]
                specs.append(_Spec(f"{prefix}.layers.{j}", "layer", pair, [resnets[j], attentions[j]]))

    for i, block in enumerate(unet.down_blocks):
        specs.append(_Spec(f"down_blocks.{i}", "stage", [], [block]))
        parts_of(f"down_blocks.{i}", block, True)
    if unet.mid_block is not None:
        specs.append(_Spec("mid_block", "block", [(unet.mid_block, "identity")], [unet.mid_block]))
        parts_of("mid_block", unet.mid_block, False)  # mid pairs are R-A-R: no single "layer"
    for i, block in enumerate(unet.up_blocks):
        specs.append(_Spec(f"up_blocks.{i}", "stage", [], [block]))
        parts_of(f"up_blocks.{i}", block, True)
    return specs


def _first_input(module, args, kwargs):
    """The input a bypassed module hands on: its first argument (hidden_states / input_tensor)."""
    if args:
        return args[0]
    return kwargs[list(inspect.signature(type(module).forward).parameters)[1]]  # [0] is self


class _Bypass(ModelHook):
    """Replaces the module's forward (no computation): shortcut, identity or pass-through."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def new_forward(self, module, *args, **kwargs):
        x = _first_input(module, args, kwargs)
        if self.how == "resnet":  # what ResnetBlock2D adds its residual branch to
            if getattr(module, "upsample", None) is not None:
                x = module.upsample(x)
            elif getattr(module, "downsample", None) is not None:
                x = module.downsample(x)
            if getattr(module, "conv_shortcut", None) is not None:
                x = module.conv_shortcut(x)
            return x / getattr(module, "output_scale_factor", 1.0)
        if self.how == "attention" and "return_dict" in inspect.signature(type(module).forward).parameters:
            # the block's own output type: blocks call it with return_dict=False and take [0]
            return Transformer2DModelOutput(sample=x) if kwargs.get("return_dict", True) else (x,)
        return x


# ------------------------------------------------------------------------------------- capture


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _sample(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


@dataclass
class _Capture:
    step: int
    timestep: int
    args: tuple
    kwargs: dict
    output: torch.Tensor | None = None


def _evenly_spaced(n: int, count: int) -> list[int]:
    if count == 1:
        return [0]
    return sorted({round(k * (n - 1) / (count - 1)) for k in range(count)})


def _capture(pipe, unet, prompts, steps, count, guidance_scale, seed, batch_size, call_kwargs) -> list[_Capture]:
    """Run the pipeline on the prompts and record the UNet's first call at each wanted step."""
    captures: list[_Capture] = []
    state = {"step": 0, "wanted": None, "pending": None, "taken": set()}
    takes_callback = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters

    def pre(module, args, kwargs):
        if state["wanted"] is None:  # the loop's real length (img2img strength, denoising_end)
            n = getattr(pipe, "_num_timesteps", None) if takes_callback else None
            n = n or steps
            if count > n:
                raise ValueError(f"timesteps={count} but this pipeline call runs only {n} denoising steps: "
                                 f"pass timesteps <= {n}")
            state["wanted"] = set(_evenly_spaced(n, count))
        step = state["step"]
        if step in state["wanted"] and step not in state["taken"]:
            state["taken"].add(step)
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            t = int(t.flatten()[0].item()) if isinstance(t, torch.Tensor) else int(t)
            state["pending"] = _Capture(step, t, _clone(args), _clone(kwargs))

    def post(module, args, kwargs, output):
        if state["pending"] is not None:
            state["pending"].output = _sample(output).detach().clone()
            captures.append(state["pending"])
            state["pending"] = None
        if not takes_callback:  # one UNet call per step assumed
            state["step"] += 1

    def on_step_end(pipeline, i, t, callback_kwargs):
        state["step"] = i + 1
        return {}

    handles = [unet.register_forward_pre_hook(pre, with_kwargs=True),
               unet.register_forward_hook(post, with_kwargs=True)]
    try:
        for start in range(0, len(prompts), batch_size):
            state.update(step=0, wanted=None, pending=None, taken=set())
            args = dict(call_kwargs, prompt=prompts[start:start + batch_size], num_inference_steps=steps,
                        generator=torch.Generator().manual_seed(seed + start), output_type="latent")
            if guidance_scale is not None:
                args["guidance_scale"] = guidance_scale
            if takes_callback:
                args["callback_on_step_end"] = on_step_end
            pipe(**args)
    finally:
        for h in handles:
            h.remove()
    return captures


# ------------------------------------------------------------------------------------- measuring


def _replay(unet, capture: _Capture) -> torch.Tensor:
    return _sample(unet(*capture.args, **capture.kwargs))


def _relative_change(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _bypassed_changes(unet, spec: _Spec, captures: list[_Capture]) -> list[float]:
    attached = []
    try:
        for module, how in spec.parts:
            attached.append(hooks.attach(module, _Bypass(how), _HOOK_NAME))
        return [_relative_change(_replay(unet, c), c.output) for c in captures]
    finally:
        for module, name in reversed(attached):
            hooks.detach(module, name)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module_times(unet, modules: list[torch.nn.Module], captures: list[_Capture], calls: int) -> dict[int, float]:
    """Seconds spent inside each module (keyed by id) and the UNet (id(unet)) over `calls` replays."""
    device = next(unet.parameters()).device
    started: dict[int, float] = {}
    total: dict[int, float] = {}

    def pre(module, args):
        _sync(device)
        started[id(module)] = time.perf_counter()

    def post(module, args, output):
        _sync(device)
        total[id(module)] = total.get(id(module), 0.0) + time.perf_counter() - started.pop(id(module))

    _replay(unet, captures[0])  # warm-up: allocator, kernels chosen
    handles = []
    try:
        for m in {id(m): m for m in [unet, *modules]}.values():
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        for k in range(calls):
            _replay(unet, captures[k % len(captures)])
    finally:
        for h in handles:
            h.remove()
    return total


def _params(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ------------------------------------------------------------------------------------- the verb


def check_settings(num_prompts: int, num_inference_steps: int, timesteps: int) -> None:
    """The checks analyze() makes before any work (the CLI runs them before loading a pipeline)."""
    if num_prompts < 1:
        raise ValueError("prompts is empty: pass at least one prompt")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if not isinstance(timesteps, int) or not 1 <= timesteps <= num_inference_steps:
        raise ValueError(f"timesteps must be an integer in [1, num_inference_steps={num_inference_steps}] "
                         f"(how many denoising steps are captured), got {timesteps!r}")


def analyze(pipe, prompts: list[str], num_inference_steps: int = 25, timesteps: int = 5,
            guidance_scale: float | None = None, seed: int = 0, progress: bool = True, *,
            batch_size: int = 8, latency_calls: int = 3, call_kwargs: dict | None = None) -> Analysis:
    """Bypass every resnet, attention, layer and the mid block of pipe.unet in turn; see the module doc.

    prompts run `batch_size` at a time (generator seeded seed + index of the chunk's first prompt);
    guidance_scale None keeps the pipeline's default; call_kwargs: other pipeline call arguments
    (image= for img2img, height/width ...). latency_calls: timed replays of the captured calls.
    The UNet is left exactly as it was (hooks detached, weights untouched, train/eval flags restored).
    """
    started = time.perf_counter()
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    check_settings(len(prompts), num_inference_steps, timesteps)
    for name, value in (("batch_size", batch_size), ("latency_calls", latency_calls)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    call_kwargs = dict(call_kwargs or {})
    clash = sorted(set(call_kwargs) & set(_OWN_CALL_ARGS))
    if clash:
        raise ValueError(f"call_kwargs may not set {clash}: analyze sets them (use its own arguments)")
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        found = type(unet).__name__ if unet is not None else "no pipe.unet"
        raise NotAUNetPipelineError(
            f"analyze needs a pipeline whose pipe.unet is a diffusers UNet2DConditionModel (SD 1.x/2.x, SDXL "
            f"and their variants); {type(pipe).__name__} has {found}")

    specs = _unit_specs(unet)
    modes = {m: m.training for m in unet.modules()}
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    had_bar_config = hasattr(pipe, "_progress_bar_config")
    try:
        unet.eval()
        if not progress:
            pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            captures = _capture(pipe, unet, prompts, num_inference_steps, timesteps, guidance_scale, seed,
                                batch_size, call_kwargs)
            changes = {}
            bypassable = [s for s in specs if s.parts]
            from tqdm.auto import tqdm

            for spec in tqdm(bypassable, desc="bypassing units", disable=not progress):
                changes[spec.name] = _bypassed_changes(unet, spec, captures)
            timed = [m for s in specs for m in s.timed]
            seconds = _module_times(unet, timed, captures, latency_calls)
    finally:
        for m, mode in modes.items():
            m.training = mode
        if had_bar_config:
            pipe._progress_bar_config = bar_config
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config

    steps = sorted({c.step for c in captures})
    step_timestep = {c.step: c.timestep for c in captures}
    total_params = _params([unet])
    unet_seconds = seconds[id(unet)]
    units = []
    for spec in specs:
        params = _params([m for m in {id(m): m for m in spec.timed}.values()])
        change = per_step = None
        if spec.name in changes:
            values = changes[spec.name]
            change = sum(values) / len(values)
            per_step = [_mean([v for v, c in zip(values, captures) if c.step == s]) for s in steps]
        latency = sum(seconds.get(id(m), 0.0) for m in spec.timed) / unet_seconds
        units.append(Unit(spec.name, spec.kind, params, params / total_params, latency, change, per_step))
    meta = dict(pipeline=type(pipe).__name__, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, captures=len(captures),
                latency_calls=latency_calls, total_params=total_params,
                device=str(next(unet.parameters()).device), dtype=str(unet.dtype).removeprefix("torch."),
                unet_call_s=unet_seconds / latency_calls, wall_s=time.perf_counter() - started)
    return Analysis(units=units, timesteps=[step_timestep[s] for s in steps], prompts=prompts, steps=steps,
                    meta=meta)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
