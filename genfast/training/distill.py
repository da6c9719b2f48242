"""`genfast distill`: SAS distillation of an assembled student, with progressive incubation.

The student (a pruned UNet from genfast.assembly, weights inherited from its teacher) learns from
the frozen teacher pipeline on the teacher's own noise schedule (DDPMScheduler built from the
pipeline's scheduler config; epsilon or v-prediction targets), with genfast-mini's data recipe:
a pool of images encoded once by the teacher's VAE, captions drawn per step, some left empty for
classifier-free guidance. Losses, each with its weight (0 removes the term):

  task     MSE(student prediction, target), min-SNR weighted per sample as genfast-mini was trained
  kd_out   MSE(student prediction, teacher prediction)                              (BK-SDM)
  kd_feat  sum over paired blocks of the per-layer feature term: ||f_s - f_t||^2 / ||f_t||^2
           (mean over the batch; LAPTOP-Diff's normalisation, so no layer dominates), or with
           feature_norm=False BK-SDM's plain MSE. Pairs: the outputs of every down block, the mid
           block when both have one, every up block, matched through stage_map. Where the student's
           innermost down stage has no downsampler but its teacher stage has one (a dropped stage),
           the teacher's feature is taken before its downsampler, at the student's resolution.
  sas      semantic term: the clean latents x0 that teacher and student predict are decoded by the
           frozen VAE (gradients flow through it to the student) and embedded by the SAS encoder
           (genfast-mini's evaluator, or a CLIP image encoder); the term is the mean over the samples
           of ||e_s - e_t||^2 of the L2-normalised embeddings, i.e. 2 * (1 - cosine).

Progressive incubation -- our reading of Deep Incubation (Ni, ..., Gao Huang) for UNets: before the
end-to-end steps each student unit is trained in place inside the frozen teacher (a hybrid
network: the teacher with that unit swapped in), loss = kd_out on the hybrid's output against the
teacher's (+ task). Units: the outer stage pairs (student down i with student up n-1-i, which
replace the teacher's mapped down/up blocks -- the skip tensors they exchange fit, as an up block
consumes len(resnets) skips) and the innermost bracket (the student's innermost down stage, its mid
block or none, its first up stage), which replaces the teacher from that stage inward. Units take
incubation steps round-robin, so each is trained as if alone (the others' gradients stay None, and
AdamW leaves such parameters untouched). Everything runs on one TrainLoop (incubation steps first,
then the end-to-end ones; the phase follows from the step), so an interrupted run resumes exactly.

`<work_dir>/distill_log.jsonl` gets one record per step: every weighted term, the total, the learning
rate and the step's seconds; the first end-to-end step also records each layer's feature term both
normalised (feat_layers) and as plain MSE (feat_layers_mse). Under `accelerate launch` each process
takes its share of every batch; the end-to-end steps sync through DDP, the incubation steps (whose
hybrid forward bypasses DDP's wrapper) through gradient hooks.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ..io import atomic_dir, atomic_write_text
from .checkpoint import sha256_file, state_hash
from .loop import MIXED_PRECISION, LoopConfig, TrainLoop, WorkDirLock

__all__ = ["DistillConfig", "Unit", "check_pipeline", "distill", "feature_pairs", "hybrid_unet", "incubation_units", "read_log",
           "run_distill", "save_distilled"]

LOG_NAME = "distill_log.jsonl"
POOL_NAME = "latent_pool.safetensors"
INFO_NAME = "distill.json"
WEIGHTS = ("task", "kd_out", "kd_feat", "sas")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PREDICTIONS = ("epsilon", "v_prediction")
# defaults of the options that only apply with their loss term (None in the config = unset)
DEFAULT_SNR_GAMMA = 5.0  # genfast-mini's recipe
DEFAULT_SAS_BATCH = 16
DEFAULT_POOL = 10_000
WEIGHT_DECAY = 1e-2  # as genfast-mini and BK-SDM
# fields that steer the run but not its result: a resumed run may change them
_RUN_CONTROL = ("checkpoint_every", "max_minutes")


@dataclass
class DistillConfig:
    """Every number that decides a distillation run (validated; an option without effect is an error).

    steps: end-to-end steps; incubation_steps: steps before them, shared round-robin by the units
    (0: no incubation). Loss weights task / kd_out / kd_feat / sas (0 removes the term).
    feature_norm (kd_feat): True (default) LAPTOP-Diff's per-layer normalisation, False BK-SDM's MSE.
    sas_encoder (sas): "evaluator" (default; genfast-mini's embedded classifier) or a local folder of a
    transformers CLIPVisionModelWithProjection. sas_batch (sas): how many samples of each batch are
    decoded for the term (default 16, at most batch_size). min_snr_gamma (task): min-SNR weight of the
    task term (default 5; 0: unweighted). data: "shapes" (genfast-mini's procedural data; pool_size
    images, default 10000, encoded once and cached in the work folder) or a folder of images with
    same-stem .txt captions (resolution: their side after a centre crop; default the teacher's).
    ema: EMA decay (None: off); the returned student then holds the averaged weights.
    """

    steps: int = 1000
    incubation_steps: int = 0
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 50
    task: float = 1.0
    kd_out: float = 1.0
    kd_feat: float = 1.0
    sas: float = 1.0  # like BK-SDM's other weights; at 1.0 its step-0 size on genfast-mini is close to kd_out's
    feature_norm: bool | None = None
    sas_encoder: str | None = None
    sas_batch: int | None = None
    min_snr_gamma: float | None = None
    data: str = "shapes"
    pool_size: int | None = None
    resolution: int | None = None
    p_uncond: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250
    max_minutes: float | None = None
    ema: float | None = None
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    cpu: bool = False

    def __post_init__(self):
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DistillConfig.{name} must be an integer >= {low}, got {value!r}")

        for name, low in (("steps", 1), ("incubation_steps", 0), ("batch_size", 1), ("warmup", 0),
                          ("checkpoint_every", 1), ("seed", 0)):
            integer(name, low)
        for name in WEIGHTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"DistillConfig.{name} (a loss weight) must be a number >= 0, got {value!r}")
        if not any(getattr(self, n) for n in WEIGHTS):
            raise ValueError(f"DistillConfig: every loss weight ({', '.join(WEIGHTS)}) is 0; give at least one > 0")
        if self.incubation_steps and not (self.task or self.kd_out):
            raise ValueError("DistillConfig.incubation_steps: incubation trains on the task and kd_out terms, both "
                             "weighted 0; give task or kd_out > 0, or set incubation_steps=0")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"DistillConfig.lr must be > 0, got {self.lr!r}")
        for name in ("max_minutes", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"DistillConfig.{name} must be None or > 0, got {value!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"DistillConfig.p_uncond must be in [0, 1), got {self.p_uncond!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"DistillConfig.ema (the EMA decay) must be None or in (0, 1), got {self.ema!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"DistillConfig.mixed_precision must be one of {MIXED_PRECISION}, "
                             f"got {self.mixed_precision!r}")
        # options of one loss term: refused when that term is off
        for weight, options in (("task", ("min_snr_gamma",)), ("kd_feat", ("feature_norm",)),
                                ("sas", ("sas_encoder", "sas_batch"))):
            for option in options:
                if getattr(self, weight) == 0 and getattr(self, option) is not None:
                    raise ValueError(f"DistillConfig.{option} has no effect with {weight}=0: leave it unset, or "
                                     f"give {weight} a weight > 0")
        if self.feature_norm is not None and not isinstance(self.feature_norm, bool):
            raise ValueError(f"DistillConfig.feature_norm must be True, False or None, got {self.feature_norm!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma >= 0:
            raise ValueError(f"DistillConfig.min_snr_gamma must be >= 0 (0: unweighted), got {self.min_snr_gamma!r}")
        if self.sas_batch is not None:
            integer("sas_batch", 1)
            if self.sas_batch > self.batch_size:
                raise ValueError(f"DistillConfig.sas_batch must be in 1..batch_size ({self.batch_size}), "
                                 f"got {self.sas_batch}")
        if self.sas_encoder is not None and self.sas_encoder != "evaluator":
            folder = Path(self.sas_encoder)
            if not (folder / "config.json").is_file():
                raise ValueError(f"DistillConfig.sas_encoder: {folder} is not a model folder (no config.json); give "
                                 f"'evaluator' or a local folder of a transformers CLIPVisionModelWithProjection")
        if self.data == "shapes":
            if self.resolution is not None:
                raise ValueError("DistillConfig.resolution has no effect with data='shapes' (rendered at 64x64); it "
                                 "sizes the images of a data folder")
            if self.pool_size is not None:
                integer("pool_size", 1)
        else:
            if not Path(self.data).is_dir():
                raise ValueError(f"DistillConfig.data must be 'shapes' or a folder of images with .txt captions; "
                                 f"{self.data!r} is neither")
            if self.pool_size is not None:
                raise ValueError("DistillConfig.pool_size has no effect with a data folder (all its images are "
                                 "used); it sizes data='shapes'")
            if self.resolution is not None:
                integer("resolution", 8)

    # --- the options with their defaults filled in ---
    @property
    def total_steps(self) -> int:
        return self.incubation_steps + self.steps

    @property
    def norm_features(self) -> bool:
        return self.feature_norm is not False

    @property
    def sas_encoder_name(self) -> str:
        return self.sas_encoder or "evaluator"

    @property
    def sas_count(self) -> int:
        return self.sas_batch or min(DEFAULT_SAS_BATCH, self.batch_size)

    @property
    def snr_gamma(self) -> float:
        return DEFAULT_SNR_GAMMA if self.min_snr_gamma is None else float(self.min_snr_gamma)

    @property
    def shapes_pool(self) -> int:
        return self.pool_size or DEFAULT_POOL

    def effective(self) -> dict:
        """The config as JSON, unset options replaced by what the run uses (None where a term is off)."""
        d = dataclasses.asdict(self)
        d["feature_norm"] = self.norm_features if self.kd_feat else None
        d["sas_encoder"] = self.sas_encoder_name if self.sas else None
        d["sas_batch"] = self.sas_count if self.sas else None
        d["min_snr_gamma"] = self.snr_gamma if self.task else None
        d["pool_size"] = self.shapes_pool if self.data == "shapes" else None
        return d


# ---------------------------------------------------------------- teacher/student structure

@dataclass
class Unit:
    """A group of student blocks trained together in place inside the teacher during incubation."""

    name: str
    down: list[int]  # student down block indices
    up: list[int]  # student up block indices
    mid: bool  # whether the student's mid block (if any) belongs to it


def incubation_units(n_student: int) -> list[Unit]:
    """The outer stage pairs, outermost first, then the innermost bracket."""
    n = n_student
    units = [Unit(f"stage{i}", [i], [n - 1 - i], False) for i in range(n - 1)]
    return units + [Unit(f"inner{n - 1}", [n - 1], [0], True)]


def _shallow_unet(teacher, downs, mid, ups):
    """The teacher with other blocks in its lists: a shallow copy, every parameter shared.

    UNet2DConditionModel.forward just iterates down_blocks / mid_block / up_blocks, so swapping them
    makes a hybrid network for the price of three list objects.
    """
    h = copy.copy(teacher)
    h.__dict__["_modules"] = dict(teacher._modules)  # the copy's own table: the teacher keeps its blocks
    h._modules["down_blocks"] = torch.nn.ModuleList(downs)
    h._modules["up_blocks"] = torch.nn.ModuleList(ups)
    h._modules["mid_block"] = mid
    h.num_upsamplers = sum(1 for b in ups[:-1] if getattr(b, "upsamplers", None) is not None)
    return h


def hybrid_unet(teacher, student, unit: Unit, smap: dict) -> UNet2DConditionModel:
    """The teacher with `unit`'s student blocks in place of the teacher blocks they replace."""
    n_s, n_t = len(student.down_blocks), len(teacher.down_blocks)
    downs, ups = list(teacher.down_blocks), list(teacher.up_blocks)
    if not unit.mid:  # an outer pair: one down and its mirrored up block swapped
        (i,), (j,) = unit.down, unit.up
        td, tu = smap["down"][i], smap["up"][j]
        if tu != n_t - 1 - td:
            raise ValueError(f"stage map {smap}: student down {i} / up {j} replace teacher down {td} / up {tu}, "
                             f"which are not mirror stages; incubation needs mirrored pairs")
        downs[td], ups[tu] = student.down_blocks[i], student.up_blocks[j]
        return _shallow_unet(teacher, downs, teacher.mid_block, ups)
    td, tu = smap["down"][n_s - 1], smap["up"][0]
    return _shallow_unet(teacher, downs[:td] + [student.down_blocks[n_s - 1]], student.mid_block,
                         [student.up_blocks[0]] + ups[tu + 1:])


def feature_pairs(teacher, student, smap: dict) -> list[tuple[str, str, str, bool]]:
    """(student block, teacher block, kind, teacher feature before its downsampler) for feature KD."""
    pairs = []
    for i, t in sorted(smap["down"].items()):
        pre = (getattr(teacher.down_blocks[t], "downsamplers", None) is not None
               and getattr(student.down_blocks[i], "downsamplers", None) is None)
        pairs.append((f"down_blocks.{i}", f"down_blocks.{t}", "down", pre))
    if student.mid_block is not None and teacher.mid_block is not None:
        pairs.append(("mid_block", "mid_block", "mid", False))
    for j, t in sorted(smap["up"].items()):
        pairs.append((f"up_blocks.{j}", f"up_blocks.{t}", "up", False))
    return pairs


class _Capture:
    """Forward hooks keeping block outputs while `active` (plain torch hooks: they only read)."""

    def __init__(self):
        self.active = False
        self.out: dict[str, object] = {}
        self.handles = []

    def watch(self, key: str, module: torch.nn.Module):
        def hook(_module, _args, output):
            if self.active:
                self.out[key] = output

        self.handles.append(module.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _feature(output, kind: str, pre_downsample: bool) -> torch.Tensor:
    if kind == "down":
        hidden, states = output  # states: each layer's output, then the downsampled one
        return states[-2] if pre_downsample else hidden
    return output


def feature_terms(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised, plain) feature terms of one layer: mean over the batch of ||fs - ft||^2 / ||ft||^2,
    and the MSE over all elements."""
    fs, ft = fs.float(), ft.float()
    diff = (fs - ft).flatten(1).pow(2).sum(1)
    norm = ft.flatten(1).pow(2).sum(1).clamp_min(1e-12)
    return (diff / norm).mean(), F.mse_loss(fs, ft)


# ---------------------------------------------------------------- SAS encoders

class _SASEncoder(torch.nn.Module):
    """Semantic features of images in [-1, 1]: genfast-mini's evaluator or a CLIP image encoder."""

    def __init__(self, name: str):
        super().__init__()
        if name == "evaluator":
            from ..models import load_evaluator

            self.model = load_evaluator()
            self.size = int(self.model.config.image_size)
            self.kind = "evaluator"
        else:
            from transformers import CLIPVisionModelWithProjection
            from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

            try:
                self.model = CLIPVisionModelWithProjection.from_pretrained(name, local_files_only=True)
            except (OSError, ValueError) as err:
                raise ValueError(f"sas_encoder {name}: cannot load a CLIPVisionModelWithProjection there ({err})") \
                    from None
            self.size = int(self.model.config.image_size)
            mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
            pre = Path(name) / "preprocessor_config.json"
            if pre.is_file():  # the model's own normalisation when its folder says it
                info = json.loads(pre.read_text())
                mean, std = info.get("image_mean", mean), info.get("image_std", std)
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
            self.kind = "clip"
        self.model.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        if self.kind == "evaluator":
            return self.model.embed(x)
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.model(pixel_values=x).image_embeds


# ---------------------------------------------------------------- data

def _folder_items(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a data folder; every image needs a same-stem .txt caption."""
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        names = ", ".join(p.with_suffix(".txt").name for p in missing[:3])
        raise ValueError(f"data folder {folder}: {len(missing)} of {len(images)} images have no caption file "
                         f"({names}{' ...' if len(missing) > 3 else ''}); write each image's caption in a .txt "
                         f"file of the same name beside it")
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in images]


def _encode(vae, images: torch.Tensor, device) -> torch.Tensor:
    """Scaled latents (the mode of the posterior) of images in [-1, 1], in chunks."""
    out = []
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        for chunk in images.split(128):
            z = vae.encode(chunk.to(device, vae.dtype)).latent_dist.mode()
            out.append(((z - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out).contiguous()


class _Data:
    """The latent pool and its captions; a batch is a pure function of the step (exact resume)."""

    def __init__(self, config: DistillConfig, pipe, work_dir: Path, device, key: dict):
        from ..data.shapes import CaptionStyle, ShapesDataset, to_tensor

        self.config = config
        self.tokenizer = pipe.tokenizer
        self.captions = self.scenes = None
        if config.data == "shapes":
            ds = ShapesDataset(config.shapes_pool, seed=config.seed, style=CaptionStyle())
            self.scenes, self.style = [ds.scene(i) for i in range(len(ds))], ds.style
        else:
            items = _folder_items(Path(config.data))
            self.captions = [c for _, c in items]
        path, key_text = work_dir / POOL_NAME, json.dumps(key, sort_keys=True)
        self.latents = _cached_pool(path, key_text)
        if self.latents is None:
            if config.data == "shapes":
                images = to_tensor(np.stack([ds.sample(i)[0] for i in range(len(ds))]))
            else:
                images = _load_images([p for p, _ in items], key["resolution"])
            self.latents = _encode(pipe.vae, images, device)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"latents": self.latents}, str(tmp), metadata={"key": key_text})
            os.replace(tmp, path)

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        from ..data.shapes import caption

        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 3, step])
        idx = rng.integers(0, len(self.latents), size=cfg.batch_size)
        captions = []
        for i in idx:
            if rng.random() < cfg.p_uncond:
                captions.append("")
            elif self.captions is not None:
                captions.append(self.captions[i])
            else:
                captions.append(caption(self.scenes[i], rng, self.style))
        return self.latents[torch.from_numpy(idx)], captions

    def tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids


def _cached_pool(path: Path, key_text: str) -> torch.Tensor | None:
    """The pool cached in the work folder, if it was made from the same data and VAE."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("key") != key_text:
            return None
    return load_file(str(path))["latents"]


def _load_images(paths: list[Path], resolution: int) -> torch.Tensor:
    """Images centre-cropped to a square and resized to `resolution`, as (N, 3, R, R) in [-1, 1]."""
    from PIL import Image

    from ..data.shapes import to_tensor

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution),
                                                                      Image.Resampling.BICUBIC)
            out.append(np.asarray(im))
    return to_tensor(np.stack(out))


# ---------------------------------------------------------------- the run

def check_pipeline(pipe, student) -> None:
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"distill needs a teacher pipeline with a UNet2DConditionModel as .unet; "
                         f"{type(pipe).__name__} has {type(unet).__name__}")
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise ValueError(f"distill needs the teacher pipeline's {name}; {type(pipe).__name__} has none")
    if unet.config.addition_embed_type is not None or getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("distill supports SD-1.x/2.x-shaped teachers (one text encoder, no added conditioning); "
                         f"this UNet has addition_embed_type={unet.config.addition_embed_type!r}")
    if not isinstance(student, UNet2DConditionModel):
        raise TypeError(f"the student must be a UNet2DConditionModel (from genfast.assembly), got "
                         f"{type(student).__name__}")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ValueError(f"the teacher's scheduler predicts {prediction!r}; distill supports {PREDICTIONS}")


class _Objective:
    """The loss terms of one step, from the predictions of teacher and student (or hybrid)."""

    def __init__(self, config: DistillConfig, noise_sched, prediction: str, vae, sas_encoder, pairs, capture, device):
        self.config, self.prediction, self.vae, self.sas_encoder = config, prediction, vae, sas_encoder
        self.pairs, self.capture = pairs, capture
        self.alphas = noise_sched.alphas_cumprod.to(device)
        self.weights = {n: float(getattr(config, n)) for n in WEIGHTS if getattr(config, n)}

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        gamma = self.config.snr_gamma
        if gamma == 0:
            return torch.ones(t.shape, device=t.device)
        snr = self.alphas[t] / (1 - self.alphas[t])
        if self.prediction == "v_prediction":  # as genfast-mini: the pure-noise step keeps its weight
            return torch.clamp(snr + 1, max=gamma) / (snr + 1)
        return torch.clamp(snr, max=gamma) / snr.clamp_min(1e-8)

    def x0(self, pred, noisy, t):
        a = self.alphas[t].view(-1, 1, 1, 1)
        if self.prediction == "v_prediction":
            return a.sqrt() * noisy - (1 - a).sqrt() * pred
        return (noisy - (1 - a).sqrt() * pred) / a.sqrt().clamp_min(1e-3)  # bounded at a zero-SNR end

    def semantic(self, pred, noisy, t) -> torch.Tensor:
        """L2-normalised SAS features of the image the prediction's x0 decodes to (the VAE is frozen, but
        gradients flow through it)."""
        cfg = self.vae.config
        z = self.x0(pred, noisy, t) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return F.normalize(self.sas_encoder(self.vae.decode(z).sample).float(), dim=-1)

    def terms(self, pred, t_pred, target, noisy, t, incubating: bool, sas_n: int, layers: dict | None) -> dict:
        """{term: value} of the weighted terms; `layers` (a dict) also gets each layer's feature term."""
        w, out = self.weights, {}
        if "task" in w:
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            out["task"] = (self.snr_weight(t) * per_sample).mean()
        if "kd_out" in w:
            out["kd_out"] = F.mse_loss(pred.float(), t_pred.float())
        if incubating:  # the hybrid is trained on its output alone
            return out
        if "kd_feat" in w:
            norm, plain = {}, {}
            for s_name, t_name, kind, pre in self.pairs:
                fs = _feature(self.capture.out["s:" + s_name], kind, False)
                ft = _feature(self.capture.out["t:" + t_name], kind, pre)
                if fs.shape != ft.shape:
                    raise ValueError(f"feature KD: student {s_name} gives {tuple(fs.shape)} but teacher {t_name} "
                                     f"gives {tuple(ft.shape)}; these blocks cannot be paired")
                norm[s_name], plain[s_name] = feature_terms(fs, ft)
            out["kd_feat"] = sum((norm if self.config.norm_features else plain).values())
            if layers is not None:  # both ways, so one run shows what the normalisation does
                layers["feat_layers"] = {k: v.item() for k, v in norm.items()}
                layers["feat_layers_mse"] = {k: v.item() for k, v in plain.items()}
        self.capture.out.clear()
        if "sas" in w:
            with torch.no_grad():
                e_t = self.semantic(t_pred[:sas_n], noisy[:sas_n], t[:sas_n])
            e_s = self.semantic(pred[:sas_n], noisy[:sas_n], t[:sas_n])
            out["sas"] = (e_s - e_t).pow(2).sum(-1).mean()  # = 2 * (1 - cos)
        return out


def _lr_factor(config: DistillConfig, step: int, n_units: int) -> float:
    """Linear warmup then cosine decay, per phase: each unit's incubation steps, then the end-to-end ones."""
    if step < config.incubation_steps:
        local, total = step // n_units, math.ceil(config.incubation_steps / n_units)
    else:
        local, total = step - config.incubation_steps, config.steps
    if local < config.warmup:
        return (local + 1) / (config.warmup + 1)
    span = max(1, total - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (local - config.warmup) / span)))


