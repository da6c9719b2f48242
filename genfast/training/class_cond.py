"""`genfast train-class`: one recipe that trains any class-conditional denoiser on the class shapes.

DiT, LaMamba-Diff and AsCAN are compared on the same data, budget and objective, so all of them go
through this trainer on the platform's TrainLoop (accelerate, safetensors checkpoints, exact
resume, EMA). What it does:

  * data: ClassShapesDataset(seed) images encoded once by genfast-mini's VAE into a latent pool
    cached in the work folder (keyed by data and VAE; a changed key re-encodes);
  * objective: genfast-mini's noise schedule (zero terminal SNR, v-prediction) and its loss weight
    min(SNR + 1, gamma) / (SNR + 1) on v (min_snr_gamma=None: plain MSE). A learned-sigma model
    (out_channels = 2 * in_channels) is trained on the first half only: the sigma half gets no
    loss (no VLB term) and stays at its initialisation, which is harmless here because the DDIM
    sampler the pipeline uses ignores it (DiTPipeline drops it before the scheduler step);
  * classifier-free guidance: each sample's label is replaced by the null id 1000 with probability
    label_dropout, once per sample (the model's own label dropout, if any, should be off);
  * a batch (indices, dropped labels, noise, timesteps) is a pure function of (seed, step), and
    the learning rate (linear warmup, cosine decay) of the step: resume is exact;
  * the result: a DiTPipeline folder (genfast.pipelines.class_conditional.make_pipeline) written
    atomically, with the EMA weights when ema_decay is set, and training.json.
The run around the loss (lock, resume, log, evaluation, EMA) is shared with train-t2i:
genfast.training.recipe_common.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..data.classes import NUM_CLASSES, ClassShapesDataset
from ..data.shapes import to_tensor
from .checkpoint import state_hash
from .loop import TrainLoop
from .mini import NOISE_SCHEDULE
from .recipe_common import PoolCache, RecipeChecks, run_recipe, write_pipeline

__all__ = ["ClassCondRecipe", "build_denoiser", "check_denoiser", "save_class_pipeline", "train_class_conditional"]


@dataclass
class ClassCondRecipe(RecipeChecks):
    """Every number that decides a class-conditional training run (validated; ValueError names the field).

    ema_decay None: no EMA (ema_power then has no effect and is refused). min_snr_gamma None: plain MSE.
    eval_every > 0: every that many steps, the class accuracy of eval_images samples of the current
    (EMA) weights is logged to train_log.jsonl (needs the embedded evaluator).
    """

    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3  # 1200-step probe on the 2M DiT: final loss 0.285 vs 0.307 at 5e-4, same class accuracy
    warmup: int = 200
    weight_decay: float = 0.0
    label_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
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
    _GAMMA_OPTIONAL = True  # None: plain MSE


# ---------------------------------------------------------------- models

def build_denoiser(spec: str, params_target: int | None = None, layers: int | None = None,
                   seed: int = 0) -> torch.nn.Module:
    """A fresh class-conditional denoiser for the class shapes (NUM_CLASSES classes, 16x16x4 latents).

    spec: "dit" (ClassDiT of dit_config(params_target, layers); default 2M parameters), "lamamba-<name>"
    (genfast.backbones' LaMambaDiffModel with lamamba_config(name)), "ascan-<name>" (AsCANModel with
    ascan_config(name): "ascan-mini", or its equal-parameter symmetric control "ascan-mini-symmetric"),
    or a config.json of any of them (as save_pretrained writes it). The initial weights are drawn from
    torch's generator seeded with `seed`.
    """
    from ..pipelines.class_conditional import DIT_PARAMS, ClassDiT, dit_config

    for name, value in (("params_target", params_target), ("layers", layers)):
        if value is not None and spec != "dit":
            raise ValueError(f"{name} sizes the DiT baseline only; it has no effect on {spec!r}")
    torch.manual_seed(seed)
    if spec == "dit":
        return ClassDiT(**dit_config(DIT_PARAMS if params_target is None else params_target, layers))
    if spec.startswith("lamamba-"):
        try:
            from ..backbones import LaMambaDiffModel, lamamba_config
        except ImportError as err:
            raise ValueError(f"{spec!r} needs genfast.backbones (LaMambaDiffModel), which is not importable: {err}") \
                from None
        return LaMambaDiffModel(**lamamba_config(spec[len("lamamba-"):]))
    if spec.startswith("ascan-"):
        from ..backbones import AsCANModel, ascan_class, ascan_config

        name = spec[len("ascan-"):]
        if ascan_class(name) is not AsCANModel:
            raise ValueError(f"{spec!r} is a text-to-image AsCAN ({ascan_class(name).__name__}), not a "
                             f"class-conditional denoiser: train it with `genfast train-t2i --model {spec}`")
        return AsCANModel(**ascan_config(name))
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        config = json.loads(path.read_text())
        name = config.get("_class_name") if isinstance(config, dict) else None
        classes = {"ClassDiT": ClassDiT}
        if name in ("LaMambaDiffModel", "AsCANModel"):
            from .. import backbones

            classes[name] = getattr(backbones, name)
        if name not in classes:
            raise ValueError(f"{path}: _class_name {name!r} is not a class-conditional denoiser genfast builds "
                             f"(ClassDiT, LaMambaDiffModel, AsCANModel)")
        return classes[name].from_config(config)
    raise ValueError(f"unknown model {spec!r}: give 'dit', 'lamamba-<config name>' (e.g. lamamba-mini), "
                     f"'ascan-<config name>' (e.g. ascan-mini), or a config.json of a ClassDiT, LaMambaDiffModel "
                     f"or AsCANModel")


def check_denoiser(model: torch.nn.Module, latent_channels: int = 4, latent_size: int = 16) -> int:
    """Check `model` keeps the class-conditional contract for these latents; returns its output channels.

    One probe forward with the last class id and the null id 1000: a model with too few label rows,
    or without the contract's forward, fails here with its own message, before any data is made."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    config = getattr(model, "config", None)
    missing = [k for k in ("sample_size", "in_channels", "out_channels") if config is None or k not in config]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a class-conditional denoiser: its config lacks "
                        f"{', '.join(missing)} (DiTPipeline reads them)")
    if config.in_channels != latent_channels or config.sample_size != latent_size:
        raise ValueError(f"{type(model).__name__} takes {config.in_channels}x{config.sample_size}x"
                         f"{config.sample_size} latents; genfast-mini's VAE gives {latent_channels}x{latent_size}x"
                         f"{latent_size}: build it with in_channels={latent_channels}, sample_size={latent_size}")
    if config.out_channels not in (config.in_channels, 2 * config.in_channels):
        raise ValueError(f"{type(model).__name__}.out_channels must be in_channels or 2 * in_channels (learned "
                         f"sigma), got {config.out_channels}")
    param = next(model.parameters())
    x = torch.zeros(2, latent_channels, latent_size, latent_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x, timestep=torch.tensor([999, 0], device=param.device),
                        class_labels=torch.tensor([NUM_CLASSES - 1, 1000], device=param.device), return_dict=True)
    finally:
        model.train(was_training)
    if not isinstance(out, Transformer2DModelOutput) or tuple(out.sample.shape) != (2, config.out_channels,
                                                                                    latent_size, latent_size):
        raise TypeError(f"{type(model).__name__}'s forward must return Transformer2DModelOutput(sample=(B, "
                        f"out_channels, H, W)), got {type(out).__name__}")
    return config.out_channels


