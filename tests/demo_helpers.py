"""What the demo's tests compare against: the same prompt and seed through plain genfast, outside the demo."""

import numpy as np
import torch
from PIL import Image


def shrink(image, side: int = 64) -> np.ndarray:
    """A demo image (enlarged by an integer factor, nearest) back to genfast-mini's pixels: HWC uint8."""
    array = np.asarray(Image.open(image).convert("RGB") if isinstance(image, str) else image.convert("RGB"))
    k = array.shape[0] // side
    return array[::k, ::k]


def direct(pipe, prompt: str, seed: int, steps: int, guidance: float, methods=()) -> np.ndarray:
    """HWC uint8 image of `pipe` with `methods` ((name, options) pairs, any verb's) applied by genfast."""
    from genfast.api import apply_method

    handles = [apply_method(pipe, name, **options) for name, options in methods]
    try:
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                   generator=torch.Generator().manual_seed(seed)).images[0]
    finally:
        for handle in reversed(handles):
            handle.remove()
    return (out.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
