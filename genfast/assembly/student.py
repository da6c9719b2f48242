"""Build a student UNet from a teacher and an AssemblyPlan, with the teacher's weights (BK-SDM's mapping).

Mapping (BK-SDM's `copy_weight_from_teacher`, arXiv 2305.15798): a student down stage keeps the
teacher's first layers; a student up stage keeps the teacher's first layers and its LAST one, whose
skip input carries the previous stage's channel count (so teacher up_blocks.1.attentions.2 ->
student up_blocks.1.attentions.1). Everything else (conv_in, time embedding, samplers, mid block,
norm and conv_out) is copied where present. A module is copied whole or not at all: when its shapes
differ from the teacher's (a stage whose input channels changed after a stage was dropped) it keeps
its fresh initialisation, and the report lists it. The teacher is never modified.

With `plan.condconv_experts` every student resnet conv becomes an ME-CondConv whose experts are
seeded from the removed layers' kernels (A-SDM's cross-layer inheritance; which kernel goes where is
our reading: the same stage's removed resnets first, the same conv name before the other, then the
removed mid block's and the dropped stages'; with condconv_inherit="fit" a kernel of another channel
count is cropped or zero-padded on (out, in), the kernel size must match). With `plan.gri_window`
every self-attention runs GRI attention (trainable).
Such students are `AssembledUNet2DConditionModel`s, whose folder also holds genfast_assembly.json
so that from_pretrained can rebuild those modules before loading the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D

from .condconv import convert_to_condconv
from .gri import install_gri
from .plan import AssemblyPlan, plan_preset, stage_map

# diffusers' pipeline loader finds a component's load method by looking its base classes up in the module
# model_index.json names (here this one), so ModelMixin must be an attribute of this module
_LOADABLE_BASE = ModelMixin

__all__ = ["ASSEMBLY_FILE", "AssembledUNet2DConditionModel", "assemble", "build_student", "load_student",
           "save_assembled", "stage_map"]

ASSEMBLY_FILE = "genfast_assembly.json"
_LAYER_LISTS = ("resnets", "attentions")  # lists whose entries are mapped by BK-SDM's rule
RESNET_CONVS = ("conv1", "conv2")


# --- which student unit comes from which teacher unit ----------------------------------------------
def _units(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Units that are copied whole: top-level modules, and each entry of a block's module lists."""
    units = {}
    for name, child in unet.named_children():
        if name in ("down_blocks", "up_blocks"):
            for b, block in enumerate(child):
                for part, sub in block.named_children():
                    if isinstance(sub, torch.nn.ModuleList):
                        units.update({f"{name}.{b}.{part}.{k}": m for k, m in enumerate(sub)})
                    else:
                        units[f"{name}.{b}.{part}"] = sub
        else:
            units[name] = child
    return {name: m for name, m in units.items() if next(iter(m.state_dict()), None) is not None}


def _list_len(unet, blocks: str, block: int, part: str) -> int:
    modules = getattr(unet, blocks)[block]
    return len(getattr(modules, part, None) or ())


def _source(name: str, teacher, student, stages: dict[str, dict[int, int]]) -> str | None:
    """The teacher unit a student unit inherits from (None: nothing corresponds)."""
    parts = name.split(".")
    if parts[0] not in ("down_blocks", "up_blocks"):
        return name
    blocks, s = parts[0], int(parts[1])
    t = stages["down" if blocks == "down_blocks" else "up"][s]
    if len(parts) == 4 and parts[2] in _LAYER_LISTS:
        j = int(parts[3])
        if blocks == "up_blocks":
            n_s, n_t = _list_len(student, blocks, s, parts[2]), _list_len(teacher, blocks, t, parts[2])
            if j == n_s - 1:  # the last layer takes the other stage's skip: its teacher twin is the last one
                j = n_t - 1
        return f"{blocks}.{t}.{parts[2]}.{j}"
    return ".".join([blocks, str(t), *parts[2:]])


def _fits(student_sd: dict, teacher_sd: dict) -> str | None:
    """Why the student unit cannot take the teacher unit's weights (None: it can)."""
    for key, value in student_sd.items():
        if key not in teacher_sd:
            return f"teacher has no {key}"
        if teacher_sd[key].shape != value.shape:
            return f"{key}: teacher {tuple(teacher_sd[key].shape)} vs student {tuple(value.shape)}"
    return None