# ---------------------------------------------------------------- data

def _encode_pool(vae, recipe: ClassCondRecipe, device) -> torch.Tensor:
    ds = ClassShapesDataset(recipe.pool_size, recipe.seed)
    out = []
    with torch.no_grad():
        for start in range(0, recipe.pool_size, 256):
            images = to_tensor(np.stack([ds.sample(i)[0] for i in range(start, min(start + 256, recipe.pool_size))]))
            z = vae.encode(images.to(device, vae.dtype)).latent_dist.mode()
            out.append((z * vae.config.scaling_factor).float().cpu())
    return torch.cat(out).contiguous()


def latent_pool(vae, recipe: ClassCondRecipe, work_dir: Path, device="cpu") -> torch.Tensor:
    """The pool's scaled latents (item i has class i % NUM_CLASSES), cached in `work_dir` under a key of
    the data and the VAE's weights."""
    cache = PoolCache(work_dir, recipe, vae)
    latents = cache.load()
    return latents if latents is not None else cache.save(_encode_pool(vae, recipe, device))


def batch_at(recipe: ClassCondRecipe, step: int, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool indices, class ids with the dropped ones set to the null id 1000) of step `step`."""
    from ..pipelines.class_conditional import NULL_CLASS_ID

    rng = np.random.default_rng([recipe.seed, 17, step])
    idx = rng.integers(0, pool_size, size=recipe.batch_size)
    labels = idx % NUM_CLASSES
    labels = np.where(rng.random(recipe.batch_size) < recipe.label_dropout, NULL_CLASS_ID, labels)
    return torch.from_numpy(idx), torch.from_numpy(labels).long()


def lr_factor(recipe: ClassCondRecipe, step: int) -> float:
    """Linear warmup, then cosine decay to 0 at the last step."""
    if step < recipe.warmup:
        return (step + 1) / (recipe.warmup + 1)
    span = max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - recipe.warmup) / span)))


# ---------------------------------------------------------------- training

def train_class_conditional(model: torch.nn.Module, work_dir: str | os.PathLike, recipe: ClassCondRecipe | None = None,
                            vae=None, progress: bool = True, log=print) -> tuple[torch.nn.Module, bool]:
    """Train `model` (in place) on the class shapes; returns (model, finished).

    finished False: stopped by max_minutes with a checkpoint in `work_dir`; the same call resumes.
    When finished, the model holds the EMA weights (if ema_decay is set) and is in eval mode."""
    from ..pipelines.class_conditional import mini_vae

    recipe = recipe or ClassCondRecipe()
    vae = vae if vae is not None else mini_vae()
    vae.eval().requires_grad_(False)
    latent_size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    check_denoiser(model, vae.config.latent_channels, latent_size)
    in_ch = model.config.in_channels
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    alphas = noise_sched.alphas_cumprod

    def prepare(loop: TrainLoop):
        acc = loop.accelerator
        device, rank, world = acc.device, acc.process_index, acc.num_processes
        vae.to(device)
        with acc.main_process_first():  # one process encodes the pool, the others read it
            latents = latent_pool(vae, recipe, work_dir, device)

        def loss_at(step: int) -> torch.Tensor:
            idx, labels = batch_at(recipe, step, len(latents))
            x0 = latents[idx]
            gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
            part = slice(rank, None, world)  # this process's share of the global batch
            x0, noise, t, labels = (v[part].to(device) for v in (x0, noise, t, labels))
            noisy = noise_sched.add_noise(x0, noise, t)
            target = noise_sched.get_velocity(x0, noise, t)
            pred = loop.models["model"](noisy, timestep=t, class_labels=labels).sample[:, :in_ch]  # sigma half: no loss
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if recipe.min_snr_gamma is not None:
                snr = (alphas[t.cpu()] / (1 - alphas[t.cpu()])).to(device)
                per_sample = per_sample * torch.clamp(snr + 1, max=recipe.min_snr_gamma) / (snr + 1)
            return per_sample.mean()

        return loss_at

    return run_recipe(model, work_dir, recipe, name="model", desc="train-class",
                      inputs={"vae": state_hash(vae)},
                      lr_at=lambda step: recipe.lr * lr_factor(recipe, step), prepare=prepare,
                      evaluate=lambda averaged, evaluator: _quick_eval(averaged, vae, recipe, evaluator),
                      describe=lambda record: f"class accuracy {record['class_accuracy']}", progress=progress, log=log)


def _quick_eval(model: torch.nn.Module, vae, recipe: ClassCondRecipe, evaluator) -> dict:
    """Class accuracy of `model` on eval_images held-out labels (20 steps, CFG 4)."""
    from ..pipelines.class_conditional import evaluate_pipeline, make_pipeline

    pipe = make_pipeline(model, vae)
    pipe.set_progress_bar_config(disable=True)
    return evaluate_pipeline(pipe, evaluator, n=recipe.eval_images or 48)

def save_class_pipeline(model: torch.nn.Module, out_dir: str | os.PathLike, recipe: ClassCondRecipe | None = None,
                        vae=None, half: bool = False, extra: dict | None = None) -> Path:
    """Write `model` as a DiTPipeline folder (genfast-mini's VAE and sampler, the class labels) in one
    atomic rename, with training.json (recipe, parameter count, `extra`). half: weights stored in fp16
    (half the size; diffusers loads them back as fp32 unless asked otherwise)."""
    from ..pipelines.class_conditional import make_pipeline

    pipe = make_pipeline(model, vae)
    if half:  # copies: the caller's modules keep their dtype
        pipe = make_pipeline(copy.deepcopy(model).half(), copy.deepcopy(pipe.vae).half())
    return write_pipeline(pipe, out_dir, model, recipe, extra)
