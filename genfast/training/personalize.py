"""My3DGen: personalize a tri-plane generator to one person from a few photos.

1. cameras: given (an EG3D dataset.json) or fitted by analysis-by-synthesis against the frozen
   generator (yaw, pitch and a latent optimised together from several starting yaws; the best fit wins);
2. latents: one w per photo ("W" inversion; "W+", one w per layer, on request), generator frozen;
3. adapters: low-rank adapters on every modulated convolution and style affine (genfast.gan3d.lora),
   trained on the photos with their latents fixed, on the one training loop (`genfast.training.loop`):
   MSE on the super-resolved and the raw render, plus LPIPS(alex) when its weights are on disk,
   otherwise an identity-embedding term in its place; every `symmetry_every` steps, the symmetry
   regulariser: render a latent from a camera and from its exact mirror (`flip_yaw`), flip the second
   image, and penalise 1 - cosine of their identity embeddings.

The result is an adapter folder (`genfast.gan3d.adapter`, which also loads it). While a run is
unfinished its state lives in `<out>.work`, locked for the whole run: `inputs.json` (what the run
was started with, by content), the cameras and latents phases (safetensors, their sha256 in
`phases.json`) and the loop's checkpoints (safetensors + JSON + manifest). Nothing in it is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..gan3d.adapter import CAMERAS, GENERATOR_DIR, LATENTS, LORA_DIR, SUMMARY
from ..gan3d.cameras import MAX_YAW, camera_vector, ffhq_intrinsics, flip_yaw, lookat_pose, sample_cameras
from ..gan3d.identity import identity_similarity
from ..io import atomic_dir, atomic_write_text, check_output
from .checkpoint import sha256_file, tensor_hash

INPUTS = "inputs.json"  # in the work folder: what the unfinished run was started with, by content
CROPS = "crops.png"  # in the adapter: the photos as the fitting saw them (aligned crops, landmarks)
PHASES = "phases.json"  # sha256 of each finished phase's safetensors file
LATENT_SPACES = ("w", "w+")
RESUMABLE_CHANGES = ("steps", "ckpt_every", "ckpt_minutes")  # settings a rerun may change and still resume
SEGMENTS = "segments.json"  # in the work folder: wall time of each run (segment) of an unfinished personalization
STEP_PHASES = ("cameras", "latents", "adapters")  # the phases personalize(on_step=...) reports, in order


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
    ckpt_minutes: float | None = 5.0  # also checkpoint once this long has passed since the last one (None: off)
    batch: int = 10  # photos rendered together; more are fitted and trained in chunks of this many (flat memory)
    seed: int = 0

    def __post_init__(self):
        from ..gan3d.lora import CONV_LAYOUTS

        ints = {"rank": 1, "steps": 1, "symmetry_every": 1, "invert_steps": 1, "camera_steps": 1,
                "camera_resolution": 4, "ckpt_every": 1, "batch": 1, "seed": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        numbers = {"alpha": "> 0", "lr": "> 0", "invert_lr": "> 0", "symmetry_weight": "> 0", "identity_weight": ">= 0"}
        if self.ckpt_minutes is not None:
            numbers["ckpt_minutes"] = "> 0"
        for name, bound in numbers.items():
            value = getattr(self, name)
            ok = (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
                  and (value > 0 if bound == "> 0" else value >= 0))
            if not ok:
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
        for name in ("train_biases", "full_finetune", "symmetry"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")  # noqa: TRY004 -- config errors are ValueErrors
        if self.latent_space not in LATENT_SPACES:
            raise ValueError(f"latent_space must be one of {', '.join(LATENT_SPACES)}, got {self.latent_space!r}")
        if self.conv_layout not in CONV_LAYOUTS:
            raise ValueError(f"conv_layout must be one of {', '.join(CONV_LAYOUTS)}, got {self.conv_layout!r}")
        starts = self.camera_starts
        if (not isinstance(starts, tuple) or not starts
                or not all(isinstance(y, int | float) and abs(y) <= MAX_YAW for y in starts)):
            raise ValueError(f"camera_starts must be a non-empty tuple of yaws in [-{MAX_YAW}, {MAX_YAW}] rad, "
                             f"got {starts!r}")
        # options that would change nothing are refused rather than silently ignored
        fields = PersonalizeConfig.__dataclass_fields__
        for switch, off, names in (("full_finetune=True", self.full_finetune, ("rank", "alpha", "conv_layout",
                                                                                 "train_biases")),
                                   ("symmetry off", not self.symmetry, ("symmetry_every", "symmetry_weight"))):
            moot = [n for n in names if getattr(self, n) != fields[n].default] if off else []
            if moot:
                raise ValueError(f"{', '.join(moot)} has no effect with {switch}: leave it at the default")


def _render(G, ws, cams):
    return G.synthesis(ws, cams, deterministic=True)


def _recon(out, target):
    """MSE on the super-resolved image and on the raw render (target resized), targets in [-1, 1]."""
    raw_target = F.interpolate(target, size=out["image_raw"].shape[-2:], mode="area")
    return F.mse_loss(out["image"], target) + F.mse_loss(out["image_raw"], raw_target)


def _cameras(yaw, pitch, n):
    pose = lookat_pose(math.pi / 2 + yaw, math.pi / 2 + pitch)
    return camera_vector(pose, ffhq_intrinsics().expand(n, 3, 3))


def chunks(n: int, size: int) -> list[slice]:
    """n items as ceil(n / size) consecutive slices of near-equal length (11 at size 10: 5 and 6)."""
    k = -(-n // size)
    return [slice(i * n // k, (i + 1) * n // k) for i in range(k)]


def device_of(module) -> torch.device:
    """Where a module's parameters live: photos, cameras and latents are moved there."""
    return next(module.parameters()).device


