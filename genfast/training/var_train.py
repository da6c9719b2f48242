"""Stage 2 of `genfast train-var`: the VAR transformer on a frozen tokenizer's tokens, and the two stages
end to end (`train_var_generator`).

Like train-class (genfast.training.class_cond), on recipe_common.run_recipe:

  * data: the tokens of ClassShapesDataset(pool_size, seed) encoded once by the frozen tokenizer,
    cached in the work folder (recipe_common.PoolCache, keyed by data and the tokenizer's weights);
  * objective: cross-entropy of the teacher-forced logits (tokenizer.teacher_forcing_inputs) against
    every scale's tokens, optionally label-smoothed (VAR trains with 0.1);
  * classifier-free guidance: a label goes to the null class with probability label_dropout, once
    per sample (class_cond.batch_at: the batch is a pure function of (seed, step), resume is exact);
  * evaluation every eval_every steps: class accuracy of sampled images (generators.default_sampling: CFG 4,
    top-k / top-p scaled from VAR's; the embedded evaluator);
  * the result: a VARPipeline folder (transformer + vqvae), atomic, with training.json.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classes import HELDOUT_SEED, ClassShapesDataset, eval_class_labels
from ..data.shapes import to_tensor
from .checkpoint import state_hash
from .class_cond import batch_at, lr_factor
from .recipe_common import PoolCache, RecipeChecks, run_recipe, write_pipeline
from .vq_train import VQRecipe, _check_tokenizer, save_tokenizer, tokenizer_quality, train_tokenizer

__all__ = ["VARRecipe", "build_var", "save_var_pipeline", "token_pool", "train_var", "train_var_generator"]


@dataclass
class VARRecipe(RecipeChecks):
    """Every number that decides a transformer run (validated; ValueError names `VARRecipe.<field>`).

    The budget defaults are ClassCondRecipe's (steps 4000, batch 64, warmup 200, label dropout 0.1, EMA
    0.9995 with power 0.75), so the two families train on the same budget. eval_every > 0: every that
    many steps, the class accuracy of eval_images samples of the (EMA) weights goes to train_log.jsonl.
    """

    steps: int = 4000
    batch_size: int = 64
    lr: float = 5e-4  # not tuned: VAR's 1e-4 per 256 images is for models 100x larger
    warmup: int = 200
    weight_decay: float = 0.0
    label_dropout: float = 0.1
    label_smoothing: float = 0.0
    ema_decay: float | None = 0.9995
    ema_power: float | None = 0.75
    max_grad_norm: float | None = 1.0
    pool_size: int = 20_000
    seed: int = 0
    checkpoint_every: int = 250
    max_minutes: float | None = None
    mixed_precision: str = "no"
    cpu: bool = False
    eval_every: int = 0
    eval_images: int | None = None  # default 48 (with eval_every)

    _CHANCE = ("label_dropout", "the chance a label is replaced by the null class")
    _GAMMA_OPTIONAL = True
    min_snr_gamma = None  # not a field: no noise schedule here; the shared checks read it as "off"

    def __post_init__(self):
        super().__post_init__()
        self._number("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)")


def build_var(size: str | dict, tokenizer, seed: int = 0):
    """A fresh VARModel for `tokenizer`'s codebook and scales: a named size of var_config ("0.5M", "2M",
    "8M") or VARModel keyword arguments; its vocab_size / codebook_dim / patch_nums come from the tokenizer."""
    from ..generators import VARModel, var_config

    config = var_config(size) if isinstance(size, str) else dict(size)
    vq = tokenizer.config
    config.update(vocab_size=vq.vocab_size, codebook_dim=vq.latent_channels, patch_nums=tuple(vq.patch_nums))
    torch.manual_seed(seed)
    return VARModel(**config)


# ---------------------------------------------------------------- data

@torch.no_grad()
def _encode_tokens(tokenizer, recipe: VARRecipe, device) -> torch.Tensor:
    ds = ClassShapesDataset(recipe.pool_size, recipe.seed)
    param = next(tokenizer.parameters())
    out = []
    for start in range(0, recipe.pool_size, 256):
        images = to_tensor(np.stack([ds.sample(i)[0] for i in range(start, min(start + 256, recipe.pool_size))]))
        tokens = tokenizer.encode_to_scales(images.to(device, param.dtype))
        out.append(torch.cat([t.flatten(1) for t in tokens], dim=1).cpu())
    dtype = torch.int16 if tokenizer.config.vocab_size <= 2 ** 15 else torch.int32
    return torch.cat(out).to(dtype).contiguous()


def token_pool(tokenizer, recipe: VARRecipe, work_dir: str | os.PathLike, device="cpu") -> torch.Tensor:
    """(pool_size, sum p^2) token ids of the pool's images, all scales flattened and concatenated (item i has
    class i % NUM_CLASSES), cached in `work_dir` under a key of the data and the tokenizer's weights."""
    cache = PoolCache(work_dir, recipe, tokenizer)
    tokens = cache.load()
    return tokens if tokens is not None else cache.save(_encode_tokens(tokenizer, recipe, device))


