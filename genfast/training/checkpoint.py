"""Training checkpoints that cannot run code: safetensors + JSON, sealed by a manifest of sha256.

accelerate's `save_state` pickles RNG states and registered objects and `load_state` unpickles
them with `weights_only=False`, so a file planted in a work folder would run on resume. Here a
checkpoint is tensors (safetensors) and a JSON skeleton, and resume reads a folder only after
every file in it matches the manifest written with it.

Layout of `<work>/checkpoints/step-NNNNNNN/`: models.safetensors, ema.safetensors,
optimizer.safetensors (optimizer, LR scheduler, grad scaler), state.safetensors (extra state),
state.json (the skeleton of all of those, the step), rng-<process>.safetensors/.json, manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io import atomic_write_text

FORMAT = "genfast-checkpoint/1"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-\d{7}")
_MARKERS = ("__tensor__", "__tuple__", "__items__")


class CheckpointError(ValueError):
    """A checkpoint that is missing files, holds unlisted files, or whose files changed since it was written."""


# ---- nested state <-> (JSON skeleton, flat tensor dict) ----
# Optimizer, LR scheduler, grad-scaler and EMA state dicts nest dicts with int keys, lists,
# tuples, tensors and plain values; JSON alone cannot hold the tensors or the int keys.

def flatten(obj, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON-able skeleton, {key: tensor}) for nested dicts (str/int keys), lists, tuples, tensors,
    numbers, str, bool, None; anything else is a TypeError naming where it sits."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()  # safetensors refuses tensors that share memory (tied weights, views)
            seen.add(t.untyped_storage().data_ptr())
            key = path or "."
            while key in tensors:
                key += "+"
            tensors[key] = t
            return {"__tensor__": key}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            for k in x:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {path or '/'}")
            if all(isinstance(k, str) for k in x) and not any(m in x for m in _MARKERS):
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            return {"__items__": [[k, walk(v, f"{path}/{k}")] for k, v in x.items()]}
        raise TypeError(f"cannot store a {type(x).__name__} at {path or '/'}: only tensors, numbers, str, "
                        f"bool, None, lists, tuples and dicts go into a checkpoint")

    return walk(obj, prefix), tensors


def unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    """The inverse of `flatten`."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if len(skeleton) == 1 and next(iter(skeleton)) in _MARKERS:
            (marker, value), = skeleton.items()
            if marker == "__tensor__":
                if value not in tensors:
                    raise CheckpointError(f"tensor {value!r} is missing from the checkpoint's safetensors files")
                return tensors[value]
            if marker == "__tuple__":
                return tuple(unflatten(v, tensors) for v in value)
            return {k: unflatten(v, tensors) for k, v in value}
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    return skeleton


# ---- files ----

def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's shape and float32 bytes: inputs are recorded by content, not by file name."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}\n".encode() + t.numpy().tobytes()).hexdigest()


def state_hash(*modules: torch.nn.Module) -> str:
    """sha256 over the modules' state dicts, tensor by tensor (run records compare models by content)."""
    h = hashlib.sha256()
    for module in modules:
        for key, t in sorted(module.state_dict().items()):
            h.update(f"{key}={tensor_hash(t)}\n".encode())
    return h.hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def seal(folder: Path) -> None:
    """Write the manifest: every file in `folder` with its sha256."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    write_json(folder / MANIFEST, {"format": FORMAT, "files": files})


def _refuse(folder: Path, file: str, problem: str):
    work = folder.parent.parent
    raise CheckpointError(
        f"checkpoint file {folder / file} {problem}. The checkpoint was not written by genfast's training "
        f"loop or was changed since, so nothing in it was loaded. Delete the work folder {work} to start "
        f"afresh (or restore it from a copy you trust).")


def verify(folder: Path) -> None:
    """Raise CheckpointError unless every file in `folder` is listed in its manifest with the same sha256."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        _refuse(folder, MANIFEST, "is missing (an older genfast wrote this checkpoint with pickles, or it was tampered with)")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
        ok = manifest.get("format") == FORMAT and isinstance(listed, dict)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        _refuse(folder, MANIFEST, f"is not a {FORMAT} manifest")
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    for name in sorted(present - set(listed)):
        _refuse(folder, name, "is not listed in the manifest")
    for name, digest in sorted(listed.items()):
        path = folder / name
        if name not in present or not path.is_file():
            _refuse(folder, name, "is missing")
        if sha256_file(path) != digest:
            _refuse(folder, name, "does not match the sha256 in the manifest")


def read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / name))
    except (SafetensorError, OSError) as e:  # listed and matching its hash, yet not safetensors
        _refuse(folder, name, f"is not a safetensors file ({e})")


def read_json(folder: Path, name: str):
    try:
        return json.loads((folder / name).read_text())
    except ValueError as e:
        _refuse(folder, name, f"is not JSON ({e})")


# ---- the checkpoints folder ----

def latest(root: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, or None before the first one."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not STEP_DIR.fullmatch(name):
        _refuse(root, "latest", f"names {name!r}, not a step-NNNNNNN folder")
    path = root / name
    if not path.is_dir():
        _refuse(root, name, "is missing (the `latest` pointer names it)")
    return path


def staging_dir(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written to; a fixed name, so every process finds it."""
    return root / f".step-{step:07d}.tmp"


def publish(root: Path, step: int, keep: int) -> Path:
    """Seal the staged checkpoint, rename it into place, move the `latest` pointer, drop old ones."""
    tmp, final = staging_dir(root, step), root / f"step-{step:07d}"
    seal(tmp)
    os.chmod(tmp, 0o755)
    if final.exists():  # saved at this step before (a resumed run that stopped at the same step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    for old in sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