INIT_TRUST = 0.15  # rad: how far analysis-by-synthesis may move yaw and pitch from a landmark estimate


def fit_cameras(G, targets: torch.Tensor, cfg: PersonalizeConfig, progress: bool = True,
                init: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
    """(N, 25) cameras for photos (N, 3, H, W) in [-1, 1]: yaw, pitch and w fitted together, best of several starts.

    ``init`` (N, 2): yaw and pitch offsets from frontal (radians) estimated from face landmarks
    (`genfast.data.faces`): the one start per photo instead of ``cfg.camera_starts``, and the fit stays
    within ``INIT_TRUST`` of it (a prior that does not know real faces would otherwise pull frontal
    portraits towards steep pitches). A short plain optimisation (not the training loop): its result
    is a phase file of the run. ``on_step()``, when given, runs after every optimizer step.
    """
    if init is not None and tuple(init.shape) != (len(targets), 2):
        raise ValueError(f"init must be (N, 2) yaw and pitch offsets for {len(targets)} photos, got {tuple(init.shape)}")
    if len(targets) > cfg.batch:  # each photo's fit is its own (summed losses): a batch at a time keeps memory flat
        return torch.cat([fit_cameras(G, targets[part], cfg, progress, None if init is None else init[part],
                                      on_step) for part in chunks(len(targets), cfg.batch)])
    targets = targets.to(device_of(G))
    if init is None:
        n, k = len(targets), len(cfg.camera_starts)
        yaw = torch.tensor(cfg.camera_starts, dtype=torch.float64, device=targets.device).repeat(n)
        pitch = torch.zeros(n * k, dtype=torch.float64, device=targets.device)
        low = torch.tensor([-1.2, -0.5], dtype=torch.float64, device=targets.device)[:, None].expand(2, n * k)
        high = -low
    else:
        n, k = len(targets), 1
        init = init.to(targets.device, torch.float64)
        yaw, pitch = init[:, 0].clone(), init[:, 1].clone()
        low, high = (init.T - INIT_TRUST).clamp(min=-1.2), (init.T + INIT_TRUST).clamp(max=1.2)
    yaw, pitch = yaw.requires_grad_(True), pitch.requires_grad_(True)
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
            yaw.copy_(torch.minimum(torch.maximum(yaw, low[0]), high[0]))
            pitch.copy_(torch.minimum(torch.maximum(pitch, low[1]), high[1]).clamp(-0.5, 0.5))
        if on_step is not None:
            on_step()
    best = per_image.detach().view(n, k).argmin(1) + torch.arange(n, device=targets.device) * k
    return _cameras(yaw.detach()[best], pitch.detach()[best], n).float()


def invert(G, targets: torch.Tensor, cams: torch.Tensor, cfg: PersonalizeConfig, progress: bool = True,
           share: float = 1.0, on_step=None):
    """Latents of photos with the generator frozen, ws (N, num_ws, w_dim): one w per photo repeated over
    the layers ("w"), or one per layer ("w+", started from the same w_avg).

    More than ``cfg.batch`` photos are inverted a batch at a time, each batch's mean loss weighted by its
    ``share`` of the photos: every w gets the gradient it would get in one batch of all, in flat memory.
    ``on_step()``, when given, runs after every optimizer step.
    """
    if len(targets) > cfg.batch:
        n = len(targets)
        return torch.cat([invert(G, targets[part], cams[part], cfg, progress, share=(part.stop - part.start) / n,
                                 on_step=on_step) for part in chunks(n, cfg.batch)])
    targets, cams = targets.to(device_of(G)), cams.to(device_of(G))
    layers = G.num_ws if cfg.latent_space == "w+" else 1
    w = G.backbone.mapping.w_avg.detach()[None, None].repeat(len(targets), layers, 1).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.invert_lr)
    for _ in tqdm(range(cfg.invert_steps), desc=f"invert photos ({cfg.latent_space})", disable=not progress):
        loss = _recon(_render(G, w.expand(-1, G.num_ws, -1), cams), targets)
        if share != 1.0:
            loss = loss * share
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    return w.detach().expand(-1, G.num_ws, -1).contiguous()


