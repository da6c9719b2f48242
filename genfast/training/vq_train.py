"""Stage 1 of `genfast train-var`: the multi-scale residual VQ tokenizer on the class shapes.

On the platform's loop through recipe_common.run_recipe (lock, exact resume, per-step log, EMA);
its `evaluate` hook is not used: a tokenizer has no class accuracy, so it is judged once at the end
(`tokenizer_quality`: reconstruction PSNR on held-out renders, the fraction of codes used).

  * data: items of ClassShapesDataset(pool_size, seed), rendered on the fly (a render costs < 1 ms);
    a batch's indices are a pure function of (seed, step), so resume is exact;
  * objective: reconstruction (MSE, L1 or both, on [-1, 1] images) + vq_weight * the model's
    vq_loss (codebook + beta * commitment, straight-through to the encoder), no perceptual term
    (nothing is downloaded);
  * codebook: initialised from the untrained encoder's latents (data_init) instead of the tiny
    uniform init, and, every restart_every steps, codes no token of that step's batch used are
    moved onto random latents of that batch (dead-code restart), so usage does not collapse.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classes import ClassShapesDataset, eval_class_labels, heldout_class_images
from ..data.shapes import to_tensor
from ..io import atomic_dir, atomic_write_text
from .checkpoint import state_hash
from .recipe_common import RecipeChecks, run_recipe

__all__ = ["RECON_LOSSES", "VQRecipe", "load_tokenizer", "save_tokenizer", "tokenizer_quality", "train_tokenizer"]

RECON_LOSSES = ("mse", "l1", "mse+l1")
QUALITY_NAME = "tokenizer.json"
IMAGE_SIZE = 64  # the class shapes' renders


@dataclass
class VQRecipe(RecipeChecks):
    """Every number that decides a tokenizer run (validated; ValueError names `VQRecipe.<field>`)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.0
    recon_loss: str = "mse+l1"
    vq_weight: float = 1.0
    data_init: bool = True
    restart_every: int = 100  # 0: never restart dead codes
    ema_decay: float | None = None
    ema_power: float | None = None
    max_grad_norm: float | None = 1.0
    pool_size: int = 20_000
    seed: int = 0
    checkpoint_every: int = 250
    max_minutes: float | None = None
    mixed_precision: str = "no"
    cpu: bool = False
    heldout_images: int = 96  # judged at the end: PSNR and codebook usage

    eval_every = 0  # not a field: run_recipe's class-accuracy evaluation does not apply to a tokenizer

    def __post_init__(self):
        cls = type(self).__name__
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("pool_size", 1), ("seed", 0),
                          ("checkpoint_every", 1), ("restart_every", 0), ("heldout_images", 1)):
            self._integer(name, low)
        self._number("lr", lambda v: v > 0, "> 0")
        self._number("weight_decay", lambda v: v >= 0, ">= 0")
        self._number("vq_weight", lambda v: v > 0, "> 0")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"{cls}.recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}")
        if not isinstance(self.data_init, bool):
            raise ValueError(f"{cls}.data_init must be true or false, got {self.data_init!r}")  # noqa: TRY004
        self._check_run()

    @classmethod
    def tiny(cls, **changes):
        """A few steps on a small pool: checks the whole path in seconds (tests, smoke runs)."""
        return cls(**{"steps": 3, "batch_size": 4, "warmup": 1, "pool_size": 16, "checkpoint_every": 2,
                      "restart_every": 2, "heldout_images": 8, **changes})


def _check_tokenizer(tokenizer) -> None:
    cfg = tokenizer.config
    if cfg.sample_size != IMAGE_SIZE or cfg.in_channels != 3 or cfg.out_channels != 3:
        raise ValueError(f"the class shapes are {IMAGE_SIZE}x{IMAGE_SIZE} RGB images; this tokenizer takes "
                         f"{cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size} -> {cfg.out_channels}: build it "
                         f"with sample_size={IMAGE_SIZE}, in_channels=out_channels=3")


def images_at(recipe: VQRecipe, step: int) -> torch.Tensor:
    """The global batch of step `step`: (batch_size, 3, 64, 64) in [-1, 1], pool items drawn from (seed, step)."""
    rng = np.random.default_rng([recipe.seed, 29, step])
    ds = ClassShapesDataset(recipe.pool_size, recipe.seed)
    idx = rng.integers(0, recipe.pool_size, size=recipe.batch_size)
    return to_tensor(np.stack([ds.sample(int(i))[0] for i in idx]))


def lr_factor(recipe, step: int) -> float:
    """Linear warmup, then cosine decay to 0 at the last step (as train-class)."""
    if step < recipe.warmup:
        return (step + 1) / (recipe.warmup + 1)
    span = max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - recipe.warmup) / span)))


def _latent_vectors(tokenizer, f: torch.Tensor) -> torch.Tensor:
    """Rows (n, C) of the latent area-resized to every scale: what the codes of the scales will quantize."""
    rows = [F.interpolate(f, size=(p, p), mode="area") if p != f.shape[-1] else f for p in tokenizer.patch_nums]
    return torch.cat([r.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for r in rows])


@torch.no_grad()
def init_codebook(tokenizer, recipe: VQRecipe) -> None:
    """Codebook rows drawn (seeded) from the untrained encoder's latents of pool items, at every scale."""
    vocab = tokenizer.config.vocab_size
    per_image = sum(p * p for p in tokenizer.patch_nums)
    n = min(recipe.pool_size, max(8, math.ceil(2 * vocab / per_image)))
    ds = ClassShapesDataset(recipe.pool_size, recipe.seed)
    images = to_tensor(np.stack([ds.sample(i)[0] for i in range(n)]))
    param = tokenizer.embedding.weight
    rows = _latent_vectors(tokenizer, tokenizer.encode(images.to(param.device, param.dtype)))
    g = torch.Generator().manual_seed(recipe.seed)
    pick = torch.randint(0, len(rows), (vocab,), generator=g) if len(rows) < vocab else \
        torch.randperm(len(rows), generator=g)[:vocab]
    param.copy_(rows[pick.to(rows.device)])


