"""A small LoRA for genfast-mini's UNet, trained in under a minute on a CPU.

The adapter learns one visible concept: every scene is drawn on `MiniLoraRecipe.background`
whatever the caption says. It is a peft adapter added the diffusers way
(`unet.add_adapter(LoraConfig(...))`), trained on the shared loop (genfast.training.loop) with
genfast-mini's own objective (v-prediction, min-SNR weight), and saved with
`StableDiffusionPipeline.save_lora_weights`, so `pipe.load_lora_weights(folder)` loads it -- on
the float pipeline or a genfast-quantized one (tests/test_quant_lora.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ..data.shapes import BACKGROUND_COLORS, CaptionStyle, ShapesDataset, render, to_tensor
from ..data.tokenizer import MAX_LENGTH
from ..io import atomic_dir, atomic_write_text
from .checkpoint import state_hash
from .loop import LoopConfig, TrainLoop
from .mini import NOISE_SCHEDULE

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name, found by load_lora_weights
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # attention and resnet 3x3 convs


@dataclass
class MiniLoraRecipe:
    """Every number that decides the adapter."""

    background: str = "black"
    steps: int = 40
    batch: int = 8
    lr: float = 2e-3
    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    min_snr_gamma: float = 5.0
    seed: int = 0

    def __post_init__(self):
        if self.background not in BACKGROUND_COLORS:
            raise ValueError(f"MiniLoraRecipe.background must be one of {tuple(BACKGROUND_COLORS)}, "
                             f"got {self.background!r}")
        for name in ("steps", "batch", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MiniLoraRecipe.{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "alpha", "min_snr_gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MiniLoraRecipe.{name} must be > 0, got {getattr(self, name)!r}")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("MiniLoraRecipe.target_modules must name at least one module")


def _batch(recipe: MiniLoraRecipe, step: int) -> tuple[np.ndarray, list[str]]:
    """Captioned scenes of the shapes data, redrawn on the recipe's background (captions unchanged)."""
    ds = ShapesDataset(10**9, seed=recipe.seed, style=CaptionStyle())
    images, captions = [], []
    for i in range(step * recipe.batch, (step + 1) * recipe.batch):
        _, text, scene = ds.sample(i)
        scene = dataclasses.replace(scene, background=recipe.background)
        images.append(render(scene, np.random.default_rng([recipe.seed, 5, i])))
        captions.append(text)
    return np.stack(images), captions


def train_mini_lora(out_dir: str | Path, recipe: MiniLoraRecipe | None = None, base=None,
                    work_dir: str | Path = ".genfast-train/mini-lora", progress: bool = True) -> Path:
    """Train the adapter on `base` (a genfast-mini-shaped StableDiffusionPipeline; None: the embedded
    genfast-mini) and write it to `out_dir` as diffusers LoRA weights. `base` is left unchanged."""
    from ..models import load_mini

    recipe = recipe or MiniLoraRecipe()
    pipe = base if base is not None else load_mini()
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    if getattr(unet, "_hf_peft_config_loaded", False):
        raise ValueError("train_mini_lora: the base UNet already carries LoRA adapters; unload them first "
                         "(pipe.unload_lora_weights())")
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    alphas = noise_sched.alphas_cumprod
    # the loop's checkpoint holds the whole UNet: a resume must find the same base under the adapter
    run_info = {"recipe": _jsonable(recipe), "base_sha256": state_hash(unet)}
    was_training = unet.training
    train_flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    torch.manual_seed(recipe.seed)  # peft draws lora_A from torch's global generator
    adapter = "genfast_mini_lora"
    unet.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, init_lora_weights="gaussian",
                                target_modules=list(recipe.target_modules)), adapter_name=adapter)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    unet.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)

    def step_fn(step, unet):
        images, captions = _batch(recipe, step)
        with torch.no_grad():
            x0 = vae.encode(to_tensor(images)).latent_dist.mode() * vae.config.scaling_factor
            ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                            return_tensors="pt").input_ids
            cond = text_encoder(ids)[0]
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, cond).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr + 1, max=recipe.min_snr_gamma) / (snr + 1)
        per_sample = F.mse_loss(pred, noise_sched.get_velocity(x0, noise, t), reduction="none").mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    config = LoopConfig(steps=recipe.steps, checkpoint_every=recipe.steps, desc="mini-lora", progress=progress,
                        max_grad_norm=1.0)
    try:
        unet.train()
        with TrainLoop(work_dir, config, {"unet": unet}, opt, run_info=run_info) as loop:
            loop.run(lambda step: step_fn(step, loop.models["unet"]))
        unet.eval()
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, weight_name=LORA_FILE)
            (tmp / LORA_FILE).chmod(0o644)  # written private (0600) underneath; an adapter is for sharing
            atomic_write_text(tmp / "recipe.json", json.dumps(_jsonable(recipe), indent=2))
            card = out / "README.md"
            if card.is_file():  # written by hand: a retrain keeps it
                atomic_write_text(tmp / "README.md", card.read_text())
    finally:  # the base pipeline goes back as it came
        unet.unload_lora()
        unet.train(was_training)
        for n, p in unet.named_parameters():
            p.requires_grad_(train_flags[n])
    return out


def _jsonable(recipe: MiniLoraRecipe) -> dict:
    d = asdict(recipe)
    d["target_modules"] = list(d["target_modules"])
    return d


def main(argv: list[str] | None = None) -> None:
    """`python -m genfast.training.lora_mini --out assets/genfast-mini-lora`: the shipped adapter."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (diffusers LoRA weights + recipe.json)")
    parser.add_argument("--work-dir", default=".genfast-train/mini-lora", help="checkpoints, for resuming")
    parser.add_argument("--steps", type=int, default=MiniLoraRecipe.steps)
    parser.add_argument("--background", default=MiniLoraRecipe.background, choices=tuple(BACKGROUND_COLORS))
    args = parser.parse_args(argv)
    out = train_mini_lora(args.out, MiniLoraRecipe(steps=args.steps, background=args.background),
                          work_dir=args.work_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