def identity_name(identity) -> str:
    from ..gan3d.arcface import ArcFaceIRSE50

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


def symmetry_loss(G, ws, identity, generator: torch.Generator | None = None,
                  cams: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cos(identity(render(c)), identity(flip(render(flip_yaw(c))))) for a random camera per latent
    (drawn from ``generator``), or for the given ``cams`` (one per latent)."""
    if cams is None:
        cams = sample_cameras(len(ws), generator, intrinsics=ffhq_intrinsics())
    cams = cams.to(ws.device)
    both = _render(G, torch.cat([ws, ws]), torch.cat([cams, flip_yaw(cams)]))["image"]
    a, b = both.chunk(2)
    return (1 - identity_similarity(identity, a, b.flip(-1))).mean()


def _trainable(G, cfg: PersonalizeConfig):
    from ..gan3d import lora

    if cfg.full_finetune:
        G.requires_grad_(False)
        for part in (G.backbone.synthesis, G.superresolution):
            part.requires_grad_(True)
        return [p for p in G.parameters() if p.requires_grad]
    lora.add_lora(G, rank=cfg.rank, alpha=cfg.alpha, train_biases=cfg.train_biases, conv_layout=cfg.conv_layout)
    return lora.lora_parameters(G)


def work_dir_of(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".work")


def personalize(G, names: list[str], photos: torch.Tensor, out: str | Path, cfg: PersonalizeConfig,
                cameras: torch.Tensor | None = None, identity=None, progress: bool = True, log=print,
                ws: torch.Tensor | None = None, camera_init: torch.Tensor | None = None,
                alignment: dict | None = None, crops_png: bytes | None = None, on_step=None) -> dict:
    """Fit G (modified in place: adapters added) to photos (N, 3, H, W) in [0, 1]; write the adapter folder.

    ``identity``: the network behind the symmetry term (and the offline LPIPS stand-in): the embedded
    genfast-identity encoder by default, or `genfast.gan3d.arcface.load_arcface` for real faces.
    ``cameras`` / ``ws``: given per photo (in the order of ``names``) instead of fitted.
    ``camera_init`` (N, 2): landmark yaw/pitch estimates the camera fit starts from (`fit_cameras`);
    ``alignment`` (how the photos were cropped) goes into the summary, ``crops_png`` (the contact sheet of
    the crops) into the adapter folder as ``crops.png``.
    ``on_step(phase, step, total)``: called after every step of each phase that runs (`STEP_PHASES`:
    camera fitting, latent inversion, adapter training; ``step`` counts 1 .. ``total`` within the phase,
    the adapters' from the step a resumed run starts at). An exception it raises stops the run there,
    resumable like any interruption (a progress bar, a cancel button).

    Resumable: rerunning with the same photos (by content: renamed files resume), base, identity
    network and settings (``steps`` and ``ckpt_every`` may change) continues from `<out>.work`;
    anything else is refused, naming what differs. A second run on the same `out` while one is
    running is refused (`WorkDirLocked`).
    """
    from ..gan3d import lora
    from ..gan3d.identity import load_identity_encoder
    from .loop import WorkDirLock

    t0 = time.time()
    out = check_adapter_out(out)  # before any work: a bad --out fails now, not after the training
    work = work_dir_of(out)
    if len(names) != len(photos):
        raise ValueError(f"{len(names)} names for {len(photos)} photos")
    base = lora.base_hash(G)
    base_parameters = sum(p.numel() for p in G.parameters())
    device = device_of(G)
    identity = (identity if identity is not None else load_identity_encoder()).to(device)
    identity_label = identity_name(identity)

    # Train in an order set by content, so that renamed (or re-sorted) photos give the same run.
    hashes = [tensor_hash(p) for p in photos]
    order = sorted(range(len(names)), key=lambda i: hashes[i])
    back = torch.tensor(order).argsort()  # canonical -> given order, for what is written out
    targets = photos[order].to(device) * 2 - 1
    given_cams = cameras[order].to(device) if cameras is not None else None
    given_ws = ws[order].to(device) if ws is not None else None
    init = camera_init[order].to(device) if camera_init is not None and cameras is None else None
    record = {
        "photos": [hashes[i] for i in order],
        "base_hash": base,
        "identity": {"network": identity_label, "sha256": lora.base_hash(identity, length=64)},
        "cameras": tensor_hash(given_cams) if given_cams is not None else (
            "fitted" if init is None else f"fitted from landmarks {tensor_hash(init)}"),
        "latents": tensor_hash(given_ws) if given_ws is not None else "inverted",
        "config": {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES},
    }

    with WorkDirLock(work) as lock:  # held from the first phase to the written adapter
        _claim_work_dir(work, record, dict(zip(hashes, names, strict=True)))
        clock = _Segments(work, t0)
        G.requires_grad_(False)
        try:
            parts = len(chunks(len(targets), cfg.batch))  # the fits run a batch at a time: their steps add up
            tick_cams = _ticker(on_step, "cameras", cfg.camera_steps * parts)
            cams = given_cams if given_cams is not None else _phase(
                work, "cameras", lambda: fit_cameras(G, targets, cfg, progress, init, tick_cams)).to(device)
            clock.save()
            tick_ws = _ticker(on_step, "latents", cfg.invert_steps * parts)
            ws = given_ws if given_ws is not None else _phase(
                work, "latents", lambda: invert(G, targets, cams, cfg, progress, on_step=tick_ws)).to(device)
            clock.save()
            trained, perceptual = _train(G, cfg, work, lock, targets, cams, ws, identity, progress, log,
                                         on_checkpoint=clock.save, on_step=on_step)
        except BaseException:  # interrupted: this segment's time still counts when the rerun finishes
            clock.save()
            raise
        segments = clock.minutes()
        summary = {"photos": list(names), "base_hash": base, "trainable_parameters": trained,
                   "generator_parameters": base_parameters, "perceptual": perceptual,
                   "identity": identity_label, "config": asdict(cfg),
                   "minutes": round(sum(segments), 2), "segments_minutes": segments}
        if alignment is not None:
            summary["alignment"] = alignment
        _write_adapter(G, out, cfg, base, names, ws[back], cams[back], summary, crops_png)
        shutil.rmtree(work)  # the adapter is written: a rerun starts afresh instead of resuming a finished run
    return summary


def _ticker(on_step, phase: str, total: int):
    """A no-argument callback that reports ``phase``'s steps to ``on_step`` as 1, 2, ... of ``total`` (None: none)."""
    if on_step is None:
        return None
    done = iter(range(1, total + 1))
    return lambda: on_step(phase, next(done), total)


class _Segments:
    """Wall time of each run (segment) of one personalization, kept in the work folder: a resumed run's
    summary reports the time of all of them, not only its own."""

    def __init__(self, work: Path, t0: float):
        self.path, self.t0 = work / SEGMENTS, t0
        try:
            self.before = json.loads(self.path.read_text())["minutes"] if self.path.is_file() else []
            self.before = [float(m) for m in self.before]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path} is not a list of minutes ({err}); delete it to go on") from None

    def minutes(self) -> list[float]:
        return [*self.before, round((time.time() - self.t0) / 60, 2)]

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"minutes": self.minutes()}) + "\n")