@torch.no_grad()
def restart_dead_codes(tokenizer, images: torch.Tensor, generator: torch.Generator) -> int:
    """Move the codes no token of `images` uses onto random latent rows of them; returns how many moved."""
    f = tokenizer.encode(images)
    tokens, _ = tokenizer.quantize_latents(f)
    used = torch.zeros(tokenizer.config.vocab_size, dtype=torch.bool, device=f.device)
    for t in tokens:
        used[t.flatten()] = True
    dead = (~used).nonzero().flatten()
    if len(dead):
        rows = _latent_vectors(tokenizer, f)
        pick = torch.randint(0, len(rows), (len(dead),), generator=generator).to(rows.device)
        tokenizer.embedding.weight[dead] = rows[pick].to(tokenizer.embedding.weight.dtype)
    return len(dead)


def _recon(recipe: VQRecipe, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rec, x = rec.float(), x.float()
    loss = rec.new_zeros(())
    if "mse" in recipe.recon_loss:
        loss = loss + F.mse_loss(rec, x)
    if "l1" in recipe.recon_loss:
        loss = loss + F.l1_loss(rec, x)
    return loss


def train_tokenizer(tokenizer, work_dir: str | os.PathLike, recipe: VQRecipe | None = None, progress: bool = True,
                    log=print):
    """Train `tokenizer` (a MultiScaleVQModel for 64x64 images, in place) on the class shapes; returns
    (tokenizer, finished). finished False: stopped by max_minutes with a checkpoint in `work_dir`; the same
    call resumes. The same call on a finished work folder returns the finished weights at once."""
    recipe = recipe or VQRecipe()
    _check_tokenizer(tokenizer)
    if recipe.data_init:  # overwritten by the checkpoint on resume; a function of the seed otherwise
        init_codebook(tokenizer.eval(), recipe)

    def prepare(loop):
        acc = loop.accelerator
        rank, world = acc.process_index, acc.num_processes

        def loss_at(step: int) -> torch.Tensor:
            x = images_at(recipe, step)  # the whole batch on every process: a restart must agree everywhere
            device = acc.device
            if recipe.restart_every and step and step % recipe.restart_every == 0:
                g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
                restart_dead_codes(loop.unwrap("tokenizer"), x.to(device), g)
            x = x[rank::world].to(device)
            out = loop.models["tokenizer"](x)
            return _recon(recipe, out.sample, x) + recipe.vq_weight * out.vq_loss.float()

        return loss_at

    return run_recipe(tokenizer, work_dir, recipe, name="tokenizer", desc="train-var tokenizer", inputs={},
                      lr_at=lambda step: recipe.lr * lr_factor(recipe, step), prepare=prepare,
                      evaluate=lambda *_: {}, describe=lambda record: "", progress=progress, log=log)


@torch.no_grad()
def tokenizer_quality(tokenizer, n: int = 96, batch_size: int = 48) -> dict:
    """{"psnr_db": mean per-image PSNR of the reconstructions of n held-out renders (balanced classes,
    images in [0, 1]), "codebook_usage": fraction of the codebook's rows their tokens use, "images": n}."""
    images = heldout_class_images(eval_class_labels(n)).float().div(127.5).sub(1.0)
    param = next(tokenizer.parameters())
    psnr, used = [], torch.zeros(tokenizer.config.vocab_size, dtype=torch.bool)
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        for chunk in images.split(batch_size):
            out = tokenizer(chunk.to(param.device, param.dtype))
            mse = ((out.sample.float().clamp(-1, 1).cpu() - chunk) / 2).square().mean(dim=(1, 2, 3))
            psnr.append(10 * torch.log10(1 / mse.clamp_min(1e-10)))
            for t in out.tokens:
                used[t.flatten().cpu()] = True
    finally:
        tokenizer.train(was_training)
    return {"psnr_db": round(torch.cat(psnr).mean().item(), 3),
            "codebook_usage": round(used.float().mean().item(), 4), "images": n}


def save_tokenizer(tokenizer, folder: str | os.PathLike, recipe: VQRecipe | None = None,
                   quality: dict | None = None) -> Path:
    """save_pretrained (safetensors) in one atomic rename, with tokenizer.json: recipe, quality, weights' hash."""
    out = Path(folder)
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp, safe_serialization=True)
        info = {"model": type(tokenizer).__name__, "parameters": sum(p.numel() for p in tokenizer.parameters()),
                "weights_sha256": state_hash(tokenizer), "quality": quality,
                "recipe": recipe.to_dict() if recipe is not None else None}
        atomic_write_text(tmp / QUALITY_NAME, json.dumps(info, indent=2))
    return out


def load_tokenizer(path: str | os.PathLike):
    """A trained MultiScaleVQModel from a save_tokenizer folder or a VARPipeline folder (its vqvae/), with the
    recorded tokenizer.json (or None)."""
    from ..generators import MultiScaleVQModel

    path = Path(path)
    folder = path / "vqvae" if (path / "vqvae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ValueError(f"--tokenizer {path}: no MultiScaleVQModel there (expected config.json and safetensors "
                         f"weights, or a VARPipeline folder with vqvae/); train one with `genfast train-var`")
    tokenizer = MultiScaleVQModel.from_pretrained(folder).float().eval()
    info = folder / QUALITY_NAME
    return tokenizer, (json.loads(info.read_text()) if info.is_file() else None)
