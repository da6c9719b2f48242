"""Class-conditional pipelines: any class-conditional denoiser in diffusers' own DiTPipeline.

The contract a denoiser meets (LaMamba-Diff, AsCAN, the DiT baseline below):
``forward(hidden_states, timestep, class_labels, return_dict=True) -> Transformer2DModelOutput``;
config fields sample_size, in_channels, out_channels (2 * in: learned sigma, whose second half
DiTPipeline drops); with K classes it keeps K + 1 label embeddings, row K the null class, onto which
DiTPipeline's hard-coded unconditional id 1000 (and id K) map.

The pipeline around it is genfast-mini's: its VAE (16x16x4 latents for 64x64 images, scaling factor
from its config) and its DDIM sampler (v-prediction on a zero-terminal-SNR schedule, trailing
spacing), with the class names of genfast.data.classes as DiTPipeline's labels.

The DiT baseline, ClassDiT, is diffusers' DiTTransformer2DModel with two changes, both for the
contract: (1) num_embeds_ada_norm = K gives K + 1 label rows per block (diffusers adds the null row)
and id 1000 is mapped onto row K; the alternative, num_embeds_ada_norm = 1000, would keep 1001 rows in
every block (diffusers' DiT has one label table per block), ~976 * width * depth parameters never
trained, which would spoil any equal-parameter comparison. (2) diffusers' own label dropout is off:
it draws a separate mask in every block (and again for the output layer), so a "dropped" label is
dropped in some blocks only; the trainer (genfast.training.class_cond) drops labels once per sample,
the same way for every backbone.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch

# ModelMixin must be a name in this module: diffusers looks it up in a component's module to find its loader
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, ModelMixin  # noqa: F401

from ..data.classes import HELDOUT_SEED, NUM_CLASSES, class_of, eval_class_labels, id2label
from ..data.shapes import SHAPE_COLORS

__all__ = ["NULL_CLASS_ID", "ClassDiT", "class_accuracy", "count_parameters", "dit_config", "evaluate_pipeline",
           "keep_labels", "label_ids", "make_pipeline", "map_null_labels", "mini_vae"]

NULL_CLASS_ID = 1000  # DiTPipeline's unconditional class id (hard-coded there)
LATENT_SIZE = 16  # genfast-mini's VAE: 64x64 images -> 16x16x4 latents
LATENT_CHANNELS = 4
DIT_PARAMS = 2_000_000  # the baseline's default size (the minis are matched to it)


def map_null_labels(class_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids with DiTPipeline's null id 1000 mapped to row `num_classes`; other ids outside 0..K are
    an error (the contract every class-conditional genfast denoiser follows)."""
    labels = torch.as_tensor(class_labels)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"class ids must be integers, got {labels.dtype}")
    labels = labels.reshape(-1).long()
    if labels.device.type != "meta":  # shapes only (FLOP counting): no values to check
        bad = (labels < 0) | ((labels > num_classes) & (labels != NULL_CLASS_ID))
        if bool(bad.any()):
            raise ValueError(f"class ids must be in 0..{num_classes - 1} (classes), {num_classes} or {NULL_CLASS_ID} "
                             f"(the null class), got {sorted(set(labels[bad].tolist()))[:5]}")
    return torch.where(labels == NULL_CLASS_ID, torch.full_like(labels, num_classes), labels)


class ClassDiT(DiTTransformer2DModel):
    """DiTTransformer2DModel under the class-conditional contract (see the module's docstring):
    num_embeds_ada_norm is the number of classes K; ids K and 1000 are the null class."""

    def __init__(self, **config):
        super().__init__(**config)
        for block in self.transformer_blocks:  # label dropout is the trainer's, once per sample
            block.norm1.emb.class_embedder.dropout_prob = 0.0

    # diffusers reads a model's config keys off its __init__ signature: give it the parent's
    __init__.__signature__ = inspect.signature(DiTTransformer2DModel.__init__)

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None,
                return_dict: bool = True):
        if class_labels is None:
            raise ValueError("ClassDiT needs class_labels: class ids, or 1000 for the unconditional (null) class")
        labels = map_null_labels(class_labels, self.config.num_embeds_ada_norm).to(hidden_states.device)
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        return super().forward(hidden_states, timestep=timestep, class_labels=labels,
                               cross_attention_kwargs=cross_attention_kwargs, return_dict=return_dict)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _dit(width: int, layers: int, num_classes: int, sample_size: int, in_channels: int) -> dict:
    head_dim = 32 if width % 32 == 0 else 16  # the head count changes no parameter count, only kernel shapes
    return {"num_attention_heads": width // head_dim, "attention_head_dim": head_dim, "in_channels": in_channels,
            "out_channels": 2 * in_channels, "num_layers": layers, "sample_size": sample_size, "patch_size": 2,
            "num_embeds_ada_norm": num_classes, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False}


def _count(config: dict) -> int:
    with torch.device("meta"):
        return count_parameters(ClassDiT(**config))


