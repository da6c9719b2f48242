"""`--method` specs for `genfast compare`: a method with option sweeps, expanded into variants.

    feature_inheritance                                  one variant, the method's defaults
    feature_inheritance:interval=2,3,5                   three variants
    feature_inheritance:schedule=uniform,calibrated:interval=3,5    four (every combination)
    feature_inheritance:branch_units=attn1+attn2         a tuple-valued option ("+" joins items)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..api import method_config


@dataclass(frozen=True)
class Variant:
    """One thing to compare: a method with options, or the unaccelerated baseline (method None)."""

    method: str | None
    options: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        if self.method is None:
            return "baseline"
        if not self.options:
            return self.method
        return f"{self.method}({', '.join(f'{k}={_show(v)}' for k, v in self.options.items())})"

    @property
    def slug(self) -> str:
        """A file-system-safe name for the variant's image folder."""
        keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name)
        return "-".join(part for part in keep.split("-") if part)


BASELINE = Variant(None)


def _show(value) -> str:
    return "+".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_value(text: str):
    """Option values as typed on a command line: ints, floats, true/false, none, a+b tuples, else text."""
    if "+" in text:
        return tuple(parse_value(part) for part in text.split("+") if part)
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method_spec(spec: str) -> list[Variant]:
    """All variants one `--method` spec names, each validated as genfast.accelerate would."""
    method, *parts = spec.strip().split(":")
    if not method:
        raise ValueError(f"--method {spec!r} names no method; write e.g. feature_inheritance:interval=2,3,5")
    sweeps: dict[str, list] = {}
    for part in parts:
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--method {spec!r}: {part!r} is not key=value[,value...] "
                             f"(e.g. feature_inheritance:interval=2,3,5)")
        if key in sweeps:
            raise ValueError(f"--method {spec!r} gives option {key!r} twice; list its values once: {key}=a,b")
        sweeps[key] = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    variants = []
    for combo in itertools.product(*sweeps.values()):
        options = dict(zip(sweeps, combo))
        method_config(method, options)  # unknown method / option / bad value: fail before any work
        variants.append(Variant(method, options))
    return variants


def parse_method_specs(specs: list[str]) -> list[Variant]:
    variants: list[Variant] = []
    for spec in specs:
        for v in parse_method_spec(spec):
            if v.name in {u.name for u in variants}:
                raise ValueError(f"variant {v.name} is asked for twice; give each --method sweep once")
            variants.append(v)
    return variants
