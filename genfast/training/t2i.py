"""`genfast train-t2i`: genfast-mini's denoiser recipe for any UNet2DConditionModel-compatible denoiser.

The AsCAN text model is compared with genfast-mini's UNet on the same data and budget, so this trainer
runs genfast-mini's denoiser stage (genfast.training.mini, whose helpers it calls rather than copies)
for another denoiser, on the platform's TrainLoop (accelerate, safetensors checkpoints, exact resume,
EMA, a wall-clock budget):

  * data: ShapesDataset(pool_size, seed 0) and its caption grammar, encoded once by genfast-mini's VAE
    into a latent pool cached in the work folder (keyed by data and VAE). Pool indices, captions (empty
    with chance p_uncond, for classifier-free guidance), noise and timesteps are the same functions of
    (seed, step) as in `genfast train-mini`, so at one recipe every model sees the same batches;
  * objective: zero-terminal-SNR schedule, v-prediction, loss weight min(SNR + 1, gamma) / (SNR + 1);
  * optimisation: AdamW, diffusers' cosine schedule with linear warm-up (set per step: resume has
    nothing to restore), gradient norm clipped, EMA with warm-up; defaults are genfast-mini's
    (4,500 steps, batch 64, lr 1e-3, 200 warm-up steps, 40,000 pool images);
  * the text encoder is genfast-mini's and stays FROZEN: only the denoiser trains. This differs from
    genfast-mini, whose text encoder was trained jointly with its UNet; here the denoiser learns to read
    that finished encoder, so the result drops into a StableDiffusionPipeline with genfast-mini's VAE,
    text encoder and tokenizer. The like-for-like baseline is `--model unet` trained here.
The result is a StableDiffusionPipeline folder (save_t2i_pipeline) with training.json beside it.
The run around the loss (lock, resume, log, evaluation, EMA) is train-class's: genfast.training.recipe_common.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ..data.shapes import CaptionStyle, ShapesDataset
from .checkpoint import state_hash
from .loop import TrainLoop
from .mini import (
    DENOISER_EMA_DECAY,
    DENOISER_WEIGHT_DECAY,
    MAX_GRAD_NORM,
    NOISE_SCHEDULE,
    MiniRecipe,
    caption_batch,
    encode_shapes_pool,
    noise_draw,
    token_ids,
    unet_config,
    v_loss,
)
from .recipe_common import PoolCache, RecipeChecks, run_recipe, write_pipeline

__all__ = ["T2IRecipe", "build_t2i_unet", "check_t2i_unet", "lr_at", "save_t2i_pipeline", "train_t2i"]

_MINI = MiniRecipe()


@dataclass
class T2IRecipe(RecipeChecks):
    """Every number that decides a text-to-image training run (validated; ValueError names the field).

    Defaults are genfast-mini's denoiser stage. ema_decay None: no EMA (ema_power is then refused).
    eval_every > 0: every that many steps the prompt accuracy of the (EMA) weights on eval_images
    held-out prompts (20 steps, guidance 5, as train-mini) goes to train_log.jsonl.
    """

    steps: int = _MINI.unet_steps
    batch_size: int = _MINI.unet_batch
    lr: float = _MINI.unet_lr
    warmup: int = _MINI.unet_warmup
    weight_decay: float = DENOISER_WEIGHT_DECAY
    p_uncond: float = _MINI.p_uncond
    min_snr_gamma: float = _MINI.min_snr_gamma
    ema_decay: float | None = DENOISER_EMA_DECAY
    ema_power: float | None = _MINI.ema_power
    max_grad_norm: float | None = MAX_GRAD_NORM
    pool_size: int = _MINI.pool_size
    seed: int = _MINI.seed
    checkpoint_every: int = _MINI.ckpt_every
    max_minutes: float | None = None
    mixed_precision: str = "no"
    cpu: bool = False
    eval_every: int = _MINI.eval_every
    eval_images: int | None = None  # default 64 (with eval_every)

    _CHANCE = ("p_uncond", "the chance a caption is left empty")


def _lr_factor(recipe: T2IRecipe):
    """step -> factor of diffusers' "cosine" schedule (linear warm-up, cosine decay), as train-mini used it."""
    from diffusers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
    return get_scheduler("cosine", dummy, num_warmup_steps=recipe.warmup,
                         num_training_steps=recipe.steps).lr_lambdas[0]