def dit_config(params_target: int = DIT_PARAMS, layers: int | None = None, num_classes: int = NUM_CLASSES,
               sample_size: int = LATENT_SIZE, in_channels: int = LATENT_CHANNELS) -> dict:
    """A ClassDiT config (patch 2, learned sigma) with about `params_target` parameters: `ClassDiT(**config)`.

    Widths are multiples of 16, depths 1..28 (or `layers`). Of the configs within 5% of the target, the
    one whose width / depth is nearest 16 is chosen (a mini keeps some depth: 2M -> 7 layers of 112);
    with `layers` given, or none within 5%, the one with the nearest count.
    """
    def integer(name, value, low, high):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"dit_config: {name} must be an integer in {low}..{high}, got {value!r}")

    integer("params_target", params_target, 10_000, 10**10)
    integer("num_classes", num_classes, 1, NULL_CLASS_ID - 1)
    if layers is not None:
        integer("layers", layers, 1, 28)
    if sample_size % 2:
        raise ValueError(f"dit_config: sample_size must be even (patch size 2), got {sample_size}")
    candidates = []
    for width in range(16, 1153, 16):
        one, two = (_count(_dit(width, n, num_classes, sample_size, in_channels)) for n in (1, 2))
        base, block = 2 * one - two, two - one  # the count is base + layers * block
        for depth in [layers] if layers is not None else range(1, 29):
            candidates.append((abs(base + depth * block - params_target) / params_target, width, depth))
    near = [c for c in candidates if c[0] <= 0.05] if layers is None else []
    _, width, depth = (min(near, key=lambda c: (abs(math.log(c[1] / c[2] / 16)), c[0])) if near
                       else min(candidates))
    return _dit(width, depth, num_classes, sample_size, in_channels)


def mini_vae() -> AutoencoderKL:
    """genfast-mini's autoencoder (assets/genfast-mini/vae), frozen, in eval mode."""
    from ..models import MINI, asset_path

    return AutoencoderKL.from_pretrained(asset_path(MINI) / "vae", local_files_only=True).eval().requires_grad_(False)


def make_pipeline(transformer: torch.nn.Module, vae: AutoencoderKL | None = None, scheduler=None) -> DiTPipeline:
    """A DiTPipeline around a class-conditional denoiser: genfast-mini's VAE and DDIM sampler (unless given),
    labels "red circle" ... "purple star" (`pipe.get_label_ids(["red circle"])`, or label_ids(pipe, ...)).

    The labels are also recorded for model_index.json, so DiTPipeline.from_pretrained(folder) has them
    (diffusers needs the denoiser's module imported first: `import genfast.pipelines.class_conditional`
    for ClassDiT; it does not import modules a folder names)."""
    from ..training.mini import inference_scheduler

    config = transformer.config
    for key in ("sample_size", "in_channels", "out_channels"):
        if key not in config:
            raise TypeError(f"{type(transformer).__name__}'s config has no {key!r}: DiTPipeline reads sample_size, "
                            f"in_channels and out_channels (the class-conditional contract)")
    vae = vae if vae is not None else mini_vae()
    if config.in_channels != vae.config.latent_channels:
        raise ValueError(f"the denoiser takes {config.in_channels} channels but the VAE's latents have "
                         f"{vae.config.latent_channels}")
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler or inference_scheduler(),
                       id2label=id2label())
    return keep_labels(pipe)


def keep_labels(pipe: DiTPipeline) -> DiTPipeline:
    """Record `pipe.labels` in its config, so save_pretrained writes them to model_index.json.

    DiTPipeline takes id2label but never records it: a pipeline loaded with from_pretrained and saved
    again loses its labels unless this is called first."""
    names: dict[int, list[str]] = {}
    for name, cid in pipe.labels.items():
        names.setdefault(cid, []).append(name)
    pipe.register_to_config(id2label={str(cid): ", ".join(n) for cid, n in sorted(names.items())})
    return pipe


def label_ids(pipe: DiTPipeline, labels: str | Sequence[str]) -> list[int]:
    """Class ids of label names: one name or a list. (DiTPipeline.get_label_ids takes a list; given a
    bare string it splits it into characters.)"""
    return pipe.get_label_ids([labels] if isinstance(labels, str) else list(labels))


def class_accuracy(images: torch.Tensor, labels: Sequence[int] | torch.Tensor, evaluator) -> dict[str, float]:
    """The fraction of images the embedded evaluator classifies as their class (shape and colour both
    right), and of each head alone. images: (N, 3, H, W) in [-1, 1]; labels: N class ids."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels: give one class id per image")
    if len(labels) == 0:
        raise ValueError("class_accuracy needs at least one image")
    for cid in labels.tolist():
        class_of(cid)  # range check, with the error naming it
    preds = evaluator.predict(images)
    shape_ok = preds["shape"] == labels // len(SHAPE_COLORS)
    color_ok = preds["color"] == labels % len(SHAPE_COLORS)
    return {"class": (shape_ok & color_ok).float().mean().item(), "shape": shape_ok.float().mean().item(),
            "color": color_ok.float().mean().item()}


@torch.no_grad()
def evaluate_pipeline(pipe: DiTPipeline, evaluator, n: int = 96, guidance_scale: float = 4.0,
                      num_inference_steps: int = 20, batch_size: int = 48, seed: int = HELDOUT_SEED) -> dict:
    """Class accuracy of `n` images sampled for the balanced held-out labels (every class in turn)."""
    labels = eval_class_labels(n)
    images = []
    for start in range(0, n, batch_size):
        chunk = labels[start:start + batch_size]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
        images.append(pipe(chunk, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                           generator=gen, output_type="pt").images.cpu() * 2 - 1)
    return class_accuracy(torch.cat(images), labels, evaluator)

