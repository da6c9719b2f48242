"""Procedural captioned shapes: the data genfast-mini and its evaluator are trained on.

Every sample is a 64x64 RGB image of one or two flat shapes on a plain background, its
attribute labels, and a caption from a small grammar::

    a [small|large] [colour] <shape> [position] [on a <colour> background]

Every part but the shape is optional, so "a circle" and "a red circle" are valid prompts.
Samples are a pure function of (seed, index): the data set is random-access and deterministic.

Data design for colour binding: shapes are drawn in saturated colours and backgrounds in muted
tones of the same hues (mixed with grey), so "which region is the shape" never depends on
which colour word came first; the shape colour is never the background colour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "star")
SHAPE_COLORS = {
    "red": (222, 32, 32),
    "orange": (250, 140, 20),
    "yellow": (245, 222, 30),
    "green": (30, 170, 50),
    "blue": (32, 72, 226),
    "purple": (146, 40, 196),
}
_MUTED_GREY = 110.0
BACKGROUND_COLORS = {
    "white": (242, 242, 242),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
    # muted versions of the shape hues: same hue, lower saturation
    **{
        name: tuple(round(0.55 * c + 0.45 * _MUTED_GREY) for c in SHAPE_COLORS[name])
        for name in ("red", "green", "blue", "yellow")
    },
}
SIZES = {"small": 9.0, "medium": 13.0, "large": 18.0}  # half-extent in pixels
POSITIONS = {
    "center": (32.0, 32.0),
    "left": (18.0, 32.0),
    "right": (46.0, 32.0),
    "top": (32.0, 18.0),
    "bottom": (32.0, 46.0),
}
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
SIZE_WORDS = {"small": "small", "medium": None, "large": "large"}  # "medium" is left unsaid

# Attribute heads, in the order the label vectors use.
HEADS = {
    "shape": SHAPES,
    "color": tuple(SHAPE_COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUND_COLORS),
}


def grammar_words() -> list[str]:
    """Every word the caption grammar can produce (the tokenizer's vocabulary)."""
    words = {"a", "an", "and", "on", "the", "at", "in", "background", ",", "."}
    words.update(SHAPES, SHAPE_COLORS, BACKGROUND_COLORS)
    words.update(w for w in SIZE_WORDS.values() if w)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    background: str

    def labels(self) -> dict[str, int]:
        """Attribute labels of the first shape and the background, as class indices."""
        first = self.shapes[0]
        return {
            "shape": SHAPES.index(first.shape),
            "color": HEADS["color"].index(first.color),
            "size": HEADS["size"].index(first.size),
            "position": HEADS["position"].index(first.position),
            "background": HEADS["background"].index(self.background),
        }


@dataclass
class CaptionStyle:
    """How often each optional part of a caption is said (1.0 = always)."""

    p_size: float = 0.5
    p_color: float = 0.9
    p_position: float = 0.6
    p_background: float = 0.7

    def __post_init__(self):
        for name in ("p_size", "p_color", "p_position", "p_background"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"CaptionStyle.{name} must be in [0, 1], got {v}")


FULL_CAPTIONS = CaptionStyle(1.0, 1.0, 1.0, 1.0)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _shape_phrase(spec: ShapeSpec, say_size: bool, say_color: bool, say_position: bool) -> str:
    words = []
    if say_size and SIZE_WORDS[spec.size]:
        words.append(SIZE_WORDS[spec.size])
    if say_color:
        words.append(spec.color)
    words.append(spec.shape)
    phrase = _article(words[0]) + " " + " ".join(words)
    if say_position:
        phrase += " " + POSITION_PHRASES[spec.position]
    return phrase


def caption(scene: Scene, rng: np.random.Generator | None = None, style: CaptionStyle = FULL_CAPTIONS) -> str:
    """A caption of `scene`; optional parts are kept with the probabilities in `style`."""
    rng = rng or np.random.default_rng(0)
    two = len(scene.shapes) > 1
    parts = []
    for spec in scene.shapes:
        parts.append(
            _shape_phrase(
                spec,
                rng.random() < style.p_size,
                rng.random() < style.p_color,
                two or rng.random() < style.p_position,  # two shapes: positions tell them apart
            )
        )
    text = " and ".join(parts)
    if rng.random() < style.p_background:
        text += f" on a {scene.background} background"
    return text


def sample_scene(rng: np.random.Generator, p_two: float = 0.0) -> Scene:
    """Draw a random scene: one shape, or with probability `p_two` two shapes side by side."""
    background = HEADS["background"][rng.integers(len(BACKGROUND_COLORS))]
    allowed = [c for c in SHAPE_COLORS if c != background]
    if rng.random() < p_two:
        specs = tuple(
            ShapeSpec(
                SHAPES[rng.integers(len(SHAPES))],
                allowed[rng.integers(len(allowed))],
                ("small", "medium")[rng.integers(2)],
                pos,
            )
            for pos in ("left", "right")
        )
    else:
        specs = (
            ShapeSpec(
                SHAPES[rng.integers(len(SHAPES))],
                allowed[rng.integers(len(allowed))],
                HEADS["size"][rng.integers(len(SIZES))],
                HEADS["position"][rng.integers(len(POSITIONS))],
            ),
        )
    return Scene(specs, background)


# ---- rendering: anti-aliased coverage from signed distances (numpy, no per-pixel Python) ----

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from each pixel to a closed polygon."""
    dist = np.full(px.shape, np.inf, dtype=np.float32)
    inside = np.zeros(px.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        ax, ay = verts[i]
        bx, by = verts[(i + 1) % n]
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(wx - t * ex, wy - t * ey))
        # even-odd crossing test along +x
        crosses = ((ay > py) != (by > py)) & (px < ax + (py - ay) * ex / (ey + 1e-12))
        inside ^= crosses
    return np.where(inside, -dist, dist)


def _shape_sdf(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    px, py = _XX - cx, _YY - cy
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        half = r * 0.85  # equal area-ish to the circle, so size words mean the same thing
        qx, qy = np.abs(px) - half, np.abs(py) - half
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0)
    if shape == "triangle":
        ang = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        rr = r * 1.2
        verts = np.stack([rr * np.cos(ang), rr * np.sin(ang) + 0.2 * r], axis=1)
        return _polygon_sdf(px, py, verts)
    if shape == "star":
        k = np.arange(10)
        ang = np.deg2rad(-90.0 + 36.0 * k)
        rad = np.where(k % 2 == 0, r * 1.2, r * 0.5)
        verts = np.stack([rad * np.cos(ang), rad * np.sin(ang) + 0.1 * r], axis=1)
        return _polygon_sdf(px, py, verts)
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render(scene: Scene, rng: np.random.Generator | None = None, jitter: bool = True) -> np.ndarray:
    """Render `scene` as a uint8 (64, 64, 3) array. `rng` adds small position/size/shade jitter."""
    rng = rng if rng is not None else np.random.default_rng(0)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    bg = np.asarray(BACKGROUND_COLORS[scene.background], dtype=np.float32)
    if jitter:
        bg = bg + rng.uniform(-8, 8, size=3)
    img[:] = bg
    for spec in scene.shapes:
        cx, cy = POSITIONS[spec.position]
        r = SIZES[spec.size]
        if len(scene.shapes) > 1:
            cx = 17.0 if spec.position == "left" else 47.0
        if jitter:
            cx += rng.uniform(-2.5, 2.5)
            cy += rng.uniform(-2.5, 2.5)
            r *= rng.uniform(0.93, 1.07)
        coverage = np.clip(0.5 - _shape_sdf(spec.shape, cx, cy, r), 0.0, 1.0)[..., None]
        color = np.asarray(SHAPE_COLORS[spec.color], dtype=np.float32)
        if jitter:
            color = color + rng.uniform(-10, 10, size=3)
        img = img * (1 - coverage) + color * coverage
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


@dataclass
class ShapesDataset(Dataset):
    """A torch Dataset of (image, caption, labels); item i is a pure function of (seed, i).

    image: float tensor (3, 64, 64) in [-1, 1]; caption: str; labels: long tensor in HEADS order.
    """

    length: int = 10_000
    seed: int = 0
    p_two: float = 0.0
    style: CaptionStyle = field(default_factory=CaptionStyle)

    def __post_init__(self):
        if self.length <= 0:
            raise ValueError(f"ShapesDataset.length must be > 0, got {self.length}")
        if not 0.0 <= self.p_two <= 1.0:
            raise ValueError(f"ShapesDataset.p_two must be in [0, 1], got {self.p_two}")

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of {self.length}")
        return np.random.default_rng([self.seed, index])

    def scene(self, index: int) -> Scene:
        """The scene of item `index` without rendering it (the scene is drawn first)."""
        return sample_scene(self._rng(index), self.p_two)

    def sample(self, index: int) -> tuple[np.ndarray, str, Scene]:
        rng = self._rng(index)
        scene = sample_scene(rng, self.p_two)
        return render(scene, rng), caption(scene, rng, self.style), scene

    def __getitem__(self, index: int):
        image, text, scene = self.sample(index)
        labels = scene.labels()
        return (
            to_tensor(image),
            text,
            torch.tensor([labels[h] for h in HEADS], dtype=torch.long),
        )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 HWC (or NHWC) -> float CHW (or NCHW) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    return t.movedim(-1, -3)


def render_batch(n: int, seed: int, start: int = 0, p_two: float = 0.0, style: CaptionStyle | None = None):
    """`n` consecutive samples of ShapesDataset(seed): (uint8 NHWC array, captions, label array)."""
    ds = ShapesDataset(start + n, seed, p_two, style or CaptionStyle())
    images, captions, labels = [], [], []
    for i in range(start, start + n):
        image, text, scene = ds.sample(i)
        lab = scene.labels()
        images.append(image)
        captions.append(text)
        labels.append([lab[h] for h in HEADS])
    return np.stack(images), captions, np.asarray(labels, dtype=np.int64)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt of the grammar names for its first shape and the background.

    Only attributes the prompt actually says are returned, so accuracy is judged on them alone.
    """
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    found: dict[str, str] = {}
    bg_at = None
    if "background" in words:
        i = words.index("background")
        if i >= 1 and words[i - 1] in BACKGROUND_COLORS:
            found["background"] = words[i - 1]
            bg_at = i - 1
    first_shape_at = next((i for i, w in enumerate(words) if w in SHAPES), None)
    if first_shape_at is None:
        return found
    found["shape"] = words[first_shape_at]
    for w in words[:first_shape_at]:
        if w in SHAPE_COLORS:
            found["color"] = w
        elif w in ("small", "large"):
            found["size"] = w
    text = " ".join(words[first_shape_at + 1 : bg_at if bg_at is not None else len(words)])
    text = text.split(" and ")[0]
    for pos, phrase in POSITION_PHRASES.items():
        if phrase in text:
            found["position"] = pos
    return found