def _copy_weights(teacher, student, stages) -> dict[str, Any]:
    t_units, s_units = _units(teacher), _units(student)
    copied, fresh, truncated = {}, {}, {}
    for name, module in s_units.items():
        src = _source(name, teacher, student, stages)
        if src not in t_units:
            fresh[name] = "the teacher has no such module"
            continue
        t_sd, s_sd = t_units[src].state_dict(), module.state_dict()
        why = _fits(s_sd, t_sd)
        if why is not None:
            fresh[name] = f"{src}: {why}"
            continue
        module.load_state_dict({k: t_sd[k] for k in s_sd}, strict=True)  # copies: the teacher's tensors stay its own
        copied[name] = src
        extra = sorted(set(t_sd) - set(s_sd))
        if extra:  # e.g. a shallower transformer: the first blocks are the teacher's, the rest removed
            truncated[name] = f"{len(extra)} teacher tensors left out (e.g. {extra[0]})"
    used = set(copied.values())
    removed = [name for name in t_units if name not in used]
    return dict(copied=copied, fresh=fresh, truncated=truncated, removed=removed)


# --- ME-CondConv experts from the removed kernels --------------------------------------------------
def _resnet_convs(unet, unit_names) -> dict[str, torch.nn.Conv2d]:
    """conv1/conv2 of every resnet inside the named units (a resnet, or a whole removed mid block)."""
    out = {}
    for unit in unit_names:
        for sub, module in unet.get_submodule(unit).named_modules():
            if isinstance(module, ResnetBlock2D):
                name = f"{unit}.{sub}" if sub else unit
                out.update({f"{name}.{conv}": getattr(module, conv) for conv in RESNET_CONVS
                            if isinstance(getattr(module, conv, None), torch.nn.Conv2d)})
    return out


