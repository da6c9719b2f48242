"""Attach diffusers `ModelHook`s so that taking them off leaves the module exactly as it was.

diffusers' `HookRegistry.remove_hook` unlinks a hook from the chain but leaves the registry and the
instance-level `forward` it installed. Several genfast methods can hook one module, so the registry
and `forward` go only when its last hook goes, and only if genfast put them there.
"""

from __future__ import annotations

import weakref

import torch
from diffusers.hooks import HookRegistry, ModelHook

# modules whose registry genfast created, and whether they had their own `forward` before
_CREATED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def attach(module: torch.nn.Module, hook: ModelHook, name: str) -> tuple[torch.nn.Module, str]:
    if not hasattr(module, "_diffusers_hook"):
        _CREATED[module] = "forward" in module.__dict__
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return module, name


def detach(module: torch.nn.Module, name: str) -> None:
    registry = module._diffusers_hook
    index = registry._hook_order.index(name) if name in registry.hooks else None
    later = registry._fn_refs[index + 1] if index is not None and index + 1 < len(registry._fn_refs) else None
    own_forward = later.forward if later is not None else None
    registry.remove_hook(name, recurse=False)
    if later is not None and later.original_forward is not None:
        # a hook registered after ours that replaces forward (`new_forward`, e.g. diffusers' own
        # caches) must keep it: diffusers 0.42's remove_hook puts the inner forward in its place,
        # so the later hook would be bypassed; the inner forward is what it should call instead
        later.original_forward, later.forward = later.forward, own_forward
    if registry.hooks or module not in _CREATED:
        return
    had_forward = _CREATED.pop(module)
    del module._diffusers_hook
    if not had_forward and "forward" in module.__dict__:
        del module.forward
