"""An identity embedding for synthetic heads: the offline stand-in for ArcFace IR-SE50.

My3DGen's symmetry regulariser compares ArcFace embeddings of a render and of the mirrored
render. ArcFace's weights cannot be fetched here and mean nothing for cartoon heads, so genfast
trains a small embedding on the synthetic heads themselves: views of one identity (any yaw,
mirrored or not) map close together, other identities apart (a cosine-margin classifier over the
training identities, as ArcFace/CosFace train; the classifier is dropped afterwards). The training
lives in genfast.training.identity; this module is the model only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 128


def _block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(), nn.AvgPool2d(2))


class IdentityEncoder(nn.Module):
    """Images (N, 3, H, W) in [-1, 1] -> unit identity embeddings (N, 128); inputs are resized to 64x64."""

    def __init__(self, width: int = 32, dim: int = EMBED_DIM):
        super().__init__()
        self.width, self.dim = width, dim
        self.net = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width),
                                 _block(4 * width, 4 * width), nn.Flatten(), nn.Linear(4 * width * 16, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (64, 64):
            images = F.interpolate(images, size=(64, 64), mode="area")
        return F.normalize(self.net(images), dim=-1)


def identity_similarity(encoder: IdentityEncoder, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the identities in image batches a and b (N,), images in [-1, 1]."""
    return (encoder(a) * encoder(b)).sum(-1)


def save_identity_encoder(encoder: IdentityEncoder, path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    from ..io import atomic_dir

    with atomic_dir(path) as tmp:
        save_file(encoder.state_dict(), str(tmp / "model.safetensors"),
                  metadata={"width": str(encoder.width), "dim": str(encoder.dim)})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors writes owner-only files
    return Path(path)


def load_identity_encoder(path: str | os.PathLike | None = None) -> IdentityEncoder:
    """The embedded encoder (assets/genfast-identity) or one at `path`, frozen."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..models import IDENTITY, asset_path

    path = Path(path) if path is not None else asset_path(IDENTITY)
    file = path / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; train the identity embedding with `genfast train-heads`")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    encoder = IdentityEncoder(int(meta["width"]), int(meta["dim"]))
    encoder.load_state_dict(load_file(str(file)))
    return encoder.eval().requires_grad_(False)