def split_scales(flat: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    """(B, sum p^2) -> [(B, p, p) for p in patch_nums]."""
    sizes = [p * p for p in patch_nums]
    return [t.reshape(-1, p, p) for t, p in zip(flat.split(sizes, dim=1), patch_nums)]


# ---------------------------------------------------------------- training

def train_var(model, tokenizer, work_dir: str | os.PathLike, recipe: VARRecipe | None = None, progress: bool = True,
              log=print):
    """Train the VARModel `model` (in place) on `tokenizer`'s tokens of the class shapes; returns (model,
    finished). The tokenizer stays frozen (eval mode, no gradients, outside the optimizer).

    finished False: stopped by max_minutes with a checkpoint in `work_dir`; the same call resumes.
    When finished, the model holds the EMA weights (if ema_decay is set) and is in eval mode."""
    from ..generators.sampling import _check_pair

    recipe = recipe or VARRecipe()
    _check_tokenizer(tokenizer)
    _check_pair(model, tokenizer)
    tokenizer.eval().requires_grad_(False)
    nums = tuple(tokenizer.patch_nums)

    def prepare(loop):
        acc = loop.accelerator
        device, rank, world = acc.device, acc.process_index, acc.num_processes
        tokenizer.to(device)
        with acc.main_process_first():  # one process encodes the pool, the others read it
            pool = token_pool(tokenizer, recipe, work_dir, device)

        def loss_at(step: int) -> torch.Tensor:
            idx, labels = batch_at(recipe, step, len(pool))
            part = slice(rank, None, world)  # this process's share of the global batch
            flat, labels = pool[idx][part].long().to(device), labels[part].to(device)
            inputs = tokenizer.teacher_forcing_inputs(split_scales(flat, nums))
            logits = loop.models["model"](labels, inputs).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat.reshape(-1),
                                   label_smoothing=recipe.label_smoothing)

        return loss_at

    return run_recipe(model, work_dir, recipe, name="model", desc="train-var",
                      inputs={"tokenizer": state_hash(tokenizer)},
                      lr_at=lambda step: recipe.lr * lr_factor(recipe, step), prepare=prepare,
                      evaluate=lambda averaged, evaluator: quick_eval(averaged, tokenizer, evaluator,
                                                                      n=recipe.eval_images or 48),
                      describe=lambda record: f"class accuracy {record['class_accuracy']}", progress=progress, log=log)


@torch.no_grad()
def quick_eval(model, tokenizer, evaluator, n: int = 48, batch_size: int = 48) -> dict:
    """Class accuracy (class_conditional.class_accuracy) of n images sampled for the balanced held-out labels
    with default_sampling's settings; the generator lives on the model's device."""
    from ..generators import VARPipeline, default_sampling
    from ..pipelines.class_conditional import class_accuracy

    pipe = VARPipeline(transformer=model, vqvae=tokenizer)
    sampling = default_sampling(model.config.vocab_size)
    device = next(model.parameters()).device
    labels = eval_class_labels(n)
    images = []
    for start in range(0, n, batch_size):
        gen = torch.Generator(device).manual_seed(HELDOUT_SEED * 1_000_003 + start)
        images.append(pipe(labels[start:start + batch_size], generator=gen, output_type="pt",
                           **sampling).images.float().cpu() * 2 - 1)
    return class_accuracy(torch.cat(images), labels, evaluator)


