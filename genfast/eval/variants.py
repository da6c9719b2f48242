"""What `genfast compare` compares: variants of the baseline pipeline, each a recipe.

A variant is one of three kinds, all measured the same way and shown in the same report:

* a registered method with options (`--method`), any verb's (accelerate, quantize ...)::

    feature_inheritance                                  one variant, the method's defaults
    feature_inheritance:interval=2,3,5                   three variants (a sweep)
    feature_inheritance:schedule=uniform,calibrated:interval=3,5    four (every combination)
    feature_inheritance:branch_units=attn1+attn2         a tuple-valued option ("+" joins items)

* a chain of methods (`--method a:k=v+b:k=v`), applied left to right on the baseline pipeline
  and removed right to left. A "+" followed by a registered method's name (or by a name with
  options, `name:...`) starts the next method; any other "+" joins a tuple value. Sweeps inside
  a chain expand as the product::

    quantize:weights=int8+feature_inheritance:interval=2,3     two chains

* a pipeline folder on disk (`--pipeline-variant DIR`): an assembled model saved with save_pretrained
  or a quantized one saved with genfast.save_quantized (read by genfast.load_pipeline), loaded like
  the baseline and run on the same prompts and seeds.

Every spec is validated (unknown method or option, bad value, an option with no effect) before
anything is loaded, and two variants that would do the same work are refused.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..api import list_methods, method_config


@dataclass(frozen=True)
class Step:
    """One method of a recipe with its options (as typed; validated when parsed)."""

    method: str
    options: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        if not self.options:
            return self.method
        return f"{self.method}({', '.join(f'{k}={_show(v)}' for k, v in self.options.items())})"

    def config(self):
        return method_config(self.method, dict(self.options))


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: methods applied to the baseline pipeline (`steps`, left to right),
    a pipeline folder on disk (`folder`), or, with neither, the baseline itself."""

    steps: tuple[Step, ...] = ()
    folder: str | None = None

    def __post_init__(self):
        if self.steps and self.folder is not None:
            raise ValueError("a variant is either methods on the baseline pipeline or a pipeline folder, not both")

    @property
    def kind(self) -> str:
        if self.folder is not None:
            return "pipeline"
        return {0: "baseline", 1: "method"}.get(len(self.steps), "chain")

    @property
    def name(self) -> str:
        if self.folder is not None:
            return f"pipeline({self.folder})"
        if not self.steps:
            return "baseline"
        return " + ".join(step.name for step in self.steps)

    @property
    def slug(self) -> str:
        """A file-system-safe name for the variant's image folder."""
        keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name)
        return "-".join(part for part in keep.split("-") if part)

    def work(self) -> tuple:
        """What the variant does, for telling apart variants that only look different: the
        validated config of each step (defaults filled in), or the folder's resolved path."""
        if self.folder is not None:
            return ("pipeline", str(Path(self.folder).resolve()))
        return tuple((step.method, step.config()) for step in self.steps)


BASELINE = Variant()


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


def split_chain(spec: str) -> list[str]:
    """A `--method` spec cut into one spec per method, at each "+" that starts a method.

    A piece starts a method when the text before its first ":" is a registered method's name, or
    when it is `name:key=...` (an option list), so an unknown method in a chain is reported as
    unknown rather than read as a tuple item.
    """
    methods = set(list_methods())
    parts: list[str] = []
    for piece in spec.split("+"):
        head, _, rest = piece.partition(":")
        starts = head.strip() in methods or (head.strip().isidentifier() and "=" in rest.split(":")[0])
        if parts and not starts:
            parts[-1] += "+" + piece  # a tuple item: branch_units=attn1+attn2
        else:
            parts.append(piece)
    return parts


def _parse_step(spec: str, whole: str) -> list[Step]:
    """Every Step one method spec names (its sweep expanded), each validated."""
    method, *parts = spec.strip().split(":")
    method = method.strip()
    if not method:
        raise ValueError(f"--method {whole!r} names no method; write e.g. feature_inheritance:interval=2,3,5")
    raw: dict[str, str] = {}
    for part in parts:
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep and raw:  # a value that holds a ":" itself: granularity=group:8
            last = list(raw)[-1]
            raw[last] += ":" + part
            continue
        if not sep or not key or not values.strip():
            raise ValueError(f"--method {whole!r}: {part!r} is not key=value[,value...] "
                             f"(e.g. feature_inheritance:interval=2,3,5)")
        if key in raw:
            raise ValueError(f"--method {whole!r} gives option {key!r} twice; list its values once: {key}=a,b")
        raw[key] = values
    sweeps = {key: [parse_value(v.strip()) for v in values.split(",") if v.strip()] for key, values in raw.items()}
    steps = [Step(method, dict(zip(sweeps, combo))) for combo in itertools.product(*sweeps.values())]
    for step in steps:
        step.config()  # unknown method / option / bad value / no effect: fail before any work
    return steps


def parse_method_spec(spec: str) -> list[Variant]:
    """All variants one `--method` spec names: a method or a chain, with its sweeps expanded."""
    per_step = []
    for part in split_chain(spec):
        try:
            per_step.append(_parse_step(part, spec))
        except ValueError as err:
            if "+" not in part:
                raise
            raise ValueError(f"{err} (in {part.strip()!r}: a '+' starts the next method only before a registered "
                             f"method, one of {', '.join(list_methods())}; any other '+' joins a tuple value)") from None
    methods = [steps[0].method for steps in per_step]
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ValueError(f"--method {spec!r} applies {', '.join(twice)} twice in one chain; "
                         f"a method goes on a pipeline once")
    return [Variant(tuple(combo)) for combo in itertools.product(*per_step)]


def pipeline_variant(folder: str | os.PathLike) -> Variant:
    """A `--pipeline-variant` folder, checked to hold a diffusers pipeline before anything runs."""
    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"--pipeline-variant {folder}: no diffusers pipeline there (expected a folder with "
            f"model_index.json, written by save_pretrained)"
        )
    return Variant(folder=str(folder))


def parse_variants(method_specs: list[str] = (), folders: list[str | os.PathLike] = ()) -> list[Variant]:
    """Every variant the `--method` specs and `--pipeline-variant` folders name, in order.

    Two variants that do the same work (the same validated configs, say `feature_inheritance` and
    `feature_inheritance:interval=3` when 3 is the default, or one folder given twice) are refused,
    naming both.
    """
    variants: list[Variant] = []
    for v in [*(v for spec in method_specs for v in parse_method_spec(spec)), *map(pipeline_variant, folders)]:
        same = next((u for u in variants if u.work() == v.work()), None)
        if same is not None and same.name == v.name:
            raise ValueError(f"variant {v.name} is asked for twice; give each variant once")
        if same is not None:
            why = "the same folder" if v.folder else "equal options once defaults are filled in"
            raise ValueError(f"variants {same.name} and {v.name} do the same work ({why}); keep one")
        clash = next((u for u in variants if u.slug == v.slug), None)
        if clash is not None:  # their images would share a folder
            raise ValueError(f"variants {clash.name} and {v.name} have the same image folder name {v.slug!r}; "
                             f"rename one")
        variants.append(v)
    return variants