def check_adapter_out(out: str | Path) -> Path:
    """`check_output` for an adapter folder, which a run replaces whole: an existing folder must be an adapter
    (or empty), and its work folder, if any, a folder."""
    out = check_output(out, folder=True)
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY).is_file():
        raise ValueError(f"--out {out} is a folder that holds no adapter ({SUMMARY}); personalize replaces its "
                         f"--out whole, so give a new folder name")
    work = work_dir_of(out)
    if work.exists() and not work.is_dir():
        raise ValueError(f"{work}, the work folder of --out {out}, is a file; move it away")
    return out


def _train(G, cfg, work, lock, targets, cams, ws, identity, progress, log,
           on_checkpoint=lambda: None, on_step=None) -> tuple[int, str]:
    """Train the adapters (or every synthesis/SR weight) on the one loop; returns (parameters, perceptual).

    More than ``cfg.batch`` photos make each step several micro-batches (the loop's gradient accumulation),
    each weighted by its share of the photos: the step's gradient is that of one batch of all of them.
    """
    from .loop import LoopConfig, TrainLoop

    device = device_of(G)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the adapters' random init is a function of the settings, not of the RNG's past
        params = _trainable(G, cfg)
    # The checkpoints hold the trained tensors only (a few hundred KB of adapters, not the frozen base):
    # they go through accelerate as one module. One process trains one person, so nothing is sharded.
    holder = torch.nn.ParameterList(params)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.0, 0.99 ** 0.8))
    parts = chunks(len(targets), cfg.batch)
    loop_cfg = LoopConfig(steps=cfg.steps, checkpoint_every=cfg.ckpt_every, checkpoint_minutes=cfg.ckpt_minutes,
                          grad_accum=len(parts), desc="personalize", progress=progress, cpu=device.type == "cpu")
    perceptual = _Perceptual(identity, cfg.identity_weight)
    g = torch.Generator()

    def step(i: int):
        part = parts[loop.micro]
        out = _render(G, ws[part], cams[part])
        loss = _recon(out, targets[part]) + perceptual(out, targets[part])
        if cfg.symmetry and i % cfg.symmetry_every == 0:
            g.manual_seed(cfg.seed * 100_003 + i)  # a pure function of the step: a resumed run draws the same
            mirror = sample_cameras(len(ws), g, intrinsics=ffhq_intrinsics())[part]
            loss = loss + cfg.symmetry_weight * symmetry_loss(G, ws[part], identity, cams=mirror)
        if len(parts) > 1:  # accelerate divides every micro-batch's loss by their count; weigh it by its photos
            loss = loss * ((part.stop - part.start) * len(parts) / len(targets))
        return loss

    # run_info stays None: `_claim_work_dir` already checked the inputs (by content, before the phases)
    with TrainLoop(work, loop_cfg, models={"trained": holder}, optimizer=opt, lock=lock) as loop:
        start = loop.resume()
        if start > cfg.steps:
            raise ValueError(f"the unfinished run in {work} has trained {start} steps, more than steps={cfg.steps}; "
                             f"rerun with steps >= {start} to finish it, or delete {work} to start over")
        if start:
            log(f"[personalize] resumed at step {start}")
        loop.run(step, on_save=lambda _: on_checkpoint(),
                 on_step=None if on_step is None else lambda done: on_step("adapters", done, cfg.steps))
    return sum(p.numel() for p in params), perceptual.name


