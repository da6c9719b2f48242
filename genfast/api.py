"""The verbs' common ground: a method registry, and handles that live on the modules they change.

Every verb (accelerate, quantize, assemble) is a set of registered methods, each a config dataclass
plus `apply(pipe_or_model, config) -> Handle`. A handle is recorded on the modules it changes, keyed
by method, not on the pipeline object: a second pipeline built from the same components
(`StableDiffusionImg2ImgPipeline(**pipe.components)`) sees that its denoiser is already taken.
Different methods stack on one pipeline; `remove()` takes one off and the rest keep working.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch

VERBS = {"accelerate": "accelerated", "quantize": "quantized", "assemble": "assembled"}

_METHODS: dict[str, MethodSpec] = {}
_RECORDS = "_genfast_handles"  # on each changed module: {method name: active handle}; gone when empty
_ORDER = itertools.count()


def _records(module: torch.nn.Module) -> dict[str, Handle]:
    return module.__dict__.get(_RECORDS, {})


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    apply: Callable[[Any, Any], Handle]
    summary: str
    verb: str


def register_method(name: str, config_cls: type, summary: str, verb: str = "accelerate"):
    """Decorator for `apply(pipe, config) -> Handle`; the method joins its verb and `genfast compare`."""
    if verb not in VERBS:
        raise ValueError(f"verb must be one of {tuple(VERBS)}, got {verb!r}")

    def wrap(apply):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = MethodSpec(name, config_cls, apply, summary, verb)
        return apply

    return wrap


def list_methods(verb: str | None = None) -> dict[str, str]:
    """Registered methods (of one verb, or all) and a line on each."""
    _load_builtin_methods()
    return {n: s.summary for n, s in sorted(_METHODS.items()) if verb is None or s.verb == verb}


def _load_builtin_methods():
    from .methods import feature_inheritance, gri_attention, multi_unet  # noqa: F401  (register themselves)
    from .quant import quantize  # noqa: F401  (registers itself)


class Handle:
    """What a verb returns: `remove()` puts the object back exactly as it was.

    Also a context manager: `with genfast.accelerate(pipe, ...): ...` removes on exit.
    `modules`: what the method changed (the handle is recorded on each). `commutes`: whether it can
    come off while a later handle still sits on the same modules (hooks and weight swaps can; a
    method that replaces modules cannot, and then the later handle must be removed first).
    """

    def __init__(self, target, method: str, config, undo: Callable[[], None],
                 modules: Iterable[torch.nn.Module] = (), commutes: bool = True):
        self.target = target
        self.method = method
        self.config = config
        self.commutes = commutes
        self.modules = list(dict.fromkeys(modules))
        self._undo = undo
        self.removed = False
        self.order = next(_ORDER)
        claim(method, self.modules)
        for module in self.modules:
            module.__dict__.setdefault(_RECORDS, {})[method] = self

    @property
    def verb(self) -> str:
        spec = _METHODS.get(self.method)
        return spec.verb if spec else "accelerate"

    def _later_on_same_modules(self) -> list[Handle]:
        later = {h for m in self.modules for h in _records(m).values() if h.order > self.order}
        return sorted(later, key=lambda h: -h.order)

    def remove(self) -> None:
        if self.removed:
            return
        blocking = [h for h in self._later_on_same_modules() if not (self.commutes and h.commutes)]
        if blocking:
            raise RuntimeError(
                f"cannot remove the {self.method!r} handle yet: {', '.join(map(repr, blocking))} was applied "
                f"after it on the same modules and must come off first (call its .remove())"
            )
        self._undo()
        for module in self.modules:
            records = _records(module)
            if records.get(self.method) is self:
                del records[self.method]
                if not records:
                    del module.__dict__[_RECORDS]
        self.removed = True

    def prepare(self, **call_kwargs) -> None:
        """The method's own preparation before measured use, given one pipeline call's arguments
        (e.g. feature inheritance's calibration call). Most methods need none."""

    @property
    def stats(self) -> dict:
        """Per-method counters (feature_inheritance: denoiser calls run full and partial)."""
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "removed" if self.removed else "active"
        return f"<genfast handle: {self.method} ({state}) {self.config}>"


def handles_on(module: torch.nn.Module) -> dict[str, Handle]:
    """The active handles recorded on a module, by method."""
    return dict(_records(module))


def claim(method: str, modules: Iterable[torch.nn.Module]) -> None:
    """Raise if any of `modules` already carries `method`; methods call this before changing anything."""
    for module in modules:
        other = _records(module).get(method)
        if other is not None:
            target = type(other.target).__name__
            raise RuntimeError(
                f"this {type(module).__name__} is already {VERBS[other.verb]} with {method!r} (applied through a "
                f"{target}; pipelines built from the same components share it): call .remove() on that handle "
                f"({other!r}) before applying {method!r} again"
            )


def build_config(config_cls, method: str, options: dict):
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"its options are: {', '.join(sorted(known))}"
        )
    return config_cls(**options)


def method_spec(method: str) -> MethodSpec:
    _load_builtin_methods()
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[method]


def method_config(method: str, options: dict):
    """The validated config of `method` with `options`: the errors applying it would raise, without a pipeline."""
    return build_config(method_spec(method).config_cls, method, options)


def apply_method(pipe, method: str, **options) -> Handle:
    """Apply any registered method, whatever its verb; what `genfast compare` uses for recipes."""
    config = method_config(method, options)
    return _METHODS[method].apply(pipe, config)


def accelerate(pipe, method: str, **options) -> Handle:
    """Apply an acceleration method to a pipeline; returns a Handle whose remove() undoes it.

    >>> handle = genfast.accelerate(pipe, "feature_inheritance", interval=3)
    >>> handle.remove()
    """
    spec = method_spec(method)
    if spec.verb != "accelerate":
        raise ValueError(f"{method!r} is a {spec.verb} method: call genfast.{spec.verb}(...) "
                         f"(acceleration methods: {', '.join(list_methods('accelerate'))})")
    return apply_method(pipe, method, **options)
