"""What genfast knows about diffusers pipelines: which module is a pipeline's denoiser.

`denoiser_of(pipe)` is the one place that answers it. A new backbone that sits under another
attribute registers it with `register_denoiser`, and every verb and the cost meter follow.
"""

from __future__ import annotations

import torch

# pipeline attributes that hold the module called once per step, in the order they are tried
_DENOISER_ATTRS: list[str] = ["unet", "transformer"]


def register_denoiser(attr: str) -> None:
    """Let pipelines whose denoiser lives at `pipe.<attr>` be served (e.g. a new backbone's pipeline)."""
    if attr not in _DENOISER_ATTRS:
        _DENOISER_ATTRS.append(attr)


def denoiser_of(pipe) -> torch.nn.Module:
    """The module a diffusers pipeline calls once per denoising step (its UNet or transformer)."""
    for name in _DENOISER_ATTRS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(
        f"{type(pipe).__name__} has no denoiser under {', '.join('pipe.' + a for a in _DENOISER_ATTRS)}: "
        f"not a diffusion pipeline genfast serves (a new backbone registers its attribute with "
        f"genfast.pipelines.register_denoiser)"
    )
