"""The embedded default models in assets/: genfast-mini, its evaluator, the 3D heads prior.

They ship with the repository and load offline. `GENFAST_ASSETS` points elsewhere (a copy
next to an installed package, say).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ASSETS = Path(os.environ.get("GENFAST_ASSETS", Path(__file__).resolve().parent.parent / "assets"))
MINI = "genfast-mini"
EVALUATOR = "genfast-evaluator"
HEADS = "genfast-heads"
IDENTITY = "genfast-identity"
LATENTS_NAME = "latents.safetensors"  # the heads prior's training identities' z, next to its model
MINI_ASSEMBLED = "genfast-mini-assembled"
# the student genfast-mini-assembled is (see its model card): what `genfast assemble --preset auto
# --target-latency 0.7` chose from genfast-mini's analysis
ASSEMBLED_PLAN = '{"layers_per_block": [1, 1], "mid_block": false, "drop_stages": 1, "down_attention": [false, false]}'
DIT_CLASS, LAMAMBA_CLASS, ASCAN_CLASS = "genfast-dit-class", "genfast-lamamba-class", "genfast-ascan-class"
ASCAN_T2I = "genfast-ascan-t2i"
VAR_MINI = "genfast-var-mini"
# the backbone minis: one recipe and budget each (`make train-backbones` runs them all); the DiT is sized to
# LaMamba mini's 2,343,606 parameters (dit_config picks the nearest of its widths and depths)
_TRAIN_MODEL = {DIT_CLASS: "train-class --model dit --params 2343606", LAMAMBA_CLASS: "train-class --model lamamba-mini",
                ASCAN_CLASS: "train-class --model ascan-mini", ASCAN_T2I: "train-t2i --model ascan-t2i-mini",
                # the language-style mini: the 2M member of issue 19's sweep, at its shared budget (`make train-bits`)
                VAR_MINI: "train-var --size 2M --tokenizer-steps 800 --steps 1000"}
_REBUILT_BY = {MINI: "genfast train-mini", EVALUATOR: "genfast train-mini", HEADS: "genfast train-heads",
               IDENTITY: "genfast train-heads",
               MINI_ASSEMBLED: f"genfast distill --plan '{ASSEMBLED_PLAN}' --steps 675 --batch-size 64 "
                               f"--no-feature-norm --sas-weight 0 --out assets/{MINI_ASSEMBLED}",
               **{name: f"genfast {cmd} --half --out assets/{name} --work-dir .genfast-train/{name}"
                  for name, cmd in _TRAIN_MODEL.items()}}


def shown_path(path: Path) -> str:
    """A path as a user would type it here: relative to the working folder when it is under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def rebuild_command(name: str) -> str:
    """The command that rebuilds an embedded model's folder, writing it where genfast looks for it (ASSETS,
    which GENFAST_ASSETS moves): from the repository's root, the command `make train-backbones` runs."""
    return _REBUILT_BY.get(name, "genfast train-mini").replace(f"--out assets/{name}",
                                                                f"--out {shown_path(ASSETS / name)}")


def asset_path(name: str) -> Path:
    path = ASSETS / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"embedded model {name!r} not found at {path}. Check out the repository's assets/ folder "
            f"(or set GENFAST_ASSETS to where it is), or rebuild it with `{rebuild_command(name)}`."
        )
    return path


def pipeline_class(path: str | os.PathLike):
    """The class that loads the pipeline folder `path`: genfast's VARPipeline for a folder that names it
    (diffusers' DiffusionPipeline looks pipeline classes up in diffusers only), else DiffusionPipeline."""
    import json

    from diffusers import DiffusionPipeline

    index = json.loads((Path(path) / "model_index.json").read_text())
    if index.get("_class_name") == "VARPipeline":
        from .generators import VARPipeline

        return VARPipeline
    return DiffusionPipeline


def load_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.float32):
    """Any local diffusers pipeline folder (or genfast VARPipeline folder), loaded offline; a missing folder is
    a clear error."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no diffusers pipeline at {path}: expected a folder with model_index.json "
            f"(one written by save_pretrained)"
        )
    pipe = pipeline_class(path).from_pretrained(path, dtype=dtype, local_files_only=True)
    return pipe.to(device)


def load_mini(device: str | torch.device = "cpu", dtype=torch.float32):
    """genfast-mini as a StableDiffusionPipeline (64x64 images, 16x16x4 latents)."""
    return load_pipeline(asset_path(MINI), device, dtype)


def load_evaluator(device: str | torch.device = "cpu"):
    """The attribute classifier that judges genfast-mini's images (genfast.eval.classifier)."""
    from .eval.classifier import AttributeClassifier

    return AttributeClassifier.from_pretrained(asset_path(EVALUATOR)).to(device).eval()


def load_heads_prior(path: str | os.PathLike | None = None):
    """(TriPlaneGenerator, z): the embedded heads prior (or a train-heads folder at `path`) and its
    training identities' latents (empty when the folder has none)."""
    from safetensors.torch import load_file

    from .gan3d.loader import load_converted

    path = Path(path) if path is not None else asset_path(HEADS)
    G = load_converted(path).eval().requires_grad_(False)
    latents = path / LATENTS_NAME
    z = load_file(str(latents))["z"] if latents.is_file() else torch.empty(0, G.z_dim)
    return G, z
