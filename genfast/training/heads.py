"""`genfast train-heads`: the embedded 3D head prior, an EG3D of reduced size trained on synthetic heads.

Multi-view reconstruction with per-identity latents (an auto-decoder, no discriminator): every
training identity owns a learnable z, started from a standard normal draw as a GAN's z would be;
the mapping network (always conditioned on the frontal camera, so appearance cannot depend on the
view), the tri-plane synthesis network, the decoder and the super-resolution module learn to
render each identity's views from that z. Because the z's stay spread like normal samples and the
mapping normalises them, a fresh z ~ N(0, I) also gives a head.

The heads are exactly left-right symmetric, so each view also yields its mirror image for free:
flip the image horizontally and mirror the camera with `flip_yaw`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.heads import HeadsDataset
from ..gan3d.cameras import flip_yaw
from ..gan3d.generator import TriPlaneGenerator, build_generator, eg3d_small_config
from ..gan3d.video import mapping_camera
from ..io import atomic_dir
from ..models import LATENTS_NAME
from .checkpoint import sha256_file
from .loop import LoopConfig, TrainLoop, WorkDirLock

RESUMABLE = ("steps", "max_minutes", "ckpt_every")  # recipe fields a rerun may change and still resume


@dataclass(frozen=True)
class HeadsRecipe:
    identities: int = 256
    views: int = 12  # rendered views per identity (mirroring doubles them)
    resolution: int = 64
    seed: int = 0  # held-out identities for benchmarks use seed 1
    steps: int = 9000
    batch_size: int = 8
    lr: float = 2e-3
    latent_lr: float = 1e-2
    betas: tuple[float, float] = (0.0, 0.99)  # StyleGAN's Adam betas
    raw_weight: float = 1.0  # L1 on the 32x32 neural render vs the downsampled target
    latent_reg: float = 1e-3  # pulls each z towards unit RMS, where fresh normal draws live
    ema_decay: float = 0.995
    ckpt_every: int = 250
    warmup: int = 200
    max_minutes: float | None = 75.0  # stop (checkpointed) and write the prior once this much time is spent

    def __post_init__(self):
        for name in ("identities", "views", "resolution", "steps", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be None or > 0, got {self.max_minutes}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @classmethod
    def tiny(cls) -> HeadsRecipe:
        """A few steps of everything, for tests and smoke runs."""
        return cls(identities=4, views=2, steps=6, batch_size=2, ckpt_every=3, warmup=2)


class _Latents(torch.nn.Module):
    def __init__(self, count: int, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.z = torch.nn.Parameter(torch.randn(count, dim, generator=g))


def _render_data(recipe: HeadsRecipe, path: Path, log) -> dict[str, torch.Tensor]:
    """Renders of every training view (uint8) and their cameras, cached in `path` (atomically)."""
    if path.is_file():
        data = torch.load(path, weights_only=True)
        if data["images"].shape[:2] == (recipe.identities, recipe.views):
            return data
        log(f"[heads] {path} holds another data set size; rendering again")
    ds = HeadsDataset(recipe.identities, recipe.views, seed=recipe.seed, resolution=recipe.resolution)
    images = torch.stack([ds.render_identity(i) for i in tqdm(range(recipe.identities), desc="render heads")])
    cameras = torch.stack([ds.cameras(i) for i in range(recipe.identities)])
    data = {"images": images, "cameras": cameras.float()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return data


def _batch(data, step: int, recipe: HeadsRecipe):
    """The step's (identity ids, target images in [-1, 1], cameras), mirrored at random; a pure function of step."""
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
    ids = torch.randint(recipe.identities, (recipe.batch_size,), generator=g)
    views = torch.randint(recipe.views, (recipe.batch_size,), generator=g)
    mirror = torch.rand(recipe.batch_size, generator=g) < 0.5
    images = data["images"][ids, views].float() / 127.5 - 1
    cameras = data["cameras"][ids, views]
    images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    cameras = torch.where(mirror[:, None], flip_yaw(cameras), cameras)
    return ids, images, cameras


def reconstruction_loss(out: dict, target: torch.Tensor, raw_weight: float) -> torch.Tensor:
    """L1 on the super-resolved image and on the raw neural render against the target at its size."""
    raw_target = F.interpolate(target, size=out["image_raw"].shape[-2:], mode="area")
    return (out["image"] - target).abs().mean() + raw_weight * (out["image_raw"] - raw_target).abs().mean()


