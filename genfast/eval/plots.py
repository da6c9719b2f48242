"""Figures people look at: labelled image grids (matplotlib, written atomically)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path


def _atomic_savefig(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a figure is for sharing
    os.replace(tmp, path)
    return path


def save_image_grid(images, titles: list[str], path: str | os.PathLike, columns: int | None = None) -> Path:
    """A grid of PIL images, each under its (wrapped) title."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    columns = columns or min(len(images), 4 if len(images) <= 16 else 8)
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(title, 24)), fontsize=7)
    try:
        return _atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)