def lr_at(recipe: T2IRecipe, step: int) -> float:
    """The learning rate of step `step` (counted from 0)."""
    return recipe.lr * _lr_factor(recipe)(step)


# ---------------------------------------------------------------- models

_CLASSES = ("UNet2DConditionModel", "AsCANUNet2DConditionModel")


def _ascan():
    try:
        from .. import backbones
    except ImportError as err:
        raise ValueError(f"AsCAN needs genfast.backbones, which is not importable: {err}") from None
    return backbones


def build_t2i_unet(spec: str, seed: int = 0, cross_attention_dim: int | None = None) -> torch.nn.Module:
    """A fresh text-conditional denoiser for genfast-mini (16x16x4 latents, its 128-d text encoder).

    spec: "unet" (genfast-mini's UNet2DConditionModel config, the baseline), "ascan-<name>"
    (AsCANUNet2DConditionModel of genfast.backbones.ascan_config(name), e.g. ascan-t2i-mini), or a
    config.json of either class (as save_pretrained writes it). cross_attention_dim: the width of the
    text embeddings the model reads, applied to every spec (None: the spec's own, 128 for "unet" and
    the AsCAN configs); a config.json that sets another width is refused rather than overridden.
    Initial weights come from torch's generator seeded with `seed`.
    """
    if cross_attention_dim is not None and (isinstance(cross_attention_dim, bool)
                                            or not isinstance(cross_attention_dim, int) or cross_attention_dim < 1):
        raise ValueError(f"cross_attention_dim must be a positive int (the text encoder's width) or None, "
                         f"got {cross_attention_dim!r}")
    width = {} if cross_attention_dim is None else {"cross_attention_dim": cross_attention_dim}
    torch.manual_seed(seed)
    if spec == "unet":
        return UNet2DConditionModel(**unet_config(**width))
    if spec.startswith("ascan-"):
        backbones, name = _ascan(), spec[len("ascan-"):]
        cls = backbones.ascan_class(name)  # an unknown name is refused there, with the names
        if cls is not backbones.AsCANUNet2DConditionModel:
            raise ValueError(f"{spec!r} is a class-conditional AsCAN config ({cls.__name__}): train it with "
                             f"`genfast train-class --model {spec}`; train-t2i needs a text config "
                             f"(e.g. ascan-t2i-mini)")
        return cls(**{**backbones.ascan_config(name), **width})
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"model config {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not JSON ({err})") from None
        name = config.get("_class_name") if isinstance(config, dict) else None
        if name not in _CLASSES:
            raise ValueError(f"{path}: _class_name {name!r} is not a text-to-image denoiser train-t2i builds "
                             f"({', '.join(_CLASSES)})")
        if width and config.get("cross_attention_dim", cross_attention_dim) != cross_attention_dim:
            raise ValueError(f"{path} sets cross_attention_dim={config['cross_attention_dim']!r}, but "
                             f"cross_attention_dim={cross_attention_dim} was asked for: edit the file, or leave "
                             f"cross_attention_dim unset to build the file's width")
        cls = UNet2DConditionModel if name == "UNet2DConditionModel" else _ascan().AsCANUNet2DConditionModel
        return cls.from_config({**config, **width})
    raise ValueError(f"unknown model {spec!r}: give 'unet', 'ascan-<config name>' (e.g. ascan-t2i-mini), or a "
                     f"config.json of a {' or '.join(_CLASSES)}")


