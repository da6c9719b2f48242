"""LPIPS (learned perceptual distance) through the `lpips` package, strictly offline.

lpips ships its small linear layers inside the package, but its AlexNet/VGG/SqueezeNet backbone
comes from torchvision's ImageNet weights, which torchvision downloads into the torch hub cache.
genfast builds the network with a random backbone (so nothing is fetched) and then overwrites
every backbone weight from a file already on disk; with no such file it refuses to measure.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

# lpips' net names -> the torchvision weights its backbone is built from (pretrained=True in lpips)
BACKBONE_WEIGHTS = {
    "alex": AlexNet_Weights.IMAGENET1K_V1,
    "vgg": VGG16_Weights.IMAGENET1K_V1,
    "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


def _check_net(net: str) -> None:
    if net not in BACKBONE_WEIGHTS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(BACKBONE_WEIGHTS)}")


def hub_checkpoint_dir() -> Path:
    """torch hub's download cache, where torchvision looks for (and would fetch) backbone weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def backbone_url(net: str = "alex") -> str:
    _check_net(net)
    return BACKBONE_WEIGHTS[net].url


def backbone_cache_path(net: str = "alex") -> Path:
    """The file torchvision would have cached for this backbone (same naming as torch.hub)."""
    return hub_checkpoint_dir() / os.path.basename(urlparse(backbone_url(net)).path)


def _backbone_path(net: str, weights_path: str | os.PathLike | None) -> Path:
    return Path(weights_path) if weights_path is not None else backbone_cache_path(net)


def lpips_available(net: str = "alex", weights_path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(True, file used) when the backbone weights are on disk, else (False, what is missing and the fix).

    Only looks at the file system: never downloads, never loads the network.
    """
    path = _backbone_path(net, weights_path)
    if path.is_file():
        return True, f"LPIPS[{net}] backbone weights found at {path}"
    where = f"the given weights_path {path}" if weights_path is not None else f"torch hub's cache ({path})"
    return False, (
        f"LPIPS[{net}] needs torchvision's ImageNet backbone weights, not found in {where}. genfast never "
        f"downloads them: fetch {backbone_url(net)} on a machine with internet and put it at "
        f"{backbone_cache_path(net)}, or pass weights_path=<that file>."
    )


def _backbone_state(net: str, net_module: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The torchvision checkpoint's `features.*` tensors, renamed to lpips' slice layout.

    lpips puts torchvision's `features[i]` into `slice<k>` under the name str(i), so
    `slice2.3.weight` is `features.3.weight`.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read LPIPS backbone weights {path} as a torch state dict: {err}") from err
    wanted = {key: "features." + key.split(".", 1)[1] for key in net_module.state_dict()}
    missing = [src for src in wanted.values() if src not in state]
    if missing:
        raise ValueError(
            f"{path} is not a torchvision backbone checkpoint for this LPIPS net: it lacks {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}. Use {backbone_url(net)}."
        )
    return {key: state[src] for key, src in wanted.items()}


def _build_lpips(net: str, path: Path):
    import lpips

    # pnet_rand=True makes lpips call torchvision with pretrained=False: no download is attempted.
    # The linear layers still load from the lpips package itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notice about the legacy `pretrained` flag
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    # strict: every backbone weight is replaced, so no random weight can survive into a score
    model.net.load_state_dict(_backbone_state(net, model.net, path), strict=True)
    return model.eval()


class LPIPSMetric(torch.nn.Module):
    """Per-image LPIPS distance between two batches of images in [0, 1], shape (N, 3, H, W).

    Raises FileNotFoundError (naming the missing file and where to put it) when the backbone
    weights are not on disk; it never downloads and never scores with a random backbone.
    """

    def __init__(
        self,
        net: str = "alex",
        weights_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        _check_net(net)
        ok, reason = lpips_available(net, weights_path)
        if not ok:
            raise FileNotFoundError(reason)
        self.net_name = net
        self.weights_path = _backbone_path(net, weights_path)
        self.model = _build_lpips(net, self.weights_path).to(device)
        self.model.requires_grad_(False)

    @property
    def name(self) -> str:
        return f"LPIPS[{self.net_name}]"

    @torch.no_grad()
    def forward(self, images: torch.Tensor, reference: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """LPIPS of each image to its reference, shape (N,); 0 for identical images."""
        _check_pair(images, reference)
        device = next(self.model.parameters()).device
        out = [
            self.model(a.to(device, torch.float32), b.to(device, torch.float32), normalize=True).flatten()
            for a, b in zip(images.split(batch_size), reference.split(batch_size), strict=True)
        ]
        return torch.cat(out).cpu()


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"LPIPS needs RGB batches (N, 3, H, W), got {tuple(images.shape)}")
    for t in (images, reference):
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            # lpips rescales [0, 1] to [-1, 1] itself; other ranges would silently give wrong numbers
            raise ValueError(f"LPIPS expects images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             f"convert [-1, 1] images with (x + 1) / 2")
