"""A person's photos for personalization: read-only loading, centre crop, and EG3D camera labels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# the decoders Pillow may use: whatever a file's bytes claim, never a format that hands it to another program
# (EPS goes to Ghostscript)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
MIN_PHOTOS = 3
# Memory does not grow with the count (photos are fitted and trained a batch at a time; bench/my3dgen_memory.py),
# time does: every training step renders every photo. My3DGen asks for ~10 to ~50.
MAX_PHOTOS = 100
BACKGROUND = (230, 230, 230)  # transparent pixels become the light gray the synthetic heads sit on


def list_photos(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"photos folder {folder} does not exist (or is not a folder)")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        raise ValueError(f"photos folder {folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return photos


def _square(image, resolution: int):
    """Centre crop to a square, then resize (Lanczos), as EG3D's crops are square and centred."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)


def _rgb(image):
    """Any PIL mode -> RGB; alpha is composited over the background rather than dropped to black."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_photos(folder: str | os.PathLike, resolution: int = 64,
                min_photos: int = MIN_PHOTOS, max_photos: int = MAX_PHOTOS) -> tuple[list[str], torch.Tensor]:
    """(file names, images (N, 3, R, R) float in [0, 1]); the folder is only read, never written."""
    paths = list_photos(folder)
    if len(paths) < min_photos:
        raise ValueError(f"photos folder {folder} has {len(paths)} image(s); personalization needs at least "
                         f"{min_photos} photos of the person (about 10 works best)")
    if len(paths) > max_photos:
        raise ValueError(f"photos folder {folder} has {len(paths)} images; personalization takes at most "
                         f"{max_photos}: memory stays that of one --batch of photos (2.6 GB for the embedded prior on "
                         f"a CPU, measured), but every training step renders all of them, so {len(paths)} take {len(paths) / 10:.0f}x the time of 10 (pick the best "
                         f"{max_photos} or fewer)")
    images = torch.stack([load_photo(path, resolution) for path in paths])
    return [p.name for p in paths], images


def load_photo(path: str | os.PathLike, resolution: int = 64) -> torch.Tensor:
    """One photo as (3, R, R) float in [0, 1]: any mode to RGB, centre crop, resize; errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"photo {path} does not exist")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            im.load()
            image = np.asarray(_square(_rgb(im), resolution), dtype=np.float32) / 255
    except Image.DecompressionBombError as err:
        raise ValueError(f"photo {path} is too large to open ({err}); resize it to a few megapixels") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read photo {path}: {err}. Remove it or replace it with a PNG/JPEG") from err
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def read_cameras(path: str | os.PathLike, names: list[str]) -> torch.Tensor:
    """(N, 25) cameras for `names` from an EG3D dataset.json: {"labels": [[file name, [25 numbers]], ...]}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cameras file {path} does not exist")
    try:
        labels = json.loads(path.read_text())["labels"]
        table = {Path(name).name: [float(x) for x in values] for name, values in labels}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not an EG3D dataset.json ({{\"labels\": [[name, [25 numbers]], ...]}}): "
                         f"{err}") from err
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{path} has no camera for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    bad = [n for n in names if len(table[n]) != 25]
    if bad:
        raise ValueError(f"{path}: the camera of {bad[0]} has {len(table[bad[0]])} numbers, not 25 "
                         f"(16 of cam2world, 9 of normalised intrinsics)")
    return torch.tensor([table[n] for n in names], dtype=torch.float32)


def write_cameras(path: str | os.PathLike, names: list[str], cameras: torch.Tensor) -> None:
    """The inverse of read_cameras (what `genfast personalize` writes for the cameras it fitted)."""
    from ..io import atomic_write_text

    labels = [[n, [round(float(x), 6) for x in c]] for n, c in zip(names, cameras, strict=True)]
    atomic_write_text(path, json.dumps({"labels": labels}, indent=1) + "\n")
