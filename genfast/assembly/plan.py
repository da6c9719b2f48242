"""Assembly plans: which parts of a teacher UNet the student keeps, as a validated, JSON-able dataclass.

A plan is applied to a teacher's diffusers config (`plan.student_config(teacher_config)`) to get the
student's config; `student.build_student` then builds that student and copies the teacher's weights
into it (BK-SDM's mapping). Presets follow BK-SDM (arXiv 2305.15798):

- bk-base: one resnet+attention pair per down stage (two per up stage: diffusers builds layers+1).
- bk-small: bk-base without the mid block.
- bk-tiny: bk-small without the innermost stage (its down block and the first up block).

For SDXL-shaped teachers (a stage with a transformer deeper than 1) bk-tiny is our reading of KOALA
(arXiv 2312.04005, "[0,2,10] -> [0,2,5]"): the innermost stage stays and its transformer depth is
halved; dropping SDXL's innermost stage would throw away its whole 10-deep text-conditioned stage.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

PRESETS = ("bk-base", "bk-small", "bk-tiny")
INHERIT_MODES = ("exact", "fit")
MAX_EXPERTS = 16  # more experts than any teacher has removed kernels for one conv is only noise
# config keys holding one entry per down stage (lists only; an int applies to every stage)
_PER_DOWN_STAGE = ("block_out_channels", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
                   "only_cross_attention", "layers_per_block", "transformer_layers_per_block")
# keys that define the student's structure, compared to see whether a plan changes anything
_STRUCTURE = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
              "transformer_layers_per_block", "reverse_transformer_layers_per_block", "mid_block_type")


# a stage type and the same stage without its transformer blocks (resnets and samplers unchanged)
_WITHOUT_ATTENTION = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}


def _int_tuple(name: str, value, low: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, str)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be None or a non-empty tuple of ints >= {low} (one per down stage), "
                         f"got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must hold ints >= {low} (one per down stage), got {value!r}")
        out.append(v)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class AssemblyPlan:
    """What the student keeps of its teacher.

    layers_per_block: per (student) down stage, in 1..the teacher's count; None keeps the teacher's.
    mid_block: False removes the mid block (BK-small).
    drop_stages: how many innermost stages are removed (BK-tiny: 1); >= 1 stage must remain.
    transformer_layers_per_block: per (student) down stage, in 1..the teacher's depth (KOALA-style);
        None keeps the teacher's. Up stages follow as diffusers mirrors them.
    condconv_experts: > 0 turns every student resnet conv into an ME-CondConv with this many experts
        (0..16), seeded from the removed layers' kernels.
    condconv_inherit: "exact" seeds experts only with same-shape removed kernels; "fit" also crops or
        zero-pads kernels of other channel counts (only with condconv_experts).
    down_attention / up_attention: per (student) down / up stage, False removes that stage's
        transformer blocks (CrossAttnDownBlock2D -> DownBlock2D, CrossAttnUpBlock2D -> UpBlock2D);
        None keeps them all. On a small UNet attention is most of the latency (see analyze).
    gri_window: > 0 puts GRI attention with this window on every self-attention.
    gri_pooled: side of GRI's pooled global summary, >= 1 (only with gri_window).
    """

    layers_per_block: tuple[int, ...] | None = None
    mid_block: bool = True
    drop_stages: int = 0
    transformer_layers_per_block: tuple[int, ...] | None = None
    condconv_experts: int = 0
    condconv_inherit: str = "fit"
    gri_window: int = 0
    gri_pooled: int = 4
    down_attention: tuple[bool, ...] | None = None
    up_attention: tuple[bool, ...] | None = None

    def __post_init__(self):
        def set_(name, value):  # frozen: normalise lists to tuples in place
            object.__setattr__(self, name, value)

        set_("layers_per_block", _int_tuple("layers_per_block", self.layers_per_block, 1))
        set_("transformer_layers_per_block",
             _int_tuple("transformer_layers_per_block", self.transformer_layers_per_block, 1))
        for name in ("down_attention", "up_attention"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bool)) or not isinstance(value, Sequence) or not value or not all(
                        isinstance(v, bool) for v in value):
                    raise ValueError(f"{name} must be None or a non-empty tuple of True/False (one per student "
                                     f"stage; False removes its attention), got {value!r}")
                set_(name, tuple(value))
        if not isinstance(self.mid_block, bool):
            raise ValueError(f"mid_block must be True or False, got {self.mid_block!r}")  # noqa: TRY004 -- config errors are ValueErrors
        for name, low, high in (("drop_stages", 0, None), ("condconv_experts", 0, MAX_EXPERTS),
                                ("gri_window", 0, None), ("gri_pooled", 1, None)):
            value = getattr(self, name)
            bad = isinstance(value, bool) or not isinstance(value, int) or value < low
            if bad or (high is not None and value > high):
                allowed = f"an int in {low}..{high}" if high is not None else f"an int >= {low}"
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        if self.condconv_inherit not in INHERIT_MODES:
            raise ValueError(f"condconv_inherit must be one of {INHERIT_MODES}, got {self.condconv_inherit!r}")
        if self.condconv_experts == 0 and self.condconv_inherit != "fit":
            raise ValueError("condconv_inherit has no effect with condconv_experts=0; set condconv_experts >= 1 "
                             "or leave condconv_inherit at its default")
        if self.gri_window == 0 and self.gri_pooled != 4:
            raise ValueError("gri_pooled has no effect with gri_window=0; set gri_window >= 1 or leave gri_pooled "
                             "at its default")

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("layers_per_block", "transformer_layers_per_block", "down_attention", "up_attention"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssemblyPlan:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown assembly plan fields {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    @property
    def needs_genfast_class(self) -> bool:
        """True when the student has modules diffusers cannot rebuild from its config alone."""
        return self.condconv_experts > 0 or self.gri_window > 0

    # --- applying it --------------------------------------------------------------------------------
    def student_config(self, teacher_config: Mapping[str, Any]) -> dict[str, Any]:
        """The diffusers config of the student this plan makes of a teacher with `teacher_config`.

        Raises ValueError when the plan does not fit the teacher (a stage count or a layer count out of
        range) or when it changes nothing.
        """
        t = _Teacher(teacher_config)
        n, drop = t.stages, self.drop_stages
        if drop > n - 1:
            raise ValueError(f"drop_stages must be in 0..{n - 1} for this teacher ({n} stages; one must remain), "
                             f"got {drop}")
        if t.nested_transformer_layers:
            raise ValueError("this teacher gives transformer_layers_per_block per layer (a tuple of tuples); "
                             "assembly plans support one transformer depth per stage")
        kept = n - drop
        lpb = self._per_stage("layers_per_block", self.layers_per_block, t.layers_per_block[:kept])
        tlpb = self._per_stage("transformer_layers_per_block", self.transformer_layers_per_block,
                               t.transformer_layers_per_block[:kept])
        for i, depth in enumerate(tlpb):
            if not t.has_attention(i) and depth != t.transformer_layers_per_block[i]:
                raise ValueError(f"transformer_layers_per_block[{i}]: down stage {i} ({t.down_types[i]}) has no "
                                 f"transformer, so its value has no effect; give the teacher's "
                                 f"{t.transformer_layers_per_block[i]}")
        # private keys are metadata of the teacher's file; "_use_default_values" would even make
        # from_config put back the defaults of the keys it names (mid_block_type among them)
        cfg = copy.deepcopy({k: v for k, v in dict(t.config).items() if not k.startswith("_")})
        for key in _PER_DOWN_STAGE:
            if isinstance(cfg.get(key), (list, tuple)):
                cfg[key] = list(cfg[key])[:kept]
        cfg["down_block_types"] = list(t.down_types[:kept])
        cfg["up_block_types"] = list(t.up_types[drop:])
        cfg["layers_per_block"] = _compact(lpb)
        cfg["transformer_layers_per_block"] = _compact(tlpb)
        if cfg.get("reverse_transformer_layers_per_block") is not None:
            cfg["reverse_transformer_layers_per_block"] = list(cfg["reverse_transformer_layers_per_block"])[drop:]
        for name, flags, types in (("down_attention", self.down_attention, cfg["down_block_types"]),
                                   ("up_attention", self.up_attention, cfg["up_block_types"])):
            self._drop_attention(name, flags, types)
        if not self.mid_block:
            cfg["mid_block_type"] = None
        if all(_same(cfg.get(k), t.config.get(k)) for k in _STRUCTURE):
            raise ValueError(f"this plan changes nothing for this teacher ({t.describe()}): it removes no layer, "
                             f"stage, transformer block or mid block. {t.suggestion()}")
        return cfg

    @staticmethod
    def _drop_attention(name: str, flags, types: list[str]) -> None:
        if flags is None:
            return
        if len(flags) != len(types):
            raise ValueError(f"{name} needs one value per student stage ({len(types)} here), got {flags!r}")
        for i, keep in enumerate(flags):
            if keep:
                continue
            if types[i] not in _WITHOUT_ATTENTION:
                raise ValueError(f"{name}[{i}]: the stage is a {types[i]}, which has no transformer blocks this plan "
                                 f"can remove (supported: {', '.join(_WITHOUT_ATTENTION)}); set it to True")
            types[i] = _WITHOUT_ATTENTION[types[i]]

    def _per_stage(self, name: str, value, teacher: list[int]) -> list[int]:
        if value is None:
            return list(teacher)
        if len(value) != len(teacher):
            raise ValueError(f"{name} needs one value per student down stage ({len(teacher)} here), got {value!r}")
        for i, (v, most) in enumerate(zip(value, teacher, strict=True)):
            if v > most:
                raise ValueError(f"{name}[{i}] must be in 1..{most} (the teacher's; a student only removes), got {v}")
        return list(value)


def _compact(values: list[int]):
    """An int when every stage has the same value (how most configs spell it), else the list."""
    return values[0] if len(set(values)) == 1 else list(values)


def _same(a, b) -> bool:
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    return norm(a) == norm(b)


class _Teacher:
    """A teacher config read the way diffusers reads it: per-stage lists for the int shorthands."""

    def __init__(self, config: Mapping[str, Any]):
        if hasattr(config, "config") and not isinstance(config, Mapping):  # a model
            config = config.config
        self.config = config
        try:
            self.down_types = list(config["down_block_types"])
            self.up_types = list(config["up_block_types"])
        except KeyError as err:
            raise ValueError(f"not a UNet2DConditionModel config: it has no {err.args[0]!r}") from None
        self.stages = len(self.down_types)
        self.layers_per_block = self._list(config.get("layers_per_block", 2))
        tlpb = config.get("transformer_layers_per_block", 1)
        self.nested_transformer_layers = isinstance(tlpb, (list, tuple)) and any(
            isinstance(v, (list, tuple)) for v in tlpb)
        self.transformer_layers_per_block = [0] * self.stages if self.nested_transformer_layers else self._list(tlpb)
        self.mid_block_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")

    def _list(self, value) -> list[int]:
        return [value] * self.stages if isinstance(value, int) else list(value)

    def has_attention(self, stage: int) -> bool:
        return "CrossAttn" in self.down_types[stage] or "Attn" in self.down_types[stage]

    @property
    def sdxl_shaped(self) -> bool:
        """A stage with a transformer deeper than 1 (SDXL: 2 and 10)."""
        return any(d > 1 for i, d in enumerate(self.transformer_layers_per_block) if self.has_attention(i))

    def describe(self) -> str:
        return (f"{self.stages} stages, layers_per_block {_compact(self.layers_per_block)}, transformer depth "
                f"{_compact(self.transformer_layers_per_block)}, mid block {self.mid_block_type}")

    def suggestion(self) -> str:
        if self.mid_block_type is not None:
            return "Remove the mid block (preset bk-small, mid_block=False) or a stage (bk-tiny)."
        if self.stages > 1:
            return "Drop the innermost stage (preset bk-tiny, drop_stages=1)."
        return "There is nothing left to remove."


def plan_preset(name: str, unet_config: Mapping[str, Any]) -> AssemblyPlan:
    """BK-SDM's presets ("bk-base", "bk-small", "bk-tiny") for this teacher's shape (SD 1.x/2.x or SDXL).

    The plan is checked against the teacher: a preset that would change nothing is an error that
    names a preset that does (bk-base on a teacher with one layer per stage -> bk-small).
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS} (or 'auto' through assemble(target_latency=...)), "
                         f"got {name!r}")
    t = _Teacher(unet_config)
    if name == "bk-base" and max(t.layers_per_block) == 1:
        raise ValueError(f"bk-base changes nothing for this teacher: it already has layers_per_block=1 "
                         f"({t.describe()}); use bk-small (also drops the mid block) or bk-tiny")
    if name == "bk-small" and max(t.layers_per_block) == 1 and t.mid_block_type is None:
        raise ValueError(f"bk-small changes nothing for this teacher ({t.describe()}); use bk-tiny")
    ones = (1,) * t.stages
    if name == "bk-base":
        plan = AssemblyPlan(layers_per_block=ones)
    elif name == "bk-small":
        plan = AssemblyPlan(layers_per_block=ones, mid_block=False)
    elif t.sdxl_shaped:  # KOALA-style: halve the deepest transformer instead of dropping its stage
        depths = list(t.transformer_layers_per_block)
        deepest = max((i for i in range(t.stages) if t.has_attention(i)), key=lambda i: (depths[i], i))
        depths[deepest] = max(1, math.ceil(depths[deepest] / 2))
        plan = AssemblyPlan(layers_per_block=ones, mid_block=False, transformer_layers_per_block=tuple(depths))
    else:
        if t.stages < 2:
            raise ValueError("bk-tiny drops the innermost stage, but this teacher has only one; use bk-small")
        plan = AssemblyPlan(layers_per_block=ones[:-1], mid_block=False, drop_stages=1)
    plan.student_config(t.config)  # fits and changes something
    return plan


