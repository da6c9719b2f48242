"""FID and KID between two image folders, computed by clean-fid, fully offline.

Two feature spaces:

* ``"mini-features"``: the embedded attribute classifier's penultimate layer (256-d). Always
  available; numbers are only comparable with other mini-features numbers.
* ``"inception"``: clean-fid's Inception-V3 (the standard FID). clean-fid would download the
  weights on first use; genfast only uses them when the file is already on disk.

Every result names its feature space, so a mini-features FID is never mistaken for a standard one.
"""

from __future__ import annotations

import contextlib
import os
import platform
from glob import glob
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid import fid as cfid
from cleanfid.downloads_helper import inception_url
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer
from cleanfid.utils import EXTENSIONS
from PIL import Image

from ..io import atomic_dir

FEATURE_SPACES = ("mini-features", "inception")
INCEPTION_FILE = os.path.basename(inception_url)  # "inception-2015-12-05.pt"
MODE = "clean"  # clean-fid's PIL-based resizing; the only mode whose Inception model we can load offline


class MiniFeatureExtractor(torch.nn.Module):
    """clean-fid feature extractor backed by the embedded attribute classifier.

    clean-fid calls it with float images (N, 3, H, W) in [0, 255]; it returns (N, 256) features.
    """

    def __init__(self, classifier=None, device: str | torch.device = "cpu"):
        super().__init__()
        if classifier is None:
            from ..models import load_evaluator

            classifier = load_evaluator(device)
        self.classifier = classifier.to(device).eval()
        self.image_size = int(classifier.config.image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.classifier.parameters())
        x = images.to(param.device, torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            # only reached when clean-fid resized to another size (e.g. its default 299 without our resizer)
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 255)
        x = x / 127.5 - 1.0  # the classifier was trained on images in [-1, 1]
        with torch.no_grad():
            return self.classifier.embed(x.to(param.dtype)).float()


def mini_resizer(image_size: int = 64):
    """clean-fid's own 'clean' resizer (PIL bicubic, float, no quantization) at the evaluator's size.

    At 64x64 input it is the identity, so the evaluator sees the saved pixels unchanged.
    """
    return make_resizer("PIL", False, "bicubic", (image_size, image_size))


# ---------------------------------------------------------------- Inception, offline only


def inception_cache_dir() -> Path:
    """Where clean-fid keeps its Inception weights (it hard-codes this folder in cleanfid.features)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def inception_weights_path(inception_weights: str | os.PathLike | None = None) -> Path:
    """The local Inception file to use; FileNotFoundError (with the fix) when it is not on disk."""
    if inception_weights is None:
        path = inception_cache_dir() / INCEPTION_FILE
    else:
        path = Path(inception_weights)
        if path.is_dir():
            path = path / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights for FID/KID[inception] not found: {path} does not exist. genfast never "
            f"downloads them. Fetch {inception_url} on a machine with internet and put it at "
            f"{inception_cache_dir() / INCEPTION_FILE} (clean-fid's cache) or pass inception_weights=<path to "
            f"{INCEPTION_FILE}>. Or use feature_space='mini-features', which needs no download."
        )
    if path.name != INCEPTION_FILE:
        # clean-fid's loader takes a folder and a fixed file name
        raise FileNotFoundError(
            f"clean-fid loads Inception weights only under the name {INCEPTION_FILE}; rename {path} to "
            f"{path.with_name(INCEPTION_FILE)} and pass that path (or its folder) as inception_weights."
        )
    return path


def load_inception(inception_weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """clean-fid's Inception wrapper built from a local file, with its download switched off."""
    path = inception_weights_path(inception_weights)
    return InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()


# ---------------------------------------------------------------- folders and metrics


def list_images(folder: str | os.PathLike) -> list[str]:
    """The image files clean-fid will read from `folder` (same extensions and recursive search)."""
    # not deduplicated, like clean-fid: the count must match the features it computes
    return sorted(f for ext in EXTENSIONS for f in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def _check_folder(folder: str | os.PathLike) -> int:
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist (or is not a folder); write images there with save_images"
        )
    n = len(list_images(folder))
    if n < 2:
        # a covariance (FID) or a kernel subset (KID) needs at least two samples
        raise ValueError(f"image folder {folder} holds {n} image(s); FID/KID need at least 2 (use hundreds or more)")
    return n


