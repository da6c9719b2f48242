"""My3DGen: personalize a tri-plane generator to one person from a few photos.

1. cameras: given (an EG3D dataset.json) or fitted by analysis-by-synthesis against the frozen
   generator (yaw, pitch and a latent optimised together from several starting yaws; the best fit wins);
2. latents: one w per photo ("W" inversion; "W+", one w per layer, on request), generator frozen;
3. adapters: low-rank adapters on every modulated convolution and style affine (genfast.gan3d.lora),
   trained on the photos with their latents fixed: MSE on the super-resolved and the raw render,
   plus LPIPS(alex) when its weights are on disk, otherwise an identity-embedding term in its place;
   every `symmetry_every` steps, the symmetry regulariser: render a latent from a camera and from
   its exact mirror (`flip_yaw`), flip the second image, and penalise 1 - cosine of their identity
   embeddings.

The result is a folder: `lora/` (adapter.safetensors + adapter.json, tied to the base's hash),
`latents.safetensors` (the photos' w's), `cameras.json` (EG3D format) and `personalize.json`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import atomic_dir, atomic_write_text
from .cameras import camera_vector, ffhq_intrinsics, flip_yaw, lookat_pose, sample_cameras
from .identity import identity_similarity

LORA_DIR = "lora"
LATENTS = "latents.safetensors"
CAMERAS = "cameras.json"
SUMMARY = "personalize.json"
RUN = "run.json"  # in the work folder: what an unfinished run was started with
LATENT_SPACES = ("w", "w+")


@dataclass(frozen=True)
class PersonalizeConfig:
    rank: int = 1
    alpha: float = 1.0
    train_biases: bool = False
    conv_layout: str = "my3dgen"  # or "loralib": ~0.6x the conv adapter parameters (see genfast.gan3d.lora)
    full_finetune: bool = False  # the comparison: train every synthesis/SR weight instead of adapters
    steps: int = 300
    lr: float = 2e-3  # My3DGen: 0.0025 * 4/5
    symmetry: bool = True
    symmetry_every: int = 4
    symmetry_weight: float = 1.0
    identity_weight: float = 0.1  # the offline stand-in for LPIPS
    latent_space: str = "w"  # "w": one w per photo, shared by every layer; "w+": one per layer (closer fits)
    invert_steps: int = 150
    invert_lr: float = 0.05
    camera_steps: int = 40
    camera_starts: tuple[float, ...] = (-0.5, 0.0, 0.5)  # starting yaws for camera fitting
    camera_resolution: int = 16  # camera fitting compares coarse renders: 4x fewer rays than 32x32
    ckpt_every: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for name in ("steps", "symmetry_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.latent_space not in LATENT_SPACES:
            raise ValueError(f"latent_space must be one of {', '.join(LATENT_SPACES)}, got {self.latent_space!r}")


def _render(G, ws, cams):
    return G.synthesis(ws, cams, deterministic=True)


def _recon(out, target):
    """MSE on the super-resolved image and on the raw render (target resized), targets in [-1, 1]."""
    raw_target = F.interpolate(target, size=out["image_raw"].shape[-2:], mode="area")
    return F.mse_loss(out["image"], target) + F.mse_loss(out["image_raw"], raw_target)


def _cameras(yaw, pitch, n):
    pose = lookat_pose(math.pi / 2 + yaw, math.pi / 2 + pitch)
    return camera_vector(pose, ffhq_intrinsics().expand(n, 3, 3))


def device_of(module) -> torch.device:
    """Where a module's parameters live: photos, cameras and latents are moved there."""
    return next(module.parameters()).device


def fit_cameras(G, targets: torch.Tensor, cfg: PersonalizeConfig, progress: bool = True) -> torch.Tensor:
    """(N, 25) cameras for photos (N, 3, H, W) in [-1, 1]: yaw, pitch and w fitted together, best of several starts."""
    n, k = len(targets), len(cfg.camera_starts)
    targets = targets.to(device_of(G))
    yaw = torch.tensor(cfg.camera_starts, dtype=torch.float64, device=targets.device).repeat(n).requires_grad_(True)
    pitch = torch.zeros(n * k, dtype=torch.float64, device=targets.device, requires_grad=True)
    w = G.backbone.mapping.w_avg.detach()[None].repeat(n * k, 1).requires_grad_(True)
    target = targets.repeat_interleave(k, 0)
    opt = torch.optim.Adam([{"params": [w], "lr": cfg.invert_lr}, {"params": [yaw, pitch], "lr": 0.02}])
    for _ in tqdm(range(cfg.camera_steps), desc="fit cameras", disable=not progress):
        out = G.synthesis(w[:, None].expand(-1, G.num_ws, -1), _cameras(yaw, pitch, n * k).float(),
                          neural_rendering_resolution=cfg.camera_resolution, deterministic=True)
        small = F.interpolate(target, size=out["image_raw"].shape[-2:], mode="area")
        per_image = (out["image_raw"] - small).pow(2).mean((1, 2, 3))  # pose is a coarse matter
        opt.zero_grad(set_to_none=True)
        per_image.sum().backward()
        opt.step()
        with torch.no_grad():
            yaw.clamp_(-1.2, 1.2)
            pitch.clamp_(-0.5, 0.5)
    best = per_image.detach().view(n, k).argmin(1) + torch.arange(n, device=targets.device) * k
    return _cameras(yaw.detach()[best], pitch.detach()[best], n).float()