def _fit(kernel: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Crop or zero-pad a kernel on (out, in) to `shape`: our reading of inheriting across channel counts."""
    out = kernel.new_zeros(shape)
    o, i = min(shape[0], kernel.shape[0]), min(shape[1], kernel.shape[1])
    out[:o, :i] = kernel[:o, :i]
    return out


def _stage_of(name: str) -> tuple[str, int] | None:
    parts = name.split(".")
    return (parts[0], int(parts[1])) if parts[0] in ("down_blocks", "up_blocks") else None


def _choose_experts(teacher, student, plan: AssemblyPlan, weights: dict, stages) -> dict[str, list]:
    """For each student resnet conv, up to K removed teacher kernels: same stage (same conv name first),
    then the removed mid block and dropped stages; exact shapes before fitted ones ("fit")."""
    removed = _resnet_convs(teacher, weights["removed"])
    kept_down, kept_up = set(stages["down"].values()), set(stages["up"].values())

    def elsewhere(name):  # the removed mid block, the dropped stages
        stage = _stage_of(name)
        return stage is None or stage[1] not in (kept_down if stage[0] == "down_blocks" else kept_up)

    pool = [n for n in removed if elsewhere(n)]
    chosen = {}
    for name, conv in _resnet_convs(student, _units(student)).items():
        stage, conv_name = _stage_of(name), name.rsplit(".", 1)[1]
        same = []
        if stage is not None:
            t_stage = (stage[0], stages["down" if stage[0] == "down_blocks" else "up"][stage[1]])
            same = [n for n in removed if _stage_of(n) == t_stage]
            same.sort(key=lambda n: n.rsplit(".", 1)[1] != conv_name)  # stable: same conv name first
        candidates = same + pool
        shape = conv.weight.shape
        exact = [n for n in candidates if removed[n].weight.shape == shape]
        fitted = []
        if plan.condconv_inherit == "fit":
            fitted = [n for n in candidates if removed[n].weight.shape != shape
                      and removed[n].weight.shape[2:] == shape[2:]]
        picks = [(n, "exact") for n in exact] + [(n, "fit") for n in fitted]
        chosen[name] = picks[: plan.condconv_experts]
    return {name: [(src, how, removed[src].weight) for src, how in picks] for name, picks in chosen.items()}


def _install_condconv(student, plan: AssemblyPlan, experts: dict[str, list] | None) -> None:
    """Swap every resnet conv for an ME-CondConv (experts: inherited kernels; None: left to from_conv, as
    when the weights are about to be loaded)."""
    kernels = {}
    with torch.no_grad():
        for name, conv in _resnet_convs(student, _units(student)).items():
            kernels[name] = [(_fit(w, conv.weight.shape) if how == "fit" else w).detach().clone().to(conv.weight)
                             for _, how, w in (experts or {}).get(name, [])]
    convert_to_condconv(student, kernels, plan.condconv_experts)


def _apply_genfast_modules(student, plan: AssemblyPlan, experts: dict[str, list] | None) -> None:
    if plan.condconv_experts:
        _install_condconv(student, plan, experts)
    if plan.gri_window:
        install_gri(student, plan.gri_window, plan.gri_pooled, trainable=True)


# --- the student ------------------------------------------------------------------------------------
class AssembledUNet2DConditionModel(UNet2DConditionModel):
    """A student with ME-CondConv and/or GRI attention: a UNet2DConditionModel whose folder also holds
    genfast_assembly.json (the plan), from which from_pretrained rebuilds those modules before it
    loads every weight strictly. Pipelines load it through model_index.json
    (unet = ["genfast.assembly.student", "AssembledUNet2DConditionModel"])."""

    genfast_plan: AssemblyPlan

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        _write_assembly_file(Path(save_directory), self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, torch_dtype=None,
                        **kwargs):
        _check_loading_kwargs(kwargs)
        torch_dtype = torch_dtype if torch_dtype is not None else kwargs.get("dtype")
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no UNet at {folder}: expected config.json (assembled students load from "
                                    f"local folders only)")
        info = _read_assembly_file(folder)
        plan = AssemblyPlan.from_dict(info["plan"])  # validated before anything is built
        model = cls.from_config(cls.load_config(folder))
        _apply_genfast_modules(model, plan, experts=None)
        missing, unexpected = model.load_state_dict(_read_weights(folder), strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: the weights do not match the assembled student its plan describes "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        _attach(model, info)
        model.eval()
        return model.to(torch_dtype) if torch_dtype is not None else model


# diffusers' pipeline loader passes these to every model's from_pretrained; any other value than the
# default asks for something (device maps, offloading, variants, quantization) this loader does not do
_BENIGN = {"device_map": (None,), "max_memory": (None,), "offload_folder": (None,), "offload_state_dict": (None, False),
           "variant": (None,), "use_safetensors": (None, True), "use_flashpack": (None, False),
           "quantization_config": (None,), "low_cpu_mem_usage": None, "disable_mmap": None, "dtype": None,
           "local_files_only": None, "cache_dir": None}


def _check_loading_kwargs(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key not in _BENIGN:
            raise ValueError(f"AssembledUNet2DConditionModel.from_pretrained does not take {key!r}; it loads a local "
                             f"folder with optional subfolder= and torch_dtype=")
        allowed = _BENIGN[key]
        if allowed is not None and value not in allowed:
            raise ValueError(f"AssembledUNet2DConditionModel.from_pretrained: {key}={value!r} is not supported "
                             f"(allowed: {allowed}); load it, then move or convert it")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:  # a sharded save: the index names the shards
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        files = [folder / name for name in names]
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def _write_assembly_file(folder: Path, unet) -> None:
    from ..io import atomic_write_text

    plan = getattr(unet, "genfast_plan", None)
    if plan is None:
        raise ValueError("this UNet carries no assembly plan (genfast_plan); build it with build_student/assemble")
    info = {"plan": plan.to_dict(), "report": getattr(unet, "genfast_report", None)}
    atomic_write_text(folder / ASSEMBLY_FILE, json.dumps(info, indent=2) + "\n")


def _attach(unet, info: dict) -> None:
    """Put a loaded student's plan, report and stage map (genfast_assembly.json) back on it."""
    unet.genfast_plan = AssemblyPlan.from_dict(info["plan"])
    unet.genfast_report = info.get("report")
    stages = (unet.genfast_report or {}).get("stage_map")
    unet.genfast_stage_map = stages and {k: {int(s): t for s, t in v.items()} for k, v in stages.items()}


def _read_assembly_file(folder: Path) -> dict:
    path = folder / ASSEMBLY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an assembled student's folder holds its plan there "
                                f"(written by save_pretrained / genfast.assembly.student.save_assembled)")
    return json.loads(path.read_text())


def build_student(teacher_unet: UNet2DConditionModel, plan: AssemblyPlan):
    """(student, report): the student `plan` makes of `teacher_unet`, in the teacher's dtype and device.

    report: "copied" {student unit: teacher unit}, "fresh" {student unit: why it kept its init},
    "truncated" (copied from a deeper teacher unit), "removed" (teacher units no student unit took),
    "experts" {student conv: [[teacher conv, "exact"|"fit"], ...]}, "stage_map", "params".
    """
    if not isinstance(teacher_unet, UNet2DConditionModel):
        raise TypeError(f"build_student takes a diffusers UNet2DConditionModel, got {type(teacher_unet).__name__}")
    if not isinstance(plan, AssemblyPlan):
        raise TypeError(f"plan must be an AssemblyPlan, got {type(plan).__name__}")
    if getattr(teacher_unet, "genfast_plan", None) is not None and teacher_unet.genfast_plan.needs_genfast_class:
        raise ValueError("the teacher is itself an assembled student with ME-CondConv/GRI; assemble from a plain UNet")
    config = plan.student_config(teacher_unet.config)
    stages = stage_map(teacher_unet.config, plan)
    cls = AssembledUNet2DConditionModel if plan.needs_genfast_class else UNet2DConditionModel
    param = next(teacher_unet.parameters())
    with torch.no_grad():
        student = cls.from_config(config)  # float32 on the CPU: the fresh init is the default one
        weights = _copy_weights(teacher_unet, student, stages)
        experts = _choose_experts(teacher_unet, student, plan, weights, stages) if plan.condconv_experts else None
        _apply_genfast_modules(student, plan, experts)
    student.to(param.device)
    if param.dtype != torch.float32:  # ModelMixin.to warns about any dtype given, even float32
        student.to(param.dtype)
    student.eval()
    report = {
        "plan": plan.to_dict(),
        "stage_map": {k: {str(s): t for s, t in v.items()} for k, v in stages.items()},
        **weights,
        "experts": {name: [[src, how] for src, how, _ in picks] for name, picks in (experts or {}).items()},
        "params": {"teacher": sum(p.numel() for p in teacher_unet.parameters()),
                   "student": sum(p.numel() for p in student.parameters())},
    }
    student.genfast_plan = plan
    student.genfast_stage_map = stages
    student.genfast_report = report
    return student, report