class _GradSync:
    """All-reduce of the incubated unit's gradients when several processes run: a hybrid forward does not
    go through DDP's wrapper (which syncs the end-to-end steps), so its hooks would not fire."""

    def __init__(self, params, accelerator):
        self.active = False
        self.handles = []
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            world = accelerator.num_processes

            def hook(p):
                if self.active and p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)

            self.handles = [p.register_post_accumulate_grad_hook(hook) for p in params]

    def remove(self):
        for h in self.handles:
            h.remove()


def read_log(work_dir: str | os.PathLike) -> list[dict]:
    """The per-step records of a run's distill_log.jsonl (empty when there is none)."""
    path = Path(work_dir) / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trim_log(path: Path, start: int) -> None:
    """Drop records of steps a resumed run will redo (written after its checkpoint)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < start]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def _run_info(config: DistillConfig, pipe, student) -> tuple[dict, dict]:
    """(what a resumed run must match, the latent pool's key): config, teacher, data, student layout."""
    teacher, vae = pipe.unet, pipe.vae
    if config.data == "shapes":
        data_key = {"data": "shapes", "pool_size": config.shapes_pool, "seed": config.seed, "resolution": None}
    else:
        folder = Path(config.data)
        resolution = config.resolution or teacher.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        files = [(p.name, sha256_file(p)) for p in sorted(folder.iterdir()) if p.is_file()]
        data_key = {"data": str(folder.resolve()), "files": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
                    "resolution": resolution}
    data_key["vae"] = state_hash(vae)
    plan = getattr(student, "genfast_plan", None)
    run_info = {
        "config": {k: v for k, v in config.effective().items() if k not in _RUN_CONTROL},
        "teacher": state_hash(teacher, pipe.text_encoder), "data": data_key,
        "student_config": json.loads(json.dumps(dict(student.config), default=str)),
        "student_plan": plan.to_dict() if plan is not None else None,
    }
    return run_info, data_key


def distill(teacher_pipe, student_unet, work_dir: str | os.PathLike, config: DistillConfig | None = None,
            progress: bool = True, log=print):
    """Distil `teacher_pipe` (frozen) into `student_unet` (trained in place); returns the student.

    The student holds the final weights (the EMA when config.ema is set). When config.max_minutes runs
    out the run checkpoints and returns the student unfinished; calling again with the same inputs
    resumes. Every step's loss terms go to `<work_dir>/distill_log.jsonl`.
    """
    return run_distill(teacher_pipe, student_unet, work_dir, config or DistillConfig(), progress, log)[0]


def run_distill(pipe, student, work_dir: str | os.PathLike, config: DistillConfig, progress: bool = True,
                log=print) -> tuple[UNet2DConditionModel, bool]:
    """distill(), also saying whether the run finished (False: stopped by max_minutes, resumable)."""
    from ..assembly.plan import stage_map

    check_pipeline(pipe, student)
    work = Path(work_dir)
    teacher, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    smap = stage_map(teacher.config, student.config)
    units = incubation_units(len(student.down_blocks))
    if 0 < config.incubation_steps < len(units):
        raise ValueError(f"DistillConfig.incubation_steps must be 0 or >= the number of units ({len(units)}: "
                         f"{', '.join(u.name for u in units)}), got {config.incubation_steps}")
    pairs = feature_pairs(teacher, student, smap)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    run_info, data_key = _run_info(config, pipe, student)

    # frozen teacher parts, restored as they were at the end
    frozen = [m for m in (teacher, text_encoder, vae) if m is not None]
    flags = [(m, m.training, {n: p.requires_grad for n, p in m.named_parameters()}) for m in frozen]
    devices = [(m, next(m.parameters()).device) for m in frozen]
    for m in frozen:
        m.eval().requires_grad_(False)
    student.requires_grad_(True).train()

    weights = {n: float(getattr(config, n)) for n in WEIGHTS if getattr(config, n)}
    lock = WorkDirLock(work)
    capture, sync, loop = _Capture(), None, None
    try:
        opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=WEIGHT_DECAY)
        loop_config = LoopConfig(steps=config.total_steps, checkpoint_every=config.checkpoint_every,
                                 max_minutes=config.max_minutes, mixed_precision=config.mixed_precision,
                                 ema_decay=config.ema, max_grad_norm=config.max_grad_norm, desc="distill",
                                 progress=progress, cpu=config.cpu)
        loop = TrainLoop(work, loop_config, {"student": student}, opt, ema=("student",) if config.ema else (),
                         run_info=run_info, lock=lock)
        acc = loop.accelerator
        device, rank, world = acc.device, acc.process_index, acc.num_processes
        if config.batch_size % world:
            raise ValueError(f"DistillConfig.batch_size ({config.batch_size}) must divide evenly over the "
                             f"{world} processes")
        if config.sas and config.sas_count < world:  # a process without SAS samples would lose the term
            raise ValueError(f"DistillConfig.sas_batch ({config.sas_count}) must be at least the number of "
                             f"processes ({world}): each decodes its share of those samples")
        for m in frozen:
            m.to(device)
        with acc.main_process_first():  # one process encodes the pool, the others read it
            data = _Data(config, pipe, work, device, data_key)
        sas_encoder = _SASEncoder(config.sas_encoder_name).to(device) if config.sas else None
        hybrids = [hybrid_unet(teacher, student, u, smap) for u in units] if config.incubation_steps else []
        sync = _GradSync(student.parameters(), acc)
        for s_name, t_name, _, _ in pairs if "kd_feat" in weights else ():
            capture.watch("s:" + s_name, student.get_submodule(s_name))
            capture.watch("t:" + t_name, teacher.get_submodule(t_name))
        objective = _Objective(config, noise_sched, prediction, vae, sas_encoder, pairs, capture, device)
        state = {"terms": {}}

        def step_fn(step: int):
            state["t0"] = time.perf_counter()
            for group in opt.param_groups:  # the schedule is a function of the step: nothing to resume
                group["lr"] = config.lr * _lr_factor(config, step, len(units))
            x0, captions = data.batch(step)
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
            ids = data.tokens(captions)
            part = slice(rank, None, world)  # this process's share of the global batch
            x0, noise, t, ids = (v[part].to(device) for v in (x0, noise, t, ids))
            with torch.no_grad():
                cond = text_encoder(ids)[0]
            noisy = noise_sched.add_noise(x0, noise, t)
            target = noise_sched.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise
            record: dict = {"step": step}
            incubating = step < config.incubation_steps
            sync.active = incubating
            capture.active = not incubating and "kd_feat" in weights
            capture.out.clear()
            with torch.no_grad():
                t_pred = teacher(noisy, t, cond).sample
            if incubating:
                k = step % len(units)
                pred = hybrids[k](noisy, t, cond).sample
                record.update(phase="incubation", unit=units[k].name)
            else:
                pred = loop.models["student"](noisy, t, cond).sample
                record["phase"] = "end_to_end"
            sas_n = len(range(rank, config.sas_count, world))  # this process's part of the batch's first sas_count
            layers = record if step == config.incubation_steps else None  # the first end-to-end step
            terms = objective.terms(pred, t_pred, target, noisy, t, incubating, sas_n, layers)
            loss = sum(weights[n] * v for n, v in terms.items())
            values = {n: v.item() for n, v in terms.items()}  # one host read per term
            record.update(values, loss=loss.item(), lr=opt.param_groups[0]["lr"])
            state["terms"] = record
            return loss, values

        log_path = work / LOG_NAME
        start = loop.resume()
        if acc.is_main_process:
            _trim_log(log_path, start)
        if start:
            log(f"[distill] resumed at step {start} of {config.total_steps}")

        def on_step(done: int):
            if acc.is_main_process:
                record = {**state["terms"], "seconds": round(time.perf_counter() - state["t0"], 4)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if done == config.incubation_steps and config.incubation_steps:
                log(f"[distill] incubation done ({config.incubation_steps} steps over {len(units)} units)")

        finished = loop.run(step_fn, on_step)
        if finished and config.ema:
            loop.ema_models["student"].copy_to(student.parameters())
        if not finished:
            log(f"[distill] stopped at step {loop.step} of {config.total_steps} (max_minutes); run again with the "
                f"same inputs to resume")
    finally:
        capture.remove()
        if sync is not None:
            sync.remove()
        if loop is not None:
            loop.close()
        lock.release()
        for m, training, req in flags:
            m.train(training)
            for n, p in m.named_parameters():
                p.requires_grad_(req[n])
        for m, dev in devices:
            m.to(dev)
    student.eval()
    return student, finished


# ---------------------------------------------------------------- saving

def save_distilled(teacher_pipe, student, out_dir: str | os.PathLike, config: DistillConfig,
                   work_dir: str | os.PathLike | None = None) -> Path:
    """Write the distilled pipeline (the teacher's components, the student as its unet) and distill.json
    (the config, the final step's loss terms read from `work_dir`'s log) in one atomic folder."""
    from ..assembly.student import save_assembled

    if getattr(student, "genfast_plan", None) is None:
        raise ValueError("the student has no genfast_plan: distil a student made by genfast.assemble (or loaded "
                         "with genfast.assembly.student.load_student)")
    options = {k: teacher_pipe.config[k] for k in ("requires_safety_checker",) if k in teacher_pipe.config}
    pipe = type(teacher_pipe)(**{**teacher_pipe.components, "unet": student}, **options)  # as the teacher was built
    records = read_log(work_dir) if work_dir is not None else []
    final = {}
    for r in reversed(records):  # the last end-to-end record
        if r.get("phase") == "end_to_end":
            final = {k: r[k] for k in (*WEIGHTS, "loss") if k in r} | {"step": r["step"]}
            break
    first_e2e = next((r for r in records if "feat_layers" in r), None)
    info = {"config": config.effective(), "final_losses": final,
            "feature_layers_first_step": first_e2e and {"normalised": first_e2e["feat_layers"],
                                                        "mse": first_e2e["feat_layers_mse"]}}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_assembled(pipe, tmp)
        atomic_write_text(tmp / INFO_NAME, json.dumps(info, indent=2))
    return out
