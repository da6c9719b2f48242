"""GRI attention as a training-free acceleration method: `genfast.accelerate(pipe, "gri_attention", window=8, pooled=4)`.

Every self-attention layer of the denoiser runs regional (window x window) attention plus attention to a
pooled x pooled global summary (genfast.assembly.gri has the formulation, our reading of A-SDM's GRI);
levels with at most window^2 + pooled^2 tokens keep full attention. `remove()` puts the processors and
the denoiser's hooks back as they were, so outputs are bit-equal to before.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..api import Handle, claim, register_method
from ..assembly.gri import install_gri, uninstall_gri
from ..pipelines import denoiser_of

METHOD = "gri_attention"


@dataclass
class GRIAttentionConfig:
    """window: side in tokens of each query's region; pooled: side of the pooled global summary."""

    window: int = 8
    pooled: int = 4

    def __post_init__(self):
        for name in ("window", "pooled"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _largest_grid(denoiser) -> int | None:
    """Tokens of the denoiser's finest attention level at its configured sample size (None: unknown)."""
    size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(size, int):
        return size * size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]) * int(size[1])
    return None


@register_method(METHOD, GRIAttentionConfig,
                 "training-free GRI attention: windowed self-attention plus a pooled global summary (linear in tokens)")
def apply(pipe, config: GRIAttentionConfig) -> Handle:
    denoiser = pipe if isinstance(pipe, torch.nn.Module) else denoiser_of(pipe)
    claim(METHOD, [denoiser])
    previous = install_gri(denoiser, config.window, config.pooled)
    tokens = _largest_grid(denoiser)
    if tokens is not None and tokens <= config.window ** 2 + config.pooled ** 2:
        warnings.warn(f"gri_attention with window={config.window}, pooled={config.pooled} changes nothing at this "
                      f"denoiser's sample size ({tokens} tokens at most, <= window^2 + pooled^2 keeps full "
                      f"attention): lower window/pooled or run at a higher resolution", stacklevel=3)
    return Handle(pipe, METHOD, config, lambda: uninstall_gri(denoiser, previous), [denoiser])
