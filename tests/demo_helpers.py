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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def assert_own_image(image: np.ndarray, seed: int, references: dict[int, np.ndarray]) -> None:
    """A job that ran beside others got the image of its own seed.

    Jobs running at once share the CPU's intra-op threads, and a reduction split over fewer threads
    rounds differently, so a concurrent image may differ from a lone run's by a few levels (CI saw 8 of
    255 after 8 steps); bit equality is tested on jobs that run alone. Here: close to its own seed's
    image (>= 30 dB) and much closer to it than to any other seed's (>= 10 dB margin)."""
    own = psnr(image, references[seed])
    others = [psnr(image, ref) for s, ref in references.items() if s != seed]
    assert own >= 30 and all(own >= o + 10 for o in others), (seed, own, others)
