"""Quality of a class-conditional generator on genfast's classes, as functions: images sampled for the balanced
held-out labels with fixed seeds, judged by class accuracy (the embedded evaluator) and FID[mini-features]
against held-out renders of the same classes, with the real-vs-real floor.

The protocol of bench/backbones.py's quality part and of `genfast compare` on a class pipeline (the labels
eval_class_labels(n), the seeds of class_conditional.evaluate_pipeline), for any pipeline with DiTPipeline's
call: a DiTPipeline or a genfast VARPipeline. Every metric reads the images as a saved PNG holds them (uint8).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..data.classes import HELDOUT_SEED, eval_class_labels, heldout_class_images
from .fid import FeatureSpace, save_images

__all__ = ["ClassQuality", "sample_class_images", "to_uint8"]

SAMPLE_BATCH = 48  # evaluate_pipeline's batch: the seeds below depend on it


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Pipeline output (N, 3, H, W) in [0, 1] -> uint8 on the CPU, what a saved PNG holds."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def sample_class_images(pipe, n: int, seed: int = HELDOUT_SEED, batch_size: int = SAMPLE_BATCH,
                        **call_kwargs) -> tuple[torch.Tensor, list[int]]:
    """(uint8 images (n, 3, H, W), their class ids): the balanced held-out labels, chunk i of batch_size seeded
    with seed * 1_000_003 + start as evaluate_pipeline does. call_kwargs go to the pipeline (guidance_scale,
    num_inference_steps; a VARPipeline's top_k, top_p, cfg_schedule)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of images must be an integer >= 1, got {n!r}")
    from ..generators import VARPipeline

    # a VAR draws its tokens with torch.multinomial, which needs the generator on the model's device;
    # DiTPipeline draws its noise on the CPU generator evaluate_pipeline uses
    device = pipe.transformer.device if isinstance(pipe, VARPipeline) else "cpu"
    labels = eval_class_labels(n)
    images = []
    for start in range(0, n, batch_size):
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + start)
        out = pipe(labels[start:start + batch_size], generator=gen, output_type="pt", **call_kwargs)
        images.append(to_uint8(out.images))
    return torch.cat(images), labels


class ClassQuality:
    """The judges of one evaluation, built once: the evaluator, its feature space, and the features of n
    held-out renders of the classes eval_class_labels(n) (the FID's reference).

    `floor` is the FID between those renders and a second, disjoint set of the same classes: the value a
    perfect generator would get at this n (with fewer images than the 256 feature dimensions the FID is
    regularised, genfast.eval.fid)."""

    def __init__(self, num_images: int, evaluator=None, device: str | torch.device = "cpu"):
        from ..models import load_evaluator

        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
            raise ValueError(f"num_images must be an integer >= 2 (an FID needs two images), got {num_images!r}")
        self.num_images = num_images
        self.labels = eval_class_labels(num_images)
        self.evaluator = evaluator if evaluator is not None else load_evaluator(device)
        self.space = FeatureSpace("mini-features", classifier=self.evaluator, device=device)
        real = heldout_class_images(self.labels + self.labels)  # the second half: disjoint, same classes
        self.real_features = self.features(real[:num_images])
        self.floor = self.space.fid(self.features(real[num_images:]), self.real_features)

    def features(self, images: torch.Tensor, folder: str | os.PathLike | None = None) -> np.ndarray:
        """mini-features of uint8 images, read back from PNGs as clean-fid reads any folder; `folder`: keep
        the PNGs there (replaced as a whole), else a temporary folder."""
        if folder is not None:
            return self.space.features(save_images(images, folder))
        with tempfile.TemporaryDirectory() as tmp:
            return self.space.features(save_images(images, Path(tmp) / "images"))

    def measure(self, images: torch.Tensor, labels, folder: str | os.PathLike | None = None) -> dict:
        """{"class_accuracy": {class, shape, color}, "fid": FeatureSpace.fid's report} of uint8 images
        sampled for `labels` (which must be eval_class_labels(num_images): the FID's reference is built for them)."""
        from ..pipelines.class_conditional import class_accuracy

        if list(labels) != self.labels:
            raise ValueError(f"the images must be sampled for eval_class_labels({self.num_images}) (the balanced "
                             f"held-out labels the reference renders show); got {len(labels)} other labels")
        acc = class_accuracy(images.float() / 255 * 2 - 1, labels, self.evaluator)
        return {"class_accuracy": acc, "fid": self.space.fid(self.features(images, folder), self.real_features)}