class FeatureSpace:
    """A feature network built once, and the clean-fid features of folders computed with it.

    `genfast compare` builds one per run on the run's device and reuses each folder's features
    (the baseline's, the real images') for every FID it reports; fid_folders and kid_folders build
    one per call. Features come from clean-fid's get_folder_features and FID from its
    fid_from_feats, so the numbers are exactly what cleanfid.fid.compute_fid gives for two folders.
    """

    def __init__(self, name: str = "mini-features", inception_weights: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64, classifier=None):
        if name not in FEATURE_SPACES:
            raise ValueError(f"unknown feature_space {name!r}; choose one of {FEATURE_SPACES}")
        self.name, self.device, self.batch_size = name, torch.device(device), batch_size
        if name == "mini-features":
            # `classifier`: an already loaded evaluator (compare shares the one that judges prompts)
            self.model = MiniFeatureExtractor(classifier, device=self.device)
            self.resize = mini_resizer(self.model.image_size)
        else:
            self.model, self.resize = load_inception(inception_weights, self.device), None  # clean mode resizes to 299

    def features(self, folder: str | os.PathLike) -> np.ndarray:
        """(N, D) features of every image clean-fid reads from `folder`."""
        _check_folder(folder)
        return cfid.get_folder_features(str(folder), self.model, num_workers=0, batch_size=self.batch_size,
                                        device=self.device, mode=MODE, custom_fn_resize=self.resize, verbose=False)

    def fid(self, feats_a: np.ndarray, feats_b: np.ndarray) -> dict:
        """FID between two feature sets (clean-fid's statistics and Frechet distance).

        When clean-fid refuses because the matrix square root came back complex (two sets so alike
        that the distance is near 0, with fewer images than feature dimensions), the covariances get
        a small ridge and the report says `regularised` with its size."""
        try:
            return _report("FID", cfid.fid_from_feats(feats_a, feats_b), self.name, len(feats_a), len(feats_b))
        except ValueError as err:
            if "Imaginary component" not in str(err):
                raise
        value, ridge = regularised_fid(feats_a, feats_b)
        return {**_report("FID", value, self.name, len(feats_a), len(feats_b)), "regularised": ridge}

    def kid(self, feats_a: np.ndarray, feats_b: np.ndarray, seed: int = 0) -> dict:
        """KID between two feature sets (clean-fid's kernel_distance, its subsets drawn with `seed`)."""
        with _numpy_seed(seed):
            value = cfid.kernel_distance(feats_a, feats_b)
        return _report("KID", value, self.name, len(feats_a), len(feats_b))


def regularised_fid(feats_a: np.ndarray, feats_b: np.ndarray) -> tuple[float, float]:
    """clean-fid's Frechet distance with eps * I added to both covariances, eps from 1e-6 of their mean
    variance up by tens until the square root is real (clean-fid itself adds 1e-6 only when it is not
    finite); returns (FID, eps)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    sig_a, sig_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    scale = float(np.mean(np.diag(sig_a) + np.diag(sig_b)) / 2) or 1.0
    for power in range(-6, 0):
        eps = scale * 10.0**power
        ridge = np.eye(len(sig_a)) * eps
        try:
            return float(cfid.frechet_distance(mu_a, sig_a + ridge, mu_b, sig_b + ridge)), eps
        except ValueError:
            continue
    raise ValueError("FID: the covariances' square root stays complex even with a ridge of 10% of their variance")


def _report(metric: str, value: float, feature_space: str, n_a: int, n_b: int) -> dict:
    return {"name": f"{metric}[{feature_space}]", "value": float(value), "feature_space": feature_space,
            "n_a": n_a, "n_b": n_b}


def fid_folders(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    feature_space: str = "mini-features",
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> dict:
    """FID between the images in two folders in the given feature space (what cleanfid.fid.compute_fid gives)."""
    _check_folder(dir_a)
    _check_folder(dir_b)
    space = FeatureSpace(feature_space, inception_weights, device, batch_size)
    return space.fid(space.features(dir_a), space.features(dir_b))


@contextlib.contextmanager
def _numpy_seed(seed: int):
    """clean-fid's KID draws subsets from numpy's global RNG; seed it for this call only."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def kid_folders(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    feature_space: str = "mini-features",
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """KID between the images in two folders, in the given feature space (reproducible for a seed).

    cleanfid.fid.compute_kid always builds (and may download) its own Inception model, so this runs
    the same two steps it does, clean-fid's get_folder_features and kernel_distance, with our model.
    """
    _check_folder(dir_a)
    _check_folder(dir_b)
    space = FeatureSpace(feature_space, inception_weights, device, batch_size)
    return space.kid(space.features(dir_a), space.features(dir_b), seed=seed)


def _as_pil_list(images) -> list[Image.Image]:
    if isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images):
        return list(images)
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise TypeError(
            f"save_images needs uint8 images (or PIL images), got dtype {array.dtype}; "
            f"convert with (x.clamp(0, 1) * 255).round().to(torch.uint8) first"
        )
    if array.ndim != 4:
        raise ValueError(f"save_images needs a batch (N, H, W, C) or (N, C, H, W), got shape {array.shape}")
    if array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if array.shape[-1] == 1:
        array = array[..., 0]
    return [Image.fromarray(a) for a in array]


def save_images(images, folder: str | os.PathLike) -> Path:
    """Write images as 00000.png, 00001.png, ... into `folder`, replacing it as a whole.

    images: a uint8 tensor/array (N, H, W, C) or (N, C, H, W), or a list of PIL images. The folder
    appears only once every file is written, and old images never mix with new ones.
    """
    pil = _as_pil_list(images)
    with atomic_dir(folder) as tmp:
        for i, im in enumerate(pil):
            im.save(tmp / f"{i:05d}.png")
    return Path(folder)
