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
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ..data.shapes import CaptionStyle, ShapesDataset
from ..io import atomic_dir, atomic_write_text
from .checkpoint import state_hash
from .class_cond import _trim_log  # the same log, the same resume rule
from .loop import MIXED_PRECISION, LoopConfig, TrainLoop, WorkDirLock
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

__all__ = ["T2IRecipe", "build_t2i_unet", "check_t2i_unet", "lr_at", "save_t2i_pipeline", "train_t2i"]

POOL_NAME = "latent_pool.safetensors"
LOG_NAME = "train_log.jsonl"
_RUN_CONTROL = ("checkpoint_every", "max_minutes", "cpu", "eval_every", "eval_images")  # not part of the result
_MINI = MiniRecipe()


@dataclass
class T2IRecipe:
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

    def __post_init__(self):
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"T2IRecipe.{name} must be an integer >= {low}, got {value!r}")

        def number(name, ok, what):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"T2IRecipe.{name} must be {what}, got {value!r}")

        for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("pool_size", 1), ("seed", 0),
                          ("checkpoint_every", 1), ("eval_every", 0)):
            integer(name, low)
        number("lr", lambda v: v > 0, "> 0")
        number("weight_decay", lambda v: v >= 0, ">= 0")
        number("p_uncond", lambda v: 0 <= v < 1, "in [0, 1) (the chance a caption is left empty)")
        number("min_snr_gamma", lambda v: v > 0, "> 0")
        for name in ("max_grad_norm", "max_minutes"):
            if getattr(self, name) is not None:
                number(name, lambda v: v > 0, "None or > 0")
        if self.ema_decay is not None:
            number("ema_decay", lambda v: 0 < v < 1, "None or in (0, 1)")
        if self.ema_power is not None:
            if self.ema_decay is None:
                raise ValueError("T2IRecipe.ema_power has no effect without ema_decay: set ema_decay in (0, 1) "
                                 "or ema_power=None")
            number("ema_power", lambda v: v > 0, "None or > 0")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"T2IRecipe.mixed_precision must be one of {MIXED_PRECISION}, "
                             f"got {self.mixed_precision!r}")
        if self.eval_images is not None:
            if not self.eval_every:
                raise ValueError("T2IRecipe.eval_images has no effect with eval_every=0: set eval_every > 0")
            integer("eval_images", 1)

    @classmethod
    def tiny(cls, **changes) -> T2IRecipe:
        """A few steps on a small pool: checks the whole path in seconds (tests, smoke runs)."""
        return cls(**{"steps": 3, "batch_size": 4, "warmup": 1, "pool_size": 16, "checkpoint_every": 2,
                      "ema_decay": 0.9, "ema_power": None, "eval_every": 0, **changes})

    def to_dict(self) -> dict:
        return asdict(self)


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


def build_t2i_unet(spec: str, seed: int = 0, cross_attention_dim: int = 128) -> torch.nn.Module:
    """A fresh text-conditional denoiser for genfast-mini (16x16x4 latents, its 128-d text encoder).

    spec: "unet" (genfast-mini's UNet2DConditionModel config, the baseline), "ascan-<name>"
    (AsCANUNet2DConditionModel of genfast.backbones.ascan_config(name), e.g. ascan-t2i-mini), or a
    config.json of either class (as save_pretrained writes it). Initial weights come from torch's
    generator seeded with `seed`.
    """
    torch.manual_seed(seed)
    if spec == "unet":
        return UNet2DConditionModel(**unet_config(cross_attention_dim))
    if spec.startswith("ascan-"):
        backbones, name = _ascan(), spec[len("ascan-"):]
        cls = backbones.ascan_class(name)  # an unknown name is refused there, with the names
        if cls is not backbones.AsCANUNet2DConditionModel:
            raise ValueError(f"{spec!r} is a class-conditional AsCAN config ({cls.__name__}): train it with "
                             f"`genfast train-class --model {spec}`; train-t2i needs a text config "
                             f"(e.g. ascan-t2i-mini)")
        return cls(**backbones.ascan_config(name))
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"model config {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not JSON ({err})") from None
        name = config.get("_class_name") if isinstance(config, dict) else None
        if name == "UNet2DConditionModel":
            return UNet2DConditionModel.from_config(config)
        if name == "AsCANUNet2DConditionModel":
            return _ascan().AsCANUNet2DConditionModel.from_config(config)
        raise ValueError(f"{path}: _class_name {name!r} is not a text-to-image denoiser train-t2i builds "
                         f"({', '.join(_CLASSES)})")
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

