"""Faithfulness of an accelerated pipeline to the unaccelerated one at the same prompts and seeds."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP = 100.0  # identical images have infinite PSNR; cap so that averages stay numbers


def faithfulness(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB, capped at 100) and SSIM of images vs reference, both (N, 3, H, W) in [0, 1]."""
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    images, reference = images.float().clamp(0, 1), reference.float().clamp(0, 1)
    psnr = peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(images, reference, data_range=1.0, reduction="none")
    return {"psnr": float(psnr.clamp(max=PSNR_CAP).mean()), "ssim": float(ssim.mean())}
