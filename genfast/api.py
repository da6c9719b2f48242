"""The verbs' common ground: a method registry and the handle every verb returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

_METHODS: dict[str, MethodSpec] = {}
_HANDLE_ATTR = "_genfast_handle"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    apply: Callable[[Any, Any], Handle]
    summary: str


def register_method(name: str, config_cls: type, summary: str):
    """Decorator for `apply(pipe, config) -> Handle`; the method joins genfast.accelerate."""

    def wrap(apply):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = MethodSpec(name, config_cls, apply, summary)
        return apply

    return wrap


def list_methods() -> dict[str, str]:
    """Registered acceleration methods and a line on each."""
    _load_builtin_methods()
    return {name: spec.summary for name, spec in sorted(_METHODS.items())}


def _load_builtin_methods():
    from .methods import feature_inheritance  # noqa: F401  (registers itself)


class Handle:
    """What a verb returns: `remove()` puts the object back exactly as it was.

    Also a context manager: `with genfast.accelerate(pipe, ...): ...` removes on exit.
    """

    def __init__(self, target, method: str, config, undo: Callable[[], None]):
        self.target = target
        self.method = method
        self.config = config
        self._undo = undo
        self.removed = False
        setattr(target, _HANDLE_ATTR, self)

    def remove(self) -> None:
        if self.removed:
            return
        self._undo()
        if getattr(self.target, _HANDLE_ATTR, None) is self:
            delattr(self.target, _HANDLE_ATTR)
        self.removed = True

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


def build_config(config_cls, method: str, options: dict):
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"its options are: {', '.join(sorted(known))}"
        )
    return config_cls(**options)


def method_config(method: str, options: dict):
    """The validated config of `method` with `options`: the errors accelerate() would raise, without a pipeline."""
    _load_builtin_methods()
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(_METHODS))}")
    return build_config(_METHODS[method].config_cls, method, options)


def accelerate(pipe, method: str, **options) -> Handle:
    """Apply an acceleration method to a pipeline; returns a Handle whose remove() undoes it.

    >>> handle = genfast.accelerate(pipe, "feature_inheritance", interval=3)
    >>> handle.remove()
    """
    config = method_config(method, options)
    existing = getattr(pipe, _HANDLE_ATTR, None)
    if existing is not None and not existing.removed:
        raise RuntimeError(
            f"this pipeline is already accelerated with {existing.method!r}; "
            f"call .remove() on that handle before accelerating it again"
        )
    return _METHODS[method].apply(pipe, config)