def heads_prior_config():
    """The small EG3D config, with empty space rendered white (the heads' background is light gray)."""
    config = eg3d_small_config()
    config.rendering_kwargs["white_back"] = True
    return config


def train_heads(out_dir: str | Path = "assets/genfast-heads", work_dir: str | Path = ".genfast-train/heads",
                recipe: HeadsRecipe | None = None, log=print) -> Path:
    """Train the prior (resuming from `work_dir` when a checkpoint is there) and write `out_dir`."""
    from safetensors.torch import save_file

    from ..gan3d.loader import save_converted

    recipe = recipe or HeadsRecipe()
    out_dir, work = Path(out_dir), Path(work_dir)
    with WorkDirLock(work) as lock:  # held from the rendering on: two runs would share data.pt
        data = _render_data(recipe, work / "data.pt", log)
        torch.manual_seed(recipe.seed)
        G = build_generator(heads_prior_config()).train()
        latents = _Latents(recipe.identities, G.z_dim, recipe.seed)
        opt = torch.optim.Adam([{"params": G.parameters(), "lr": recipe.lr},
                                {"params": latents.parameters(), "lr": recipe.latent_lr}], betas=recipe.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
        config = LoopConfig(steps=recipe.steps, checkpoint_every=recipe.ckpt_every, max_minutes=recipe.max_minutes,
                            ema_decay=recipe.ema_decay, desc="train heads")
        # a longer run or another budget may continue a checkpoint; anything else must match
        run_info = {"recipe": {k: v for k, v in asdict(recipe).items() if k not in RESUMABLE},
                    "data_sha256": sha256_file(work / "data.pt")}
        with TrainLoop(work, config, {"G": G, "latents": latents}, opt, sched, ema=("G",), run_info=run_info,
                       lock=lock) as loop:
            start = loop.resume()
            if start:
                log(f"[heads] resumed at step {start}")
            c = mapping_camera(recipe.batch_size)  # frontal: an identity must look the same from every side

            def step_fn(step):
                ids, target, cams = _batch(data, step, recipe)
                G, z = loop.models["G"], loop.models["latents"].z[ids]
                out = G.synthesis(G.mapping(z, c), cams)
                rms = z.pow(2).mean(-1)
                return reconstruction_loss(out, target, recipe.raw_weight) + recipe.latent_reg * (rms - 1).pow(2).mean()

            t0 = time.time()
            finished = loop.run(step_fn)
            minutes, done = (time.time() - t0) / 60, loop.step
            if not finished:
                log(f"[heads] time budget of {recipe.max_minutes} min spent at step {done}; writing the prior "
                    f"(rerun with a larger --max-minutes to go on from here)")
            G_ema: TriPlaneGenerator = copy.deepcopy(loop.unwrap("G")).eval()
            loop.ema_models["G"].copy_to(G_ema.parameters())
            z = loop.unwrap("latents").z.detach().cpu().contiguous()
        set_w_avg(G_ema, z)
        with atomic_dir(work / "final") as tmp:  # weights first, then the card: a crash leaves no half asset
            save_converted(G_ema, tmp / "model")
            save_file({"z": z}, str(tmp / LATENTS_NAME))
        _publish(work / "final", out_dir, recipe, minutes, done)
    log(f"[heads] steps {start}..{done} in {minutes:.1f} min; prior written to {out_dir}")
    return out_dir


@torch.no_grad()
def set_w_avg(G: TriPlaneGenerator, z: torch.Tensor) -> None:
    """Point truncation at the identities' mean w (training here never runs the mapping's running average)."""
    G.backbone.mapping.w_avg.copy_(G.mapping(z, mapping_camera(len(z)))[:, 0].mean(0))


def _publish(final: Path, out_dir: Path, recipe: HeadsRecipe, minutes: float, steps_done: int) -> None:
    """Copy the trained prior into `out_dir`, keeping a model card that is already there."""
    import shutil

    card = out_dir / "README.md"
    card_text = card.read_text() if card.is_file() else None
    with atomic_dir(out_dir) as tmp:
        for f in (final / "model").iterdir():
            shutil.copyfile(f, tmp / f.name)  # not copy2: keep the usual file mode, not the temp files' 0600
        shutil.copyfile(final / LATENTS_NAME, tmp / LATENTS_NAME)
        (tmp / "training.json").write_text(json.dumps(
            {"recipe": asdict(recipe), "steps_done": steps_done, "minutes_this_run": round(minutes, 1)}, indent=2) + "\n")
        if card_text is not None:
            (tmp / "README.md").write_text(card_text)