def stage_map(teacher_config: Mapping[str, Any], student: Mapping[str, Any] | AssemblyPlan) -> dict[str, dict[int, int]]:
    """Which teacher stage each student stage came from: {"down": {s: t}, "up": {s: t}}.

    drop_stages removes the innermost stages: the student's down i is the teacher's down i, its up i
    the teacher's up i + drop.
    """
    n = _Teacher(teacher_config).stages
    if isinstance(student, AssemblyPlan):
        drop = student.drop_stages
    else:
        student = student.config if hasattr(student, "config") and not isinstance(student, Mapping) else student
        drop = n - len(student["down_block_types"])
    if not 0 <= drop < n:
        raise ValueError(f"the student has {n - drop} stages; a student of this teacher has 1..{n}")
    return {"down": {i: i for i in range(n - drop)}, "up": {i: i + drop for i in range(n - drop)}}


def param_count(unet_config: Mapping[str, Any]) -> int:
    """Parameters of the UNet2DConditionModel a config describes, counted without allocating them."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        model = UNet2DConditionModel.from_config(dict(unet_config))
    return sum(p.numel() for p in model.parameters())


def _share(analysis, name: str) -> tuple[float, float | None] | None:
    try:
        unit = analysis.unit(name)
    except KeyError:
        return None
    return unit.latency_share, unit.output_change


def auto_plan(analysis, unet_config: Mapping[str, Any], target_latency: float) -> AssemblyPlan:
    """The plan whose predicted UNet latency (1 - the removed units' latency shares) is <= target_latency.

    Greedy over the removals a student built from diffusers blocks can express: the mid block, the
    innermost stage (its down block and the matching up block), the last kept layer of a down stage
    together with the up layer mirroring it, and the transformer blocks of one down or up stage. Each
    round takes the candidate with the lowest output change per latency saved; a group's change is the
    sum of its units' (treating bypass changes as additive, as LAPTOP-Diff does).
    """
    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float)) or not 0 < target_latency < 1:
        raise ValueError(f"target_latency must be a fraction of the teacher's latency in (0, 1), got {target_latency!r}")
    t = _Teacher(unet_config)
    n = t.stages
    lpb = list(t.layers_per_block)
    mid = t.mid_block_type is not None
    drop = 0
    ratio = 1.0
    attention_off: set[str] = set()  # "down_blocks.i" / "up_blocks.j" (teacher indices) without transformers
    removed_share: dict[str, float] = {}  # latency already taken out of a stage, by stage name

    def has_attention(stage: str) -> bool:
        blocks, i = stage.split(".")
        types = t.down_types if blocks == "down_blocks" else t.up_types
        return types[int(i)] in _WITHOUT_ATTENTION and stage not in attention_off

    def unit(stage: str, j: int) -> tuple[float, float]:
        """(latency share, output change) of layer j of a stage as the student has it now."""
        names = [f"{stage}.layers.{j}", f"{stage}.resnets.{j}"][0 if has_attention(stage) else 1:]
        for name in names:
            found = _share(analysis, name)
            if found is not None and found[1] is not None:
                return found
        raise ValueError(f"the analysis has no bypass measurement for {stage} layer {j}: it was made on another "
                         f"UNet than this config describes; rerun genfast.assembly.analyze on this one")

    def attentions(stage: str, count: int) -> tuple[float, float]:
        found = [_share(analysis, f"{stage}.attentions.{j}") for j in range(count)]
        if any(f is None or f[1] is None for f in found):
            raise ValueError(f"the analysis has no bypass measurement for the attentions of {stage}: it was made "
                             f"on another UNet; rerun genfast.assembly.analyze on this one")
        return sum(f[0] for f in found), sum(f[1] for f in found)

    def take(stage: str, share: float) -> None:
        removed_share[stage] = removed_share.get(stage, 0.0) + share

    while ratio > target_latency:
        candidates = []  # ((share saved, change), action)
        if mid:
            found = _share(analysis, "mid_block")
            if found is None or found[1] is None:
                raise ValueError("the analysis has no mid_block measurement, but the UNet has a mid block: it was "
                                 "made on another UNet; rerun genfast.assembly.analyze on this one")
            candidates.append((found, ("mid",)))
        if n - drop > 1:
            i = n - 1 - drop
            pair = (f"down_blocks.{i}", f"up_blocks.{n - 1 - i}")
            shares = [_share(analysis, stage) for stage in pair]
            if None in shares:
                raise ValueError(f"the analysis has no stage measurement for {pair[0]}/{pair[1]}: "
                                 f"it was made on another UNet; rerun genfast.assembly.analyze on this one")
            share = sum(s for s, _ in shares) - sum(removed_share.get(stage, 0.0) for stage in pair)
            # an up stage has one layer more than its down stage (diffusers builds layers + 1)
            change = sum(unit(pair[0], j)[1] for j in range(lpb[i])) + sum(unit(pair[1], j)[1] for j in range(lpb[i] + 1))
            candidates.append(((share, change), ("stage", i)))
        for i in range(n - drop):
            down, up = f"down_blocks.{i}", f"up_blocks.{n - 1 - i}"
            if lpb[i] > 1:
                (sd, cd), (su, cu) = unit(down, lpb[i] - 1), unit(up, lpb[i] - 1)
                candidates.append(((sd + su, cd + cu), ("layer", i)))
            for stage, count in ((down, lpb[i]), (up, lpb[i] + 1)):
                if has_attention(stage):
                    candidates.append((attentions(stage, count), ("attention", stage)))
        scored = [(change / share, share, action) for (share, change), action in candidates if share > 0]
        if not scored:
            raise ValueError(f"target_latency {target_latency} is out of reach from this analysis: removing every "
                             f"removable unit predicts {ratio:.3f} of the teacher's latency")
        _, share, action = min(scored, key=lambda c: (c[0], -c[1]))
        ratio -= share
        if action[0] == "mid":
            mid = False
        elif action[0] == "stage":
            drop += 1
        elif action[0] == "attention":
            attention_off.add(action[1])
            take(action[1], share)
        else:
            i = action[1]
            down, up = f"down_blocks.{i}", f"up_blocks.{n - 1 - i}"
            take(down, unit(down, lpb[i] - 1)[0])
            take(up, unit(up, lpb[i] - 1)[0])
            lpb[i] -= 1
    kept = n - drop

    def flags(blocks: str, stages) -> tuple[bool, ...] | None:
        out = tuple(f"{blocks}.{k}" not in attention_off for k in stages)
        return None if all(out) else out

    return AssemblyPlan(layers_per_block=tuple(lpb[:kept]), mid_block=mid or t.mid_block_type is None,
                        drop_stages=drop, down_attention=flags("down_blocks", range(kept)),
                        up_attention=flags("up_blocks", range(drop, n)))