def _write_adapter(G, out: Path, cfg, base: str, names, ws, cams, summary: dict, crops_png: bytes | None = None) -> None:
    from safetensors.torch import save_file

    from ..gan3d import lora
    from ..gan3d.photos import write_cameras

    with atomic_dir(out) as tmp:
        if cfg.full_finetune:
            from ..gan3d.loader import save_converted

            save_converted(G, tmp / GENERATOR_DIR)
        else:
            lora.save_adapter(G, tmp / LORA_DIR, base_hash=base, rank=cfg.rank, alpha=cfg.alpha)
        save_file({"ws": ws.detach().cpu().contiguous()}, str(tmp / LATENTS))
        write_cameras(tmp / CAMERAS, names, cams.cpu())
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if crops_png is not None:
            (tmp / CROPS).write_bytes(crops_png)


def _phase(work: Path, name: str, compute) -> torch.Tensor:
    """A finished phase's tensor from `work/<name>.safetensors` (checked against its recorded sha256),
    or `compute()` now and keep it there. Exact float round trip: a resumed run uses the same values."""
    from safetensors.torch import load_file, save_file

    file, index = work / f"{name}.safetensors", work / PHASES
    done = json.loads(index.read_text()) if index.is_file() else {}
    if name in done:
        if not file.is_file() or sha256_file(file) != done[name]:
            raise ValueError(f"{file} is missing or was changed after the {name} phase wrote it; "
                             f"delete {work} to start afresh")
        return load_file(str(file))["value"]
    value = compute().detach().contiguous()
    tmp = file.with_name(f".{file.name}.tmp")
    save_file({"value": value.cpu()}, str(tmp))
    os.replace(tmp, file)
    atomic_write_text(index, json.dumps({**done, name: sha256_file(file)}, indent=2) + "\n")
    return value