def save_var_pipeline(model, tokenizer, out_dir: str | os.PathLike, recipe: VARRecipe | None = None,
                      half: bool = False, extra: dict | None = None, about: dict | None = None) -> Path:
    """Write a VARPipeline folder (transformer + vqvae, the class labels) in one atomic rename, with
    training.json (its "sampling": default_sampling's settings). half: weights stored in fp16 (copies: the
    caller's modules keep their dtype)."""
    from ..generators import VARPipeline, default_sampling

    extra = {"sampling": default_sampling(model.config.vocab_size), **(extra or {})}
    if half:
        model, tokenizer = copy.deepcopy(model).half(), copy.deepcopy(tokenizer).half()
    pipe = VARPipeline(transformer=model, vqvae=tokenizer)
    return write_pipeline(pipe, out_dir, model, recipe, extra, about=about)


# ---------------------------------------------------------------- both stages

def train_var_generator(size: str | dict, out_dir: str | os.PathLike, work_dir: str | os.PathLike,
                        recipe: VARRecipe | None = None, tokenizer_recipe: VQRecipe | None = None,
                        tokenizer: str | os.PathLike | None = None, tokenizer_config: str | dict = "mini",
                        half: bool = False, progress: bool = True, log=print) -> Path | None:
    """Train the tokenizer (or reuse a trained one at `tokenizer`), then the transformer, and write the
    VARPipeline folder `out_dir`; returns it, or None when stopped by max_minutes (rerun the same call to
    resume: each stage resumes from its checkpoints in `work_dir`, a finished stage is not trained again).

    work_dir holds tokenizer.work/ (stage 1's checkpoints and log), tokenizer/ (the trained tokenizer with
    its held-out PSNR and codebook usage) and transformer.work/ (the token pool, stage 2's checkpoints and
    log). recipe.max_minutes is the budget of the whole call; tokenizer_recipe.max_minutes is refused
    (one budget). tokenizer_config: vq_config's name or MultiScaleVQModel keyword arguments."""
    from ..generators import MultiScaleVQModel, vq_config
    from .vq_train import load_tokenizer

    recipe = recipe or VARRecipe()
    if tokenizer is not None and (tokenizer_recipe is not None or tokenizer_config != "mini"):
        raise ValueError("a tokenizer recipe or config has no effect when a trained tokenizer is reused: drop them "
                         "or drop the tokenizer")
    if tokenizer_recipe is not None and tokenizer_recipe.max_minutes is not None:
        raise ValueError("VQRecipe.max_minutes: the budget is VARRecipe.max_minutes, for both stages; drop it")
    work, t0 = Path(work_dir), time.time()
    if tokenizer is not None:
        vq, info = load_tokenizer(tokenizer)
        about = {"tokenizer": {"source": str(tokenizer), **(info or {})}}
    else:
        tok_recipe = tokenizer_recipe or VQRecipe()
        tok_recipe = _replace(tok_recipe, max_minutes=recipe.max_minutes, cpu=recipe.cpu)
        config = vq_config(tokenizer_config) if isinstance(tokenizer_config, str) else dict(tokenizer_config)
        torch.manual_seed(tok_recipe.seed)
        vq, finished = train_tokenizer(MultiScaleVQModel(**config), work / "tokenizer.work", tok_recipe,
                                       progress=progress, log=log)
        if not finished:
            return None
        quality = tokenizer_quality(vq, tok_recipe.heldout_images)
        save_tokenizer(vq, work / "tokenizer", tok_recipe, quality)
        log(f"[train-var tokenizer] held-out PSNR {quality['psnr_db']} dB, codebook usage "
            f"{quality['codebook_usage']:.1%}")
        about = {"tokenizer": {"source": "trained", "quality": quality, "recipe": tok_recipe.to_dict()}}
    left = None
    if recipe.max_minutes is not None:
        left = recipe.max_minutes - (time.time() - t0) / 60
        if left <= 0:
            log("[train-var] budget spent after the tokenizer; run again with the same inputs to resume")
            return None
    model = build_var(size, vq, seed=recipe.seed)
    model, finished = train_var(model, vq, work / "transformer.work", _replace(recipe, max_minutes=left),
                                progress=progress, log=log)
    if not finished:
        return None
    extra = {"size": size, "minutes_this_run": round((time.time() - t0) / 60, 1)}
    return save_var_pipeline(model, vq, out_dir, recipe, half=half, extra=extra, about=about)


def _replace(recipe, **changes):
    return dataclasses.replace(recipe, **changes)
