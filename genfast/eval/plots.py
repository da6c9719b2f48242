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
    import textwrap

    plt = _pyplot()
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_comparison_grid(rows: dict[str, list], prompts: list[str], path: str | os.PathLike) -> Path:
    """One row of images per variant (same prompts and seeds in every column), labelled on the left."""
    import textwrap

    plt = _pyplot()
    columns = len(prompts)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns + 1.6, 1.75 * len(rows) + 0.4),
                             squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(prompts[c], 20)), fontsize=6.5)
        axes[r, 0].set_ylabel("\n".join(textwrap.wrap(label, 22)), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    try:
        return _atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)


def _pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both speed-up and quality, by increasing speed-up."""
    sign = 1 if higher_is_better else -1
    front, best = [], -float("inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -sign * p[1])):  # fastest first
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return sorted(front)


def save_pareto(panels: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Speed-up (x) against one quality figure per panel (y), each point labelled, the Pareto front drawn.

    panels: [{"ylabel": str, "higher_is_better": bool, "points": [(label, speedup, value), ...]}]
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    labels = list(dict.fromkeys(label for panel in panels for label, _, _ in panel["points"]))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, panel in zip(axes[0], panels):
        points = [(x, y) for _, x, y in panel["points"]]
        front = _pareto_front(points, panel["higher_is_better"])
        ax.plot(*zip(*front), color="0.6", lw=1, ls="--", zorder=1, label="Pareto front")
        for label, x, y in panel["points"]:
            # one colour per label in every panel, so a variant is the same dot everywhere
            ax.scatter([x], [y], s=30, zorder=2, color=colors[label])
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.margins(0.25, 0.15)
        ax.set_xlabel("speed-up over the baseline (pipeline call)")
        ax.set_ylabel(panel["ylabel"] + ("  (higher is better)" if panel["higher_is_better"] else
                                         "  (lower is better)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return _atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)
