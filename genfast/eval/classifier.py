"""The embedded evaluator: an attribute classifier for shapes images.

It judges generated images (prompt accuracy) and its penultimate layer is the offline feature
space for FID when Inception weights are not available. A diffusers ModelMixin, so it saves
and loads with save_pretrained / from_pretrained like every other genfast model.
"""

from __future__ import annotations

import itertools

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..data.shapes import HEADS


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class AttributeClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 96, 128),
        feature_dim: int = 256,
        head_sizes: dict[str, int] | None = None,
        image_size: int = 64,
    ):
        super().__init__()
        head_sizes = head_sizes or {name: len(classes) for name, classes in HEADS.items()}
        layers = [_conv(3, channels[0], 1)]
        for cin, cout in itertools.pairwise(channels):
            layers.append(_conv(cin, cout, 2))
        layers.append(_conv(channels[-1], channels[-1], 2))
        self.body = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        # flattened, not pooled: the position head needs to know where things are
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in head_sizes.items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], shape (N, feature_dim)."""
        return self.features(self.body(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.embed(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class index per head for images in [-1, 1]."""
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.heads}
        for chunk in images.split(batch_size):
            logits = self(chunk.to(self.device, self.dtype))
            for name, value in logits.items():
                out[name].append(value.argmax(-1).cpu())
        return {name: torch.cat(v) for name, v in out.items()}