def check_t2i_unet(unet: torch.nn.Module, vae, text_encoder) -> None:
    """Check `unet` fits a StableDiffusionPipeline around this VAE and text encoder, with one probe forward
    (a model that cannot run fails here with its own message, before any data is made)."""
    config = getattr(unet, "config", None)
    fields = ("sample_size", "in_channels", "out_channels", "cross_attention_dim")
    missing = [k for k in fields if config is None or k not in config]
    if missing:
        raise TypeError(f"{type(unet).__name__} is not a UNet2DConditionModel-compatible denoiser: its config lacks "
                        f"{', '.join(missing)} (StableDiffusionPipeline and this trainer read them)")
    channels = vae.config.latent_channels
    size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    width = text_encoder.config.hidden_size
    wanted = {"in_channels": channels, "out_channels": channels, "sample_size": size, "cross_attention_dim": width}
    wrong = [f"{k}={config[k]!r} (needs {v})" for k, v in wanted.items() if config[k] != v]
    if wrong:
        raise ValueError(f"{type(unet).__name__} does not fit genfast-mini's {channels}x{size}x{size} latents and "
                         f"{width}-d text encoder: {', '.join(wrong)}; build it with those values")
    param = next(unet.parameters())
    x = torch.zeros(2, channels, size, size, device=param.device, dtype=param.dtype)
    cond = torch.zeros(2, 4, width, device=param.device, dtype=param.dtype)
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            out = unet(x, torch.tensor([999, 0], device=param.device), cond)
    finally:
        unet.train(was_training)
    sample = getattr(out, "sample", None)
    if not isinstance(sample, torch.Tensor) or tuple(sample.shape) != tuple(x.shape):
        raise TypeError(f"{type(unet).__name__}(sample, timestep, encoder_hidden_states) must return an output "
                        f"whose .sample has the input's shape {tuple(x.shape)}, as UNet2DConditionModel does")


# ---------------------------------------------------------------- data

def latent_pool(vae, recipe: T2IRecipe, work_dir: Path, device="cpu", progress: bool = True) -> tuple[torch.Tensor, list]:
    """(scaled latents, scenes) of the pool, the latents cached in `work_dir` under a key of data and VAE."""
    cache = PoolCache(work_dir, recipe, vae)
    latents = cache.load()
    if latents is not None:  # the scenes are drawn without rendering
        ds = ShapesDataset(recipe.pool_size, seed=recipe.seed)
        return latents, [ds.scene(i) for i in range(recipe.pool_size)]
    latents, scenes = encode_shapes_pool(vae, recipe.pool_size, recipe.seed, device, progress)
    return cache.save(latents), scenes


# ---------------------------------------------------------------- training

def _tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def _base(base):
    if base is not None:
        return base
    from ..models import load_mini

    return load_mini()


