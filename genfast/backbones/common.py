"""What the backbones share: the DiTPipeline conventions of their inputs and the U-Net stage container."""

from __future__ import annotations

import torch
from torch import nn

DIT_NULL_CLASS = 1000  # the id DiTPipeline hard-codes for the unconditional half
FREQ_DIM = 256  # DiT's sinusoidal timestep features


class Stage(nn.Module):
    """The blocks at one resolution, with the resampling after (encoder) or before (decoder) them."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


def stage_heads(num_heads, n_stages: int) -> list[int]:
    """Attention heads per stage from one int or a per-stage list."""
    return [num_heads] * n_stages if isinstance(num_heads, int) else list(num_heads)


def timesteps_for(timestep, batch: int, device) -> torch.Tensor:
    """A scalar or (B,) timestep as (B,)."""
    if timestep is None:
        raise ValueError("timestep is required")
    t = torch.as_tensor(timestep, device=device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have shape ({batch},); got {tuple(t.shape)}")
    return t


def class_rows(class_labels, num_classes: int, batch: int, device) -> torch.Tensor:
    """Rows of a (num_classes + 1)-row label table for a batch: one id or (B,) ids, DiTPipeline's null id
    1000 read as row num_classes."""
    if class_labels is None:
        raise ValueError(f"class_labels is required (class ids 0..{num_classes - 1}); pass {num_classes} or "
                         f"{DIT_NULL_CLASS} for the null (unconditional) class")
    from ..pipelines.class_conditional import map_null_labels  # the one contract of every class denoiser

    labels = map_null_labels(torch.as_tensor(class_labels, device=device), num_classes)
    labels = labels.expand(batch) if labels.numel() == 1 else labels
    if labels.shape[0] != batch:
        raise ValueError(f"class_labels has {labels.shape[0]} ids for a batch of {batch}")
    return labels


def class_condition(model, hidden_states: torch.Tensor, timestep, class_labels) -> torch.Tensor:
    """DiT's conditioning c = t_emb + y_emb, (B, width), for a class model with time_proj, time_embed,
    class_embed and config.num_classes, given its input latents (B, ...)."""
    b, device = hidden_states.shape[0], hidden_states.device
    t = timesteps_for(timestep, b, device)
    rows = class_rows(class_labels, model.config.num_classes, b, device)
    return model.time_embed(model.time_proj(t).to(model.dtype)) + model.class_embed(rows)
