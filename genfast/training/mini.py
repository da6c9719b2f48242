"""`genfast train-mini`: train genfast-mini and its evaluator from nothing, on a CPU.

Stages, each resumable and skipped when its output already exists:
  1. tokenizer   the caption grammar as a CLIPTokenizer
  2. evaluator   attribute classifier (shape, colour, size, position, background)
  3. vae         AutoencoderKL, factor 4, 4 latent channels (L1 + MSE + tiny KL)
  4. pool        a fixed pool of shapes images encoded once to latents
  5. denoiser    UNet2DConditionModel + CLIPTextModel trained jointly, then saved as a
                 StableDiffusionPipeline

Choices that make colour binding learnable on this budget (see the model card):
  * zero-terminal-SNR noise schedule with v-prediction. With SD's usual schedule the last
    timestep still leaks ~7% of the signal, so the model learns to keep the noise's mean
    colour and at sampling time colours come out washed out or on the wrong region;
  * loss weight min(SNR + 1, gamma) / (SNR + 1) on v (min-SNR, but the pure-noise step keeps
    its weight: that is where the colours of shape and background are decided);
  * saturated shape colours against muted backgrounds (genfast.data.shapes).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..data.shapes import HEADS, CaptionStyle, ShapesDataset, caption, grammar_words, render_batch, to_tensor
from ..data.tokenizer import MAX_LENGTH, build_tokenizer_files
from ..eval.classifier import AttributeClassifier
from ..eval.prompt_accuracy import HELDOUT_SEED, eval_prompts, prompt_accuracy
from ..io import atomic_dir, atomic_write_text
from .checkpoint import sha256_file
from .loop import LoopConfig, TrainLoop, WorkDirLock

TRAIN_SEED = 0
POOL = "latent_pool.safetensors"
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
}
# the denoiser stage's fixed numbers (genfast.training.t2i trains other denoisers with the same ones)
DENOISER_WEIGHT_DECAY = 1e-2
DENOISER_EMA_DECAY = 0.9995
MAX_GRAD_NORM = 1.0
POOL_CHUNK = 256  # images rendered and encoded at a time


@dataclass
class MiniRecipe:
    """Every number that decides what `genfast train-mini` produces."""

    seed: int = TRAIN_SEED
    # evaluator
    clf_steps: int = 800
    clf_batch: int = 128
    clf_lr: float = 2e-3
    # autoencoder
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    # denoiser
    pool_size: int = 40_000
    unet_steps: int = 4500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_warmup: int = 200
    min_snr_gamma: float = 5.0
    p_uncond: float = 0.1
    ema_power: float = 0.75
    eval_every: int = 500
    ckpt_every: int = 250

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"MiniRecipe.{name} must be >= 0, got {value}")
        if self.ema_power == 0:
            raise ValueError("MiniRecipe.ema_power must be > 0 (the EMA warmup's exponent), got 0")
        if self.unet_batch == 0 or self.vae_batch == 0 or self.clf_batch == 0:
            raise ValueError("MiniRecipe batch sizes must be > 0")

    @classmethod
    def tiny(cls) -> MiniRecipe:
        """A few steps of everything: checks the whole path in seconds (tests, smoke runs)."""
        return cls(
            clf_steps=3, clf_batch=8, vae_steps=3, vae_batch=4, pool_size=32,
            unet_steps=3, unet_batch=4, unet_warmup=1, eval_every=0, ckpt_every=2,
        )


# ---- model shapes (standard diffusers / transformers classes only) ----

def vae_config() -> dict:
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 64,
        "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16,
    }


def unet_config(cross_attention_dim: int = 128) -> dict:
    return {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": (32, 128, 192),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": 4, "norm_num_groups": 32,
    }


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def inference_scheduler() -> DDIMScheduler:
    # trailing spacing starts sampling at t=999, the pure-noise step the model was trained on
    return DDIMScheduler(
        **NOISE_SCHEDULE, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
        steps_offset=1,  # unused by trailing spacing; set so diffusers does not flag the config
    )


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur and noise, so the evaluator also reads slightly soft generated images right."""
    n = images.shape[0]
    soft = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen)
    images = images * (1 - mix) + soft * mix
    return images + torch.randn(images.shape, generator=gen) * 0.06 * torch.rand(n, 1, 1, 1, generator=gen)


# ---- the denoiser recipe, shared with genfast.training.t2i ----