def invert(G, targets: torch.Tensor, cams: torch.Tensor, cfg: PersonalizeConfig, progress: bool = True):
    """Latents of photos with the generator frozen, ws (N, num_ws, w_dim): one w per photo repeated over
    the layers ("w"), or one per layer ("w+", started from the same w_avg)."""
    targets, cams = targets.to(device_of(G)), cams.to(device_of(G))
    layers = G.num_ws if cfg.latent_space == "w+" else 1
    w = G.backbone.mapping.w_avg.detach()[None, None].repeat(len(targets), layers, 1).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.invert_lr)
    for _ in tqdm(range(cfg.invert_steps), desc=f"invert photos ({cfg.latent_space})", disable=not progress):
        loss = _recon(_render(G, w.expand(-1, G.num_ws, -1), cams), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return w.detach().expand(-1, G.num_ws, -1).contiguous()


def identity_name(identity) -> str:
    from .arcface import ArcFaceIRSE50

    return "ArcFace IR-SE50" if isinstance(identity, ArcFaceIRSE50) else "genfast-identity (synthetic heads)"


class _Perceptual:
    """LPIPS(alex) when its weights are on disk; otherwise the identity embedding's distance instead."""

    def __init__(self, identity, weight: float):
        from ..eval.lpips_metric import LPIPSMetric, lpips_available

        ok, self.note = lpips_available("alex")
        self.lpips = LPIPSMetric("alex").model.to(device_of(identity)) if ok else None
        self.identity, self.weight = identity, weight
        self.name = "LPIPS[alex]" if ok else f"{identity_name(identity)} distance (LPIPS weights not on disk)"

    def __call__(self, out, target):
        if self.lpips is not None:
            raw_target = F.interpolate(target, size=out["image_raw"].shape[-2:], mode="area")
            return self.lpips(out["image"], target).mean() + self.lpips(out["image_raw"], raw_target).mean()
        return self.weight * (1 - identity_similarity(self.identity, out["image"], target)).mean()


def symmetry_loss(G, ws, identity, generator: torch.Generator) -> torch.Tensor:
    """1 - cos(identity(render(c)), identity(flip(render(flip_yaw(c))))) for a random camera per latent."""
    cams = sample_cameras(len(ws), generator, intrinsics=ffhq_intrinsics()).to(ws.device)
    both = _render(G, torch.cat([ws, ws]), torch.cat([cams, flip_yaw(cams)]))["image"]
    a, b = both.chunk(2)
    return (1 - identity_similarity(identity, a, b.flip(-1))).mean()


def _trainable(G, cfg: PersonalizeConfig):
    from . import lora

    if cfg.full_finetune:
        G.requires_grad_(False)
        for part in (G.backbone.synthesis, G.superresolution):
            part.requires_grad_(True)
        return [p for p in G.parameters() if p.requires_grad]
    lora.add_lora(G, rank=cfg.rank, alpha=cfg.alpha, train_biases=cfg.train_biases, conv_layout=cfg.conv_layout)
    return lora.lora_parameters(G)


def personalize(G, names: list[str], photos: torch.Tensor, out: str | Path, cfg: PersonalizeConfig,
                cameras: torch.Tensor | None = None, identity=None, progress: bool = True, log=print,
                ws: torch.Tensor | None = None) -> dict:
    """Fit G (modified in place: adapters added) to photos (N, 3, H, W) in [0, 1]; write the adapter folder.

    ``identity``: the network behind the symmetry term (and the offline LPIPS stand-in): the embedded
    genfast-identity encoder by default, or `genfast.gan3d.arcface.load_arcface` for real faces.

    Resumable: finished phases (cameras, latents) and adapter checkpoints are kept in `<out>.work`.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    from ..training.checkpoint import Checkpointer
    from . import lora
    from .identity import load_identity_encoder
    from .photos import write_cameras

    out = Path(out)
    work = out.with_name(out.name + ".work")
    t0 = time.time()
    base = lora.base_hash(G)
    base_parameters = sum(p.numel() for p in G.parameters())
    device = device_of(G)
    identity = (identity if identity is not None else load_identity_encoder()).to(device)
    identity_label = identity_name(identity)
    resumable = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "ckpt_every")}  # may change
    _claim_work_dir(work, {"photos": names, "base_hash": base, "identity": identity_label,
                           "cameras_given": cameras is not None, "config": resumable})
    targets = photos.to(device) * 2 - 1
    G.requires_grad_(False)

    if cameras is None:
        if (work / CAMERAS).is_file():
            from .photos import read_cameras

            cameras = read_cameras(work / CAMERAS, names)
        else:
            cameras = fit_cameras(G, targets, cfg, progress)
            write_cameras(work / CAMERAS, names, cameras.cpu())
    cameras = cameras.to(device)
    if ws is not None:  # given (a benchmark comparing several trainings from one inversion)
        pass
    elif (work / LATENTS).is_file():
        ws = load_file(str(work / LATENTS))["ws"]
    else:
        ws = invert(G, targets, cameras, cfg, progress)
        save_file({"ws": ws.cpu()}, str(work / LATENTS))
    ws = ws.to(device)

    params = _trainable(G, cfg)
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.0, 0.99 ** 0.8))
    acc = Accelerator()
    opt = acc.prepare(opt)
    holder = torch.nn.ParameterList(params)  # what the checkpoints hold: the trained tensors only
    acc.register_for_checkpointing(holder)
    ckpt = Checkpointer(acc, work / "checkpoints")
    start = ckpt.resume()
    if start:
        log(f"[personalize] resumed at step {start}")
    perceptual = _Perceptual(identity, cfg.identity_weight)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(start, cfg.steps), desc="personalize", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        out_ = _render(G, ws, cameras)
        loss = _recon(out_, targets) + perceptual(out_, targets)
        if cfg.symmetry and step % cfg.symmetry_every == 0:
            g.manual_seed(cfg.seed * 100_003 + step)  # a pure function of the step: resumes draw the same
            loss = loss + cfg.symmetry_weight * symmetry_loss(G, ws, identity, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            ckpt.save(step + 1)

    summary = {"photos": names, "base_hash": base, "trainable_parameters": trainable,
               "generator_parameters": base_parameters, "perceptual": perceptual.name,
               "identity": identity_label, "config": asdict(cfg),
               "minutes": round((time.time() - t0) / 60, 2)}
    with atomic_dir(out) as tmp:
        if cfg.full_finetune:
            from .loader import save_converted

            save_converted(G, tmp / "generator")
        else:
            lora.save_adapter(G, tmp / LORA_DIR, base_hash=base, rank=cfg.rank, alpha=cfg.alpha)
        save_file({"ws": ws.cpu()}, str(tmp / LATENTS))
        write_cameras(tmp / CAMERAS, names, cameras.cpu())
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work)  # the adapter is written: a rerun starts afresh instead of resuming a finished run
    return summary


def _claim_work_dir(work: Path, run: dict) -> None:
    """Create `work`, or check that the unfinished run in it had the same photos, base and settings:
    resuming checkpoints of another run would mix two trainings (or fail on shapes)."""
    run = json.loads(json.dumps(run))  # tuples -> lists, as they come back from disk
    record = work / RUN
    if record.is_file():
        before = json.loads(record.read_text())
        if before != run:
            differ = sorted(k for k in run if before.get(k) != run[k] and k != "config")
            differ += sorted(k for k in run["config"] if before.get("config", {}).get(k) != run["config"][k])
            raise ValueError(f"{work} holds an unfinished run with other settings ({', '.join(differ)}); "
                             f"rerun with the same photos and options to resume it, or delete {work} to start over")
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(run, indent=2) + "\n")


def load_personalized(G, adapter: str | Path):
    """Apply an adapter folder written by `personalize` to base G; returns (G, ws, names, cameras)."""
    from safetensors.torch import load_file

    from . import lora
    from .photos import read_cameras

    adapter = Path(adapter)
    if not (adapter / SUMMARY).is_file():
        raise FileNotFoundError(f"{adapter} is not a personalized adapter (no {SUMMARY}); "
                                f"make one with `genfast personalize --photos DIR --out {adapter}`")
    summary = json.loads((adapter / SUMMARY).read_text())
    if summary["config"]["full_finetune"]:
        from .loader import load_converted

        G = load_converted(adapter / "generator").eval().requires_grad_(False)
    else:
        lora.load_adapter(G, adapter / LORA_DIR)  # refuses a base other than the one it was trained on
    names = summary["photos"]
    return G, load_file(str(adapter / LATENTS))["ws"], names, read_cameras(adapter / CAMERAS, names)