def latent_pool(vae, recipe: T2IRecipe, work_dir: Path, device="cpu") -> tuple[torch.Tensor, list]:
    """(scaled latents, scenes) of the pool, the latents cached in `work_dir` under a key of data and VAE."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = work_dir / POOL_NAME
    key = json.dumps({"pool_size": recipe.pool_size, "seed": recipe.seed, "vae": state_hash(vae)}, sort_keys=True)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            cached = (f.metadata() or {}).get("key") == key
        if cached:  # the scenes are drawn without rendering
            ds = ShapesDataset(recipe.pool_size, seed=recipe.seed)
            return load_file(str(path))["latents"], [ds.scene(i) for i in range(recipe.pool_size)]
    latents, scenes = encode_shapes_pool(vae, recipe.pool_size, recipe.seed, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"latents": latents}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)
    return latents, scenes


# ---------------------------------------------------------------- training

def _tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def _run_info(recipe: T2IRecipe, unet, base) -> dict:
    return {"recipe": {k: v for k, v in recipe.to_dict().items() if k not in _RUN_CONTROL},
            "model": type(unet).__name__,
            "model_config": json.loads(json.dumps({k: v for k, v in dict(unet.config).items()
                                                   if not k.startswith("_")}, default=str)),
            "vae": state_hash(base.vae), "text_encoder": state_hash(base.text_encoder),
            "tokenizer": _tokenizer_hash(base.tokenizer), "noise_schedule": NOISE_SCHEDULE}


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
    work = Path(work_dir)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    frozen = [(m, m.training, {n: p.requires_grad for n, p in m.named_parameters()}, m.device)
              for m in (vae, text_encoder)]
    run_info = _run_info(recipe, unet, base)
    lock = WorkDirLock(work)
    loop = None
    try:
        for m, *_ in frozen:
            m.eval().requires_grad_(False)
        unet.requires_grad_(True).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        config = LoopConfig(steps=recipe.steps, checkpoint_every=recipe.checkpoint_every,
                            max_minutes=recipe.max_minutes, mixed_precision=recipe.mixed_precision,
                            ema_decay=recipe.ema_decay, ema_power=recipe.ema_power,
                            max_grad_norm=recipe.max_grad_norm, desc="train-t2i", progress=progress, cpu=recipe.cpu)
        loop = TrainLoop(work, config, {"unet": unet}, opt, ema=("unet",) if recipe.ema_decay else (),
                         run_info=run_info, lock=lock)
        acc = loop.accelerator
        device, rank, world = acc.device, acc.process_index, acc.num_processes
        if recipe.batch_size % world:
            raise ValueError(f"T2IRecipe.batch_size ({recipe.batch_size}) must divide evenly over the "
                             f"{world} processes")
        vae.to(device)
        text_encoder.to(device)
        with acc.main_process_first():  # one process encodes the pool, the others read it
            latents, scenes = latent_pool(vae, recipe, work, device)
        style = CaptionStyle()  # genfast-mini's training captions
        lr_factor = _lr_factor(recipe)
        log_path = work / LOG_NAME
        state = {}

        def step_fn(step: int):
            lr = recipe.lr * lr_factor(step)  # a function of the step: resume has nothing to restore
            for group in opt.param_groups:
                group["lr"] = lr
            idx, captions = caption_batch(step, recipe.seed, recipe.batch_size, scenes, recipe.p_uncond, style)
            x0 = latents[torch.from_numpy(idx)]
            noise, t = noise_draw(x0.shape, recipe.seed, step, noise_sched.config.num_train_timesteps)
            part = slice(rank, None, world)  # this process's share of the global batch
            x0, noise, t, ids = (v[part].to(device) for v in (x0, noise, t, token_ids(tokenizer, captions)))
            with torch.no_grad():
                cond = text_encoder(ids)[0]
            loss = v_loss(loop.models["unet"], x0, noise, t, cond, noise_sched, recipe.min_snr_gamma)
            state["record"] = {"step": step + 1, "loss": loss.item(), "lr": lr}
            return loss

        start = loop.resume()
        if acc.is_main_process:
            _trim_log(log_path, start)
        if start:
            log(f"[train-t2i] resumed at step {start} of {recipe.steps}")
        evaluator = None

        def on_step(done: int):
            nonlocal evaluator
            record = state["record"]
            if recipe.eval_every and done % recipe.eval_every == 0 and acc.is_main_process:
                if evaluator is None:
                    from ..models import load_evaluator

                    evaluator = load_evaluator(device)
                record.update(_quick_eval(loop, base, recipe, evaluator))
                log(f"[train-t2i] step {done}: prompt accuracy "
                    f"{ {k[:-9]: v for k, v in record.items() if k.endswith('_accuracy')} }")
            if acc.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

        finished = loop.run(step_fn, on_step)
        if finished and recipe.ema_decay:
            loop.ema_models["unet"].copy_to(unet.parameters())
        if not finished:
            log(f"[train-t2i] stopped at step {loop.step} of {recipe.steps} (max_minutes); run again with the "
                f"same inputs to resume")
    finally:
        if loop is not None:
            loop.close()
        lock.release()
        for m, training, flags, dev in frozen:
            m.train(training).to(dev)
            for n, p in m.named_parameters():
                p.requires_grad_(flags[n])
    unet.eval()
    return unet, finished


def _pipeline(base, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=type(base.scheduler).from_config(base.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def _quick_eval(loop: TrainLoop, base, recipe: T2IRecipe, evaluator) -> dict:
    """Prompt accuracy of the current EMA (or raw) weights on held-out prompts (20 steps, guidance 5)."""
    from ..eval.prompt_accuracy import eval_prompts, prompt_accuracy

    unet = copy.deepcopy(loop.unwrap("unet"))
    if "unet" in loop.ema_models:
        loop.ema_models["unet"].copy_to(unet.parameters())
    pipe = _pipeline(base, unet.eval())
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts(recipe.eval_images or 64)
    rng_state = torch.get_rng_state()  # sampling must not move the training's random streams
    try:
        images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    finally:
        torch.set_rng_state(rng_state)
    acc = prompt_accuracy(images * 2 - 1, prompts, evaluator)
    return {f"{k}_accuracy": round(v, 4) for k, v in acc.items()}


def save_t2i_pipeline(unet: torch.nn.Module, out_dir: str | os.PathLike, recipe: T2IRecipe | None = None,
                      base=None, half: bool = False, extra: dict | None = None) -> Path:
    """Write `unet` as a StableDiffusionPipeline folder with base's (default genfast-mini's) VAE, text
    encoder, tokenizer and scheduler, in one atomic rename, with training.json (recipe, parameter count,
    `extra`). half: weights stored in fp16 (half the size; they load back as fp32). A hand-written
    README.md already in the folder is kept. A genfast denoiser loads after `import genfast`."""
    base = _base(base)
    out = Path(out_dir)
    parts = {"vae": base.vae, "text_encoder": base.text_encoder, "unet": unet}
    if half:  # copies: the caller's modules keep their dtype
        parts = {k: copy.deepcopy(m).half() for k, m in parts.items()}
    pipe = StableDiffusionPipeline(
        **parts, tokenizer=base.tokenizer, scheduler=base.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers follows the config's dtype, diffusers loads fp32: say float32 so both agree (as genfast-mini)
        te_config = tmp / "text_encoder" / "config.json"
        config = json.loads(te_config.read_text())
        config["dtype"] = "float32"
        te_config.write_text(json.dumps(config, indent=2))
        card = out / "README.md"
        if card.is_file():  # a model card written by hand: keep it
            (tmp / "README.md").write_text(card.read_text())
        info = {"model": type(unet).__name__, "parameters": sum(p.numel() for p in unet.parameters()),
                "text_encoder": "frozen (genfast-mini's)", "recipe": recipe.to_dict() if recipe else None,
                **(extra or {})}
        atomic_write_text(tmp / "training.json", json.dumps(info, indent=2))
    return out
