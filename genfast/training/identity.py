"""Training the identity embedding (genfast.gan3d.identity) on the heads prior's rendered views.

A cosine-margin classifier over the training identities (CosFace): views of one identity (any
yaw, mirrored or not) must map close together; the class vectors are dropped afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..gan3d.identity import EMBED_DIM, IdentityEncoder, save_identity_encoder
from .checkpoint import tensor_hash
from .loop import LoopConfig, TrainLoop


@dataclass(frozen=True)
class IdentityRecipe:
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    margin: float = 0.2
    scale: float = 16.0
    seed: int = 0
    ckpt_every: int = 200

    def __post_init__(self):
        for name in ("steps", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"IdentityRecipe.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"IdentityRecipe.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"IdentityRecipe.margin must be in [0, 1), got {self.margin}")


class _Classes(nn.Module):
    def __init__(self, count: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(count, EMBED_DIM) * 0.01)


def _batch(images: torch.Tensor, step: int, recipe: IdentityRecipe):
    """(views in [-1, 1], identity ids) of a step: mirrored at random (a mirrored head is the same
    person: the symmetry loss relies on that) and shifted by up to 3 pixels, so the embedding keys
    on the face, not on where it sits. A pure function of the step, so a resumed run draws the same."""
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
    n_ids, n_views = images.shape[:2]
    ids = torch.randint(n_ids, (recipe.batch_size,), generator=g)
    views = torch.randint(n_views, (recipe.batch_size,), generator=g)
    x = images[ids, views].float() / 127.5 - 1
    x = torch.where((torch.rand(recipe.batch_size, generator=g) < 0.5)[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1)), ids


def train_identity_encoder(images: torch.Tensor, work_dir: str | Path, recipe: IdentityRecipe | None = None,
                           log=print) -> IdentityEncoder:
    """Train on uint8 views (identities, views, 3, H, W), resuming from `work_dir`; the encoder, frozen."""
    recipe = recipe or IdentityRecipe()
    torch.manual_seed(recipe.seed)
    n_ids = images.shape[0]
    encoder, classes = IdentityEncoder(), _Classes(n_ids)
    opt = torch.optim.AdamW([*encoder.parameters(), *classes.parameters()], lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    config = LoopConfig(steps=recipe.steps, checkpoint_every=recipe.ckpt_every, desc="identity encoder")
    images_sha256 = tensor_hash(images)
    run_info = {"recipe": {k: v for k, v in asdict(recipe).items() if k != "ckpt_every"},
                "images": {"shape": list(images.shape), "sha256": images_sha256}}
    with TrainLoop(work_dir, config, {"encoder": encoder, "classes": classes}, opt, sched,
                   run_info=run_info) as loop:
        if start := loop.resume():
            log(f"[identity] resumed at step {start}")

        def step_fn(step):
            x, ids = _batch(images, step, recipe)
            cos = loop.models["encoder"](x) @ F.normalize(loop.models["classes"].weight, dim=-1).T
            logits = recipe.scale * (cos - recipe.margin * F.one_hot(ids, n_ids))  # the true class wins by a margin
            return F.cross_entropy(logits, ids)

        loop.run(step_fn)
        encoder = loop.unwrap("encoder")
    log(f"[identity] {recipe.steps} steps done")
    return encoder.eval().requires_grad_(False)


def train_identity(work_dir: str | Path = ".genfast-train/heads", out_dir: str | Path = "assets/genfast-identity",
                   steps: int = 600, log=print) -> Path:
    """The identity embedding on train-heads' rendered training views (`<work_dir>/data.pt`)."""
    data = Path(work_dir) / "data.pt"
    if not data.is_file():
        raise FileNotFoundError(f"{data} is missing: run `genfast train-heads` first (it renders the views)")
    images = torch.load(data, weights_only=True)["images"]
    encoder = train_identity_encoder(images, Path(work_dir) / "identity", IdentityRecipe(steps=steps), log=log)
    return save_identity_encoder(encoder, out_dir)