def _claim_work_dir(work: Path, record: dict, names_by_hash: dict[str, str]) -> None:
    """Record what this run starts with, or check that the unfinished run in `work` started with the
    same inputs by content: resuming another run's phases and checkpoints would mix two trainings."""
    record = json.loads(json.dumps(record))  # tuples -> lists, as they come back from disk
    path = work / INPUTS
    if not path.is_file():
        atomic_write_text(path, json.dumps({**record, "photo_names": names_by_hash}, indent=2) + "\n")
        return
    before = json.loads(path.read_text())
    old_names = before.pop("photo_names", {})
    if before == record:
        return
    differ = []
    if before.get("photos") != record["photos"]:
        old, new = set(before.get("photos", [])), set(record["photos"])
        by_name = {n: h for h, n in old_names.items()}
        for h in sorted(new - old, key=names_by_hash.get):
            name = names_by_hash[h]
            differ.append(f"photo {name} has other content than the {name} it started with" if name in by_name
                          else f"photo {name} is not one of its photos")
        for h in sorted(old - new, key=lambda h: old_names.get(h, h)):
            differ.append(f"its photo {old_names.get(h, h[:12])} is missing")
        if not differ:
            differ.append("photos (the same images, in other numbers)")
    differ += [k for k in record if k not in ("photos", "config") and before.get(k) != record[k]]
    differ += [k for k in record["config"] if before.get("config", {}).get(k) != record["config"][k]]
    raise ValueError(f"{work} holds an unfinished run with other settings ({'; '.join(differ)}); rerun with "
                     f"the same photos and options to resume it, or delete {work} to start over")
