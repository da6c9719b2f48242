"""ArcFace IR-SE50: the face-identity network behind pSp's, MyStyle's and My3DGen's identity losses.

This is the 50-layer improved-residual network with squeeze-excitation ("IR-SE50") trained with the
ArcFace loss by TreB1eN/InsightFace_Pytorch and distributed as ``model_ir_se50.pth``; pSp, MyStyle
and My3DGen load that same file. The module layout and parameter names below follow that checkpoint
exactly, so ``load_arcface("model_ir_se50.pth")`` reads it with ``strict=True``.

Inputs are RGB images in [-1, 1] of any size (the network was trained on 112x112 faces normalised
with mean 0.5 and std 0.5, which is the same range). Following My3DGen, whose identity loss pools
EG3D's whole renders straight to 112x112, the whole image is average-pooled rather than cropped to
the face: renders of a 3D GAN are already framed like FFHQ, so no detector or fixed window is needed,
and a render and its mirror image (the symmetry loss) go through the same, centred window.
Users whose images are aligned like pSp's 256px FFHQ crops can pass ``crop=PSP_CROP`` (the
fractions of pSp's ``[35:223, 32:220]`` window).

genfast never downloads these weights: fetch ``model_ir_se50.pth`` yourself (the InsightFace_Pytorch
release, or the copy the pSp README links to) and pass its path to :func:`load_arcface`. Without it,
:class:`genfast.gan3d.identity.IdentityEncoder` is the offline stand-in; both map images to unit
embeddings, so :func:`genfast.gan3d.identity.identity_similarity` takes either.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 512
INPUT_SIZE = 112
# (in_channels, depth, units) per stage of the 50-layer network; each stage opens with a stride-2 unit.
IR_SE50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
# pSp's identity loss crops 256x256 aligned faces to rows 35:223 and columns 32:220 before pooling.
PSP_CROP = (35 / 256, 223 / 256, 32 / 256, 220 / 256)

_WEIGHTS_HELP = ("ArcFace IR-SE50 weights are the `model_ir_se50.pth` of TreB1eN/InsightFace_Pytorch "
                 "(the file pSp, MyStyle and My3DGen use for their identity loss); genfast never downloads it: "
                 "fetch it yourself and pass its path")


class SEModule(nn.Module):
    """Squeeze-excitation: rescale each channel by a gate computed from the globally pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class BottleneckIRSE(nn.Module):
    """Improved residual unit (BN-conv-PReLU-conv-BN, then SE); the stride sits on the second conv."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            # a 1x1 max-pool is plain subsampling; it holds no weights, matching the checkpoint
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def _body_units(stages=IR_SE50_STAGES) -> list[BottleneckIRSE]:
    units = []
    for in_channel, depth, count in stages:
        units.append(BottleneckIRSE(in_channel, depth, 2))
        units.extend(BottleneckIRSE(depth, depth, 1) for _ in range(count - 1))
    return units


def _crop_window(size: int, start: float, stop: float) -> tuple[int, int]:
    a, b = round(start * size), round(stop * size)
    if not 0 <= a < b <= size:
        raise ValueError(f"crop fractions ({start}, {stop}) select nothing of a side of {size} pixels")
    return a, b


class ArcFaceIRSE50(nn.Module):
    """Images (N, 3, H, W) in [-1, 1] -> unit ArcFace identity embeddings (N, 512).

    The image (optionally first cut to ``crop`` = (top, bottom, left, right) fractions of its height
    and width, e.g. :data:`PSP_CROP`) is average-pooled to 112x112 and run through IR-SE50.
    Built in eval mode; :func:`load_arcface` also freezes it. Gradients still reach the images.
    """

    def __init__(self, drop_ratio: float = 0.6, crop: tuple[float, float, float, float] | None = None):
        super().__init__()
        if crop is not None and len(crop) != 4:
            raise ValueError(f"crop must be (top, bottom, left, right) fractions, got {crop!r}")
        self.crop = None if crop is None else tuple(float(c) for c in crop)
        self.face_pool = nn.AdaptiveAvgPool2d(INPUT_SIZE)
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        self.body = nn.Sequential(*_body_units())
        side = INPUT_SIZE // 16  # four stride-2 stages: 112 -> 7
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(512 * side * side, EMBED_DIM),
            nn.BatchNorm1d(EMBED_DIM, affine=True),
        )
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Crop (if asked) and pool images to the network's 112x112 input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        if self.crop is not None:
            h, w = images.shape[-2:]
            top, bottom = _crop_window(h, self.crop[0], self.crop[1])
            left, right = _crop_window(w, self.crop[2], self.crop[3])
            images = images[:, :, top:bottom, left:right]
        return self.face_pool(images)

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """Raw network on 112x112 inputs: (N, 3, 112, 112) -> unit (N, 512)."""
        x = self.output_layer(self.body(self.input_layer(faces)))
        return F.normalize(x, dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.preprocess(images))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} is not a plain tensor state dict (refusing to unpickle code): {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; {_WEIGHTS_HELP}")
    return dict(state)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _ignorable(key: str) -> bool:
    # BatchNorm counters: older saves lack them and PyTorch fills them in when loading
    return key.endswith("num_batches_tracked")


def load_arcface(path: str | os.PathLike, device: str | torch.device = "cpu",
                 crop: tuple[float, float, float, float] | None = None) -> ArcFaceIRSE50:
    """Load ``model_ir_se50.pth`` (or a .safetensors copy of it) into a frozen :class:`ArcFaceIRSE50`.

    The .pth is read with ``weights_only=True``, so no code in it runs. A ``module.`` prefix left by
    DataParallel is stripped. Raises FileNotFoundError for a missing file and ValueError for a file
    that is not an IR-SE50 state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. {_WEIGHTS_HELP}")
    state = _strip_prefix(_read_state_dict(path))
    model = ArcFaceIRSE50(crop=crop)
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(state) if not _ignorable(k))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not an ArcFace IR-SE50 checkpoint: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). {_WEIGHTS_HELP}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # keys match but shapes do not
        raise ValueError(f"{path} is not an ArcFace IR-SE50 checkpoint: {e}") from e
    return model.to(device).requires_grad_(False).eval()
