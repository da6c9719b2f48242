"""Class-conditional shapes: the data the class-conditional backbones (DiT, LaMamba-Diff) train on.

A class is a (shape, colour) pair of genfast.data.shapes: 4 shapes x 6 colours = 24 classes, with
``id = shape_index * len(SHAPE_COLORS) + colour_index`` and the name ``"<colour> <shape>"``
("red circle"), which is also the label DiTPipeline.get_label_ids takes. Everything else in an
image (size, position, jitter, background: any of shapes' backgrounds but the shape's own colour)
is drawn as the captioned shapes set draws it, and the image is rendered by shapes.render.

Item i of ClassShapesDataset(seed) has class ``i % NUM_CLASSES`` (every class equally often in any
NUM_CLASSES consecutive items) and is a pure function of (seed, i). Training draws from seed 0,
everything measured from HELDOUT_SEED (1), as for prompt accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .shapes import (
    BACKGROUND_COLORS,
    HEADS,
    POSITIONS,
    SHAPE_COLORS,
    SHAPES,
    SIZES,
    Scene,
    ShapeSpec,
    render,
    to_tensor,
)

__all__ = ["HELDOUT_SEED", "NUM_CLASSES", "TRAIN_SEED", "ClassShapesDataset", "class_id", "class_names",
           "class_of", "class_scene", "eval_class_labels", "heldout_class_images", "id2label", "render_class_batch"]

TRAIN_SEED = 0
HELDOUT_SEED = 1  # genfast.eval.prompt_accuracy's (eval imports data, not the reverse)
NUM_CLASSES = len(SHAPES) * len(SHAPE_COLORS)
_COLORS = tuple(SHAPE_COLORS)


def class_names() -> list[str]:
    """Every class name, in id order: "red circle", "orange circle", ..., "purple star"."""
    return [f"{colour} {shape}" for shape in SHAPES for colour in _COLORS]


def id2label() -> dict[int, str]:
    """{class id: name}: what DiTPipeline(id2label=...) takes."""
    return dict(enumerate(class_names()))


def class_id(shape: str, colour: str) -> int:
    """The id of the class (shape, colour); unknown words are an error listing the known ones."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; the classes' shapes are {', '.join(SHAPES)}")
    if colour not in SHAPE_COLORS:
        raise ValueError(f"unknown colour {colour!r}; the classes' colours are {', '.join(_COLORS)}")
    return SHAPES.index(shape) * len(_COLORS) + _COLORS.index(colour)


def class_of(cid: int) -> tuple[str, str]:
    """(shape, colour) of a class id."""
    if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) or not 0 <= cid < NUM_CLASSES:
        raise ValueError(f"class id must be an integer in 0..{NUM_CLASSES - 1}, got {cid!r}")
    shape, colour = divmod(int(cid), len(_COLORS))
    return SHAPES[shape], _COLORS[colour]


def class_scene(rng: np.random.Generator, cid: int) -> Scene:
    """A one-shape scene of class `cid`, the rest drawn as shapes.sample_scene draws a one-shape scene
    (uniform size and position; uniform background among those that are not the shape's colour)."""
    shape, colour = class_of(cid)
    backgrounds = [b for b in BACKGROUND_COLORS if b != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    size = HEADS["size"][rng.integers(len(SIZES))]
    position = HEADS["position"][rng.integers(len(POSITIONS))]
    return Scene((ShapeSpec(shape, colour, size, position),), background)


def eval_class_labels(n: int) -> list[int]:
    """The class ids of the first n held-out items: every class in turn (balanced)."""
    return [i % NUM_CLASSES for i in range(n)]


@dataclass
class ClassShapesDataset(Dataset):
    """(image, class id) items: image a float tensor (3, 64, 64) in [-1, 1], class id an int."""

    length: int = 10_000
    seed: int = TRAIN_SEED

    def __post_init__(self):
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f"ClassShapesDataset.length must be an integer > 0, got {self.length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ClassShapesDataset.seed must be an integer >= 0, got {self.seed!r}")

    def __len__(self) -> int:
        return self.length

    def class_id(self, index: int) -> int:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of {self.length}")
        return index % NUM_CLASSES

    def sample(self, index: int) -> tuple[np.ndarray, int, Scene]:
        """(uint8 HWC image, class id, scene) of item `index`."""
        cid = self.class_id(index)
        # a stream apart from ShapesDataset's [seed, index]: the same seed gives other images
        rng = np.random.default_rng([self.seed, index, NUM_CLASSES])
        scene = class_scene(rng, cid)
        return render(scene, rng), cid, scene

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, cid, _ = self.sample(index)
        return to_tensor(image), cid


def render_class_batch(n: int, seed: int = TRAIN_SEED, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items start..start+n-1 of ClassShapesDataset(seed): (uint8 NHWC images, int64 class ids)."""
    ds = ClassShapesDataset(start + n, seed)
    images, labels = [], []
    for i in range(start, start + n):
        image, cid, _ = ds.sample(i)
        images.append(image)
        labels.append(cid)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def heldout_class_images(class_ids) -> torch.Tensor:
    """Held-out renders (HELDOUT_SEED) of the given classes, uint8 NCHW: image i is the k-th held-out item of
    class_ids[i]'s class, k counting earlier images of that class in the list. So the balanced list
    eval_class_labels(n) reads items 0..n-1, and repeating a list (ids + ids) gives a second set of the
    same classes disjoint from the first (the real-vs-real floor of an FID)."""
    ids = list(class_ids)
    if not ids:
        raise ValueError("heldout_class_images needs at least one class id")
    seen: dict[int, int] = {}
    items = []
    for cid in ids:
        class_of(cid)  # range check, with the error naming it
        items.append(int(cid) + NUM_CLASSES * seen.get(int(cid), 0))  # item j has class j % NUM_CLASSES
        seen[int(cid)] = seen.get(int(cid), 0) + 1
    ds = ClassShapesDataset(max(items) + 1, seed=HELDOUT_SEED)
    return torch.from_numpy(np.stack([ds.sample(j)[0] for j in items])).permute(0, 3, 1, 2)