def encode_shapes_pool(vae: AutoencoderKL, pool_size: int, seed: int, device=None,
                       progress: bool = True) -> tuple[torch.Tensor, list]:
    """(scaled latents on the CPU, scenes) of ShapesDataset(pool_size, seed): the images the denoiser learns."""
    ds = ShapesDataset(pool_size, seed=seed)
    device = device if device is not None else vae.device
    scenes, out = [], []
    with torch.no_grad():
        for start in tqdm(range(0, pool_size, POOL_CHUNK), desc="pool: render + encode",
                          disable=not (progress and PartialState().is_local_main_process)):
            images = []
            for i in range(start, min(start + POOL_CHUNK, pool_size)):
                image, _, scene = ds.sample(i)
                scenes.append(scene)
                images.append(image)
            x = to_tensor(np.stack(images)).to(device, vae.dtype)
            out.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).float().cpu())
    return torch.cat(out).contiguous(), scenes


def caption_batch(step: int, seed: int, batch: int, scenes: list, p_uncond: float,
                  style: CaptionStyle | None = None) -> tuple[np.ndarray, list[str]]:
    """(pool indices, captions) of one step, a pure function of (seed, step); a caption is empty with
    chance p_uncond (classifier-free guidance)."""
    style = style if style is not None else CaptionStyle()
    rng = np.random.default_rng([seed, 3, step])
    idx = rng.integers(0, len(scenes), size=batch)
    return idx, ["" if rng.random() < p_uncond else caption(scenes[i], rng, style) for i in idx]


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def noise_draw(shape, seed: int, step: int, num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) of one step, a pure function of (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise = torch.randn(shape, generator=gen)
    return noise, torch.randint(0, num_train_timesteps, (shape[0],), generator=gen)


def v_loss(unet, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
           noise_sched: DDPMScheduler, min_snr_gamma: float) -> torch.Tensor:
    """MSE on v, sample by sample weighted min(SNR + 1, gamma) / (SNR + 1) (see the module docstring)."""
    alphas = noise_sched.alphas_cumprod.to(t.device)
    noisy = noise_sched.add_noise(x0, noise, t)
    target = noise_sched.get_velocity(x0, noise, t)
    pred = unet(noisy, t, cond).sample
    snr = alphas[t] / (1 - alphas[t])
    weight = torch.clamp(snr + 1, max=min_snr_gamma) / (snr + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


def _folder_sha256(path: Path) -> str:
    """One hash of a folder's files (names and contents)."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path)}\0{sha256_file(file)}\n".encode())
    return h.hexdigest()


class MiniTrainer:
    def __init__(self, out_dir: str | Path = "assets", work_dir: str | Path = ".genfast-train/mini",
                 recipe: MiniRecipe | None = None, log=print):
        self.out = Path(out_dir)
        self.work = Path(work_dir)
        self.recipe = recipe or MiniRecipe()
        self.log = log
        self.mini_dir = self.out / "genfast-mini"
        self.eval_dir = self.out / "genfast-evaluator"
        self.timings: dict[str, float] = {}

    # -- helpers --
    def _stage_done(self, path: Path, name: str) -> bool:
        if path.exists():
            self.log(f"[{name}] found {path}, skipping (delete it to retrain)")
            return True
        return False

    def _loop(self, name, steps, models: dict, optimizer, lr_sched, step_fn, run_info: dict,
              ema_decay=None, on_step=None) -> tuple[dict, dict]:
        """One stage on the shared training loop; its checkpoints live in `<work>/<name>`.

        Returns the trained models and their EMA (diffusers EMAModel), by name."""
        r = self.recipe
        config = LoopConfig(steps=steps, checkpoint_every=r.ckpt_every or steps,  # 0: only the last step
                            ema_decay=ema_decay, ema_power=r.ema_power if ema_decay else None,
                            max_grad_norm=MAX_GRAD_NORM, desc=name)
        with TrainLoop(self.work / name, config, models, optimizer, lr_sched,
                       ema=tuple(models) if ema_decay else (), run_info=run_info) as loop:
            if start := loop.resume():
                self.log(f"[{name}] resumed at step {start}")
            t0 = time.time()
            loop.run(lambda step: step_fn(step, *loop.models.values()),
                     None if on_step is None else lambda done: on_step(done, loop.ema_models))
            self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
            return {n: loop.unwrap(n) for n in models}, loop.ema_models

    def _inputs(self, *fields: str, **hashes: str) -> dict:
        """A stage's run record: the recipe fields that shape its weights and its inputs' hashes."""
        return {"recipe": {f: getattr(self.recipe, f) for f in ("seed", *fields)}, **hashes}

    # -- stages --
    def tokenizer(self) -> CLIPTokenizer:
        path = self.mini_dir / "tokenizer"
        if not path.exists():
            with atomic_dir(path) as tmp:
                build_tokenizer_files(grammar_words(), tmp)
        return CLIPTokenizer.from_pretrained(path)

    def evaluator(self) -> AttributeClassifier:
        if self._stage_done(self.eval_dir, "evaluator"):
            return AttributeClassifier.from_pretrained(self.eval_dir)
        r = self.recipe
        torch.manual_seed(r.seed)
        model = AttributeClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=r.clf_lr, weight_decay=1e-4)
        sched = get_scheduler("cosine", opt, num_warmup_steps=min(50, r.clf_steps), num_training_steps=r.clf_steps)
        heads = list(HEADS)

        def step_fn(step, model):
            # indices 10^8 and up: disjoint from the images the denoiser's pool uses
            imgs, _, labels = render_batch(r.clf_batch, r.seed, start=10**8 + step * r.clf_batch)
            gen = torch.Generator().manual_seed(r.seed * 7919 + step)
            x = _augment(to_tensor(imgs), gen)
            y = torch.from_numpy(labels)
            logits = model(x)
            return sum(F.cross_entropy(logits[h], y[:, i]) for i, h in enumerate(heads))

        models, _ = self._loop("evaluator", r.clf_steps, {"model": model}, opt, sched, step_fn,
                               self._inputs("clf_steps", "clf_batch", "clf_lr"))
        model = models["model"].eval()
        with atomic_dir(self.eval_dir) as tmp:
            model.save_pretrained(tmp)
        return model

    def vae(self) -> AutoencoderKL:
        path = self.mini_dir / "vae"
        if self._stage_done(path, "vae"):
            return AutoencoderKL.from_pretrained(path)
        r = self.recipe
        torch.manual_seed(r.seed)
        vae = AutoencoderKL(**vae_config())
        opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
        sched = get_scheduler("cosine", opt, num_warmup_steps=min(100, r.vae_steps), num_training_steps=r.vae_steps)

        def step_fn(step, vae):
            imgs, _, _ = render_batch(r.vae_batch, r.seed, start=2 * 10**8 + step * r.vae_batch)
            x = to_tensor(imgs)
            post = vae.encode(x).latent_dist
            recon = vae.decode(post.sample(torch.Generator().manual_seed(step))).sample
            return F.l1_loss(recon, x) + F.mse_loss(recon, x) + r.vae_kl * post.kl().mean()

        models, _ = self._loop("vae", r.vae_steps, {"vae": vae}, opt, sched, step_fn,
                               self._inputs("vae_steps", "vae_batch", "vae_lr", "vae_kl"))
        vae = models["vae"].eval()
        # scale latents to unit variance, as SD's 0.18215 does for its autoencoder
        imgs, _, _ = render_batch(512, HELDOUT_SEED)
        with torch.no_grad():
            std = vae.encode(to_tensor(imgs)).latent_dist.mode().std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        with atomic_dir(path) as tmp:
            vae.save_pretrained(tmp)
        return vae

    def latent_pool(self, vae: AutoencoderKL):
        """Encode pool_size training images once; the denoiser samples from them."""
        r = self.recipe
        path = self.work / POOL
        if path.exists():  # resuming: the scenes are enough, no need to render the images again
            latents = load_file(path)["latents"]
            if len(latents) == r.pool_size:
                ds = ShapesDataset(r.pool_size, seed=r.seed)
                return latents, [ds.scene(i) for i in range(r.pool_size)]
        latents, scenes = encode_shapes_pool(vae, r.pool_size, r.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"latents": latents}, tmp)
        tmp.replace(path)
        return latents, scenes

    def denoiser(self, tokenizer, vae, evaluator) -> StableDiffusionPipeline:
        if self._stage_done(self.mini_dir / "unet", "denoiser"):
            return StableDiffusionPipeline.from_pretrained(self.mini_dir)
        r = self.recipe
        latents, scenes = self.latent_pool(vae)
        torch.manual_seed(r.seed)
        text_encoder = CLIPTextModel(text_config(tokenizer))
        unet = UNet2DConditionModel(**unet_config(text_encoder.config.hidden_size))
        noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
        opt = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=r.unet_lr,
                                weight_decay=DENOISER_WEIGHT_DECAY)
        sched = get_scheduler("cosine", opt, num_warmup_steps=r.unet_warmup, num_training_steps=r.unet_steps)
        style = CaptionStyle()
        log_path = self.work / "denoiser_log.jsonl"

        def step_fn(step, unet, text_encoder):
            idx, captions = caption_batch(step, r.seed, r.unet_batch, scenes, r.p_uncond, style)
            x0 = latents[torch.from_numpy(idx)]
            noise, t = noise_draw(x0.shape, r.seed, step, noise_sched.config.num_train_timesteps)
            return v_loss(unet, x0, noise, t, text_encoder(token_ids(tokenizer, captions))[0], noise_sched,
                          r.min_snr_gamma)

        def on_step(done, ema):
            if r.eval_every and done % r.eval_every == 0:
                acc = self._quick_eval(tokenizer, vae, unet, text_encoder, ema, evaluator)
                self.log(f"[denoiser] step {done}: prompt accuracy {acc}")
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": done, **acc}) + "\n")

        unet.train()
        text_encoder.train()
        inputs = self._inputs("pool_size", "unet_steps", "unet_batch", "unet_lr", "unet_warmup", "min_snr_gamma",
                              "p_uncond", "ema_power", latent_pool_sha256=sha256_file(self.work / POOL),
                              tokenizer_sha256=_folder_sha256(self.mini_dir / "tokenizer"))
        models, ema = self._loop("denoiser", r.unet_steps, {"unet": unet, "text_encoder": text_encoder}, opt, sched,
                                 step_fn, inputs, ema_decay=DENOISER_EMA_DECAY, on_step=on_step)
        unet, text_encoder = models["unet"], models["text_encoder"]
        ema["unet"].copy_to(unet.parameters())
        ema["text_encoder"].copy_to(text_encoder.parameters())
        pipe = self._pipeline(tokenizer, vae, unet.eval(), text_encoder.eval())
        return pipe

    @staticmethod
    def _pipeline(tokenizer, vae, unet, text_encoder) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=inference_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    @torch.no_grad()
    def _quick_eval(self, tokenizer, vae, unet, text_encoder, ema, evaluator, n=64) -> dict:
        """Prompt accuracy of the EMA weights on n held-out prompts (20 steps, guidance 5)."""
        u, te = copy.deepcopy(unet), copy.deepcopy(text_encoder)  # the raw modules, not accelerate's wrappers
        ema["unet"].copy_to(u.parameters())
        ema["text_encoder"].copy_to(te.parameters())
        pipe = self._pipeline(tokenizer, vae, u.eval(), te.eval())
        pipe.set_progress_bar_config(disable=True)
        prompts = eval_prompts(n)
        images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        return {k: round(v, 3) for k, v in prompt_accuracy(images * 2 - 1, prompts, evaluator).items()}

    def save_pipeline(self, pipe: StableDiffusionPipeline):
        """Save in fp16 (the whole pipeline stays under 20 MB); loads back as usual."""
        if (self.mini_dir / "unet").exists():
            return
        r = self.recipe
        with atomic_dir(self.mini_dir) as tmp:
            pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
            # diffusers loads fp16 weights into fp32 modules by default, transformers follows the
            # config's dtype: say float32 there so a plain from_pretrained gives one dtype throughout
            te_config = tmp / "text_encoder" / "config.json"
            config = json.loads(te_config.read_text())
            config["dtype"] = "float32"
            te_config.write_text(json.dumps(config, indent=2))
            card = self.mini_dir / "README.md"
            if card.exists():  # the model card is written by hand from bench figures: keep it
                (tmp / "README.md").write_text(card.read_text())
            atomic_write_text(tmp / "training.json", json.dumps(
                {"recipe": asdict(r), "minutes": {k: round(v / 60, 1) for k, v in self.timings.items()}},
                indent=2))
        pipe.to(torch.float32)

    def run(self) -> Path:
        t0 = time.time()
        with WorkDirLock(self.work):  # the stages share the latent pool and the output folders
            tokenizer = self.tokenizer()
            evaluator = self.evaluator()
            vae = self.vae()
            pipe = self.denoiser(tokenizer, vae, evaluator)
            self.save_pipeline(pipe)
        self.log(f"train-mini finished in {(time.time() - t0) / 60:.1f} min; "
                 f"stage minutes: { {k: round(v / 60, 1) for k, v in self.timings.items()} }")
        return self.mini_dir


def train_mini(out_dir="assets", work_dir=".genfast-train/mini", recipe: MiniRecipe | None = None) -> Path:
    return MiniTrainer(out_dir, work_dir, recipe).run()
