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
    registry.remove_hook(name, recurse=False)
    if registry.hooks or module not in _CREATED:
        return
    had_forward = _CREATED.pop(module)
    del module._diffusers_hook
    if not had_forward and "forward" in module.__dict__:
        del module.forward