def train_t2i(unet: torch.nn.Module, work_dir: str | os.PathLike, recipe: T2IRecipe | None = None, base=None,
              progress: bool = True, log=print) -> tuple[torch.nn.Module, bool]:
    """Train `unet` (in place) with genfast-mini's denoiser recipe; returns (unet, finished).

    base: the pipeline whose VAE, tokenizer and text encoder are used (default: genfast-mini); the text
    encoder and VAE stay frozen (their weights, modes and devices are as before when this returns).
    finished False: stopped by max_minutes with a checkpoint in `work_dir`; the same call resumes exactly.
    When finished, the unet holds the EMA weights (if ema_decay is set) and is in eval mode."""
    recipe = recipe or T2IRecipe()
    base = _base(base)
    vae, text_encoder, tokenizer = base.vae, base.text_encoder, base.tokenizer
    check_t2i_unet(unet, vae, text_encoder)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    inputs = {"vae": state_hash(vae), "text_encoder": state_hash(text_encoder), "tokenizer": _tokenizer_hash(tokenizer)}
    lr_factor = _lr_factor(recipe)

    def prepare(loop: TrainLoop):
        acc = loop.accelerator
        device, rank, world = acc.device, acc.process_index, acc.num_processes
        vae.to(device)
        text_encoder.to(device)
        with acc.main_process_first():  # one process encodes the pool, the others read it
            latents, scenes = latent_pool(vae, recipe, work_dir, device, progress)
        style = CaptionStyle()  # genfast-mini's training captions

        def loss_at(step: int) -> torch.Tensor:
            idx, captions = caption_batch(step, recipe.seed, recipe.batch_size, scenes, recipe.p_uncond, style)
            x0 = latents[torch.from_numpy(idx)]
            noise, t = noise_draw(x0.shape, recipe.seed, step, noise_sched.config.num_train_timesteps)
            part = slice(rank, None, world)  # this process's share of the global batch
            x0, noise, t, ids = (v[part].to(device) for v in (x0, noise, t, token_ids(tokenizer, captions)))
            with torch.no_grad():
                cond = text_encoder(ids)[0]
            return v_loss(loop.models["unet"], x0, noise, t, cond, noise_sched, recipe.min_snr_gamma)

        return loss_at

    def describe(record: dict) -> str:
        return f"prompt accuracy { {k[:-9]: v for k, v in record.items() if k.endswith('_accuracy')} }"

    with _frozen(vae, text_encoder):
        return run_recipe(unet, work_dir, recipe, name="unet", desc="train-t2i", inputs=inputs,
                          lr_at=lambda step: recipe.lr * lr_factor(step), prepare=prepare,
                          evaluate=lambda averaged, evaluator: _quick_eval(averaged, base, recipe, evaluator),
                          describe=describe, progress=progress, log=log)


@contextmanager
def _frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients inside; each module's mode, requires_grad flags and device put back after."""
    saved = [(m, m.training, {n: p.requires_grad for n, p in m.named_parameters()}, m.device) for m in modules]
    try:
        for m in modules:
            m.eval().requires_grad_(False)
        yield
    finally:
        for m, training, flags, device in saved:
            m.train(training).to(device)
            for n, p in m.named_parameters():
                p.requires_grad_(flags[n])


def _pipeline(base, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=type(base.scheduler).from_config(base.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def _quick_eval(unet: torch.nn.Module, base, recipe: T2IRecipe, evaluator) -> dict:
    """Prompt accuracy of `unet` on eval_images held-out prompts (20 steps, guidance 5)."""
    from ..eval.prompt_accuracy import eval_prompts, prompt_accuracy

    pipe = _pipeline(base, unet)
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts(recipe.eval_images or 64)
    images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    return prompt_accuracy(images * 2 - 1, prompts, evaluator)

def save_t2i_pipeline(unet: torch.nn.Module, out_dir: str | os.PathLike, recipe: T2IRecipe | None = None,
                      base=None, half: bool = False, extra: dict | None = None) -> Path:
    """Write `unet` as a StableDiffusionPipeline folder with base's (default genfast-mini's) VAE, text
    encoder, tokenizer and scheduler, in one atomic rename, with training.json (recipe, parameter count,
    `extra`). half: weights stored in fp16 (half the size; they load back as fp32). A hand-written
    README.md already in the folder is kept. A genfast denoiser loads after `import genfast`."""
    base = _base(base)
    parts = {"vae": base.vae, "text_encoder": base.text_encoder, "unet": unet}
    if half:  # copies: the caller's modules keep their dtype
        parts = {k: copy.deepcopy(m).half() for k, m in parts.items()}
    pipe = StableDiffusionPipeline(
        **parts, tokenizer=base.tokenizer, scheduler=base.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return write_pipeline(pipe, out_dir, unet, recipe, extra, about={"text_encoder": "frozen (genfast-mini's)"},
                          adjust=_text_encoder_fp32)


def _text_encoder_fp32(folder: Path) -> None:
    # transformers follows the config's dtype, diffusers loads fp32: say float32 so both agree (as genfast-mini)
    te_config = folder / "text_encoder" / "config.json"
    config = json.loads(te_config.read_text())
    config["dtype"] = "float32"
    te_config.write_text(json.dumps(config, indent=2))