# --- pipelines ----------------------------------------------------------------------------------------
def load_student(path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """A student UNet from a UNet folder or a pipeline folder (its unet/), plain or assembled."""
    path = Path(path)
    folder = path / "unet" if (path / "model_index.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no UNet at {path}: give a UNet folder (config.json) or a pipeline folder "
                                f"(model_index.json + unet/)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") == AssembledUNet2DConditionModel.__name__:
        return AssembledUNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True).eval()
    if (folder / ASSEMBLY_FILE).is_file():
        _attach(unet, _read_assembly_file(folder))
    return unet


def _resolve_plan(pipe, preset, plan, target_latency, prompts) -> AssemblyPlan:
    given = [name for name, v in (("preset", preset), ("plan", plan)) if v is not None]
    if len(given) > 1:
        raise ValueError("give exactly one of preset= and plan=")
    if plan is not None:
        if target_latency is not None:
            raise ValueError("target_latency is only used with preset='auto' (or alone); it has no effect with plan=")
        return plan if isinstance(plan, AssemblyPlan) else AssemblyPlan.from_dict(plan)
    if preset is None and target_latency is None:
        raise ValueError("give one of preset= ('bk-base', 'bk-small', 'bk-tiny', 'auto'), plan= or target_latency=")
    if preset in (None, "auto"):
        if target_latency is None:
            raise ValueError("preset='auto' needs target_latency= (the student's latency as a fraction of the "
                             "teacher's, in (0, 1))")
        from .analyze import analyze
        from .plan import auto_plan

        analysis = analyze(pipe, prompts or _default_prompts())
        return auto_plan(analysis, pipe.unet.config, target_latency)
    if target_latency is not None:
        raise ValueError(f"target_latency has no effect with preset={preset!r}; use preset='auto'")
    if prompts is not None:
        raise ValueError(f"prompts has no effect with preset={preset!r}; they feed the analysis of preset='auto'")
    return plan_preset(preset, pipe.unet.config)


def _default_prompts() -> list[str]:
    from ..cli import DEFAULT_PROMPTS

    return list(DEFAULT_PROMPTS)


def assemble(pipe, preset: str | None = None, plan: AssemblyPlan | dict | None = None,
             target_latency: float | None = None, prompts: list[str] | None = None):
    """A new pipeline of the same class whose unet is the student; every other component is the same
    object, and the teacher is untouched. Give exactly one of preset ("bk-base", "bk-small",
    "bk-tiny", or "auto" with target_latency), plan, or target_latency (= preset "auto")."""
    teacher = getattr(pipe, "unet", None)
    if not isinstance(teacher, UNet2DConditionModel):
        raise ValueError(f"assemble needs a pipeline with a UNet2DConditionModel as .unet; "  # noqa: TRY004
                         f"{type(pipe).__name__} has {type(teacher).__name__}")
    resolved = _resolve_plan(pipe, preset, plan, target_latency, prompts)
    student, _ = build_student(teacher, resolved)
    return type(pipe)(**{**pipe.components, "unet": student})


def save_assembled(pipe, out_dir: str | os.PathLike) -> Path:
    """Write an assembled pipeline folder atomically; unet/genfast_assembly.json holds the plan and the
    inheritance report (for plain students too, where diffusers ignores it)."""
    from ..io import atomic_dir

    unet = pipe.unet
    if getattr(unet, "genfast_plan", None) is None:
        raise ValueError("this pipeline's unet is not an assembled student (no genfast_plan); make one with "
                         "genfast.assemble")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
        if not isinstance(unet, AssembledUNet2DConditionModel):
            _write_assembly_file(tmp / "unet", unet)
    return out
