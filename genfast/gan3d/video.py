"""Multi-view orbits of a tri-plane generator, written as GIF or MP4."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .cameras import ffhq_intrinsics, frontal_camera, orbit_cameras

VIDEO_FORMATS = (".gif", ".mp4")


@torch.no_grad()
def render_orbit(G, ws: torch.Tensor, frames: int = 48, yaw_range: float = 0.6, pitch_range: float = 0.2,
                 batch: int = 8, progress: bool = True) -> np.ndarray:
    """(frames, H, W, 3) uint8 views of one latent (ws: [1, num_ws, w_dim]) around EG3D's orbit.

    The renderer runs in deterministic mode, so the orbit does not shimmer from sampling jitter.
    """
    if ws.ndim != 3 or ws.shape[0] != 1:
        raise ValueError(f"render_orbit takes one latent, ws of shape [1, num_ws, w_dim]; got {tuple(ws.shape)}")
    cams = orbit_cameras(frames, yaw_range=yaw_range, pitch_range=pitch_range, intrinsics=ffhq_intrinsics()).float()
    out = []
    for i in tqdm(range(0, frames, batch), desc="render orbit", disable=not progress):
        c = cams[i : i + batch]
        img = G.synthesis(ws.expand(len(c), -1, -1), c, deterministic=True)["image"]
        out.append(to_frames(img))
    return np.concatenate(out)


def to_frames(images: torch.Tensor) -> np.ndarray:
    """Generator output (N, 3, H, W) in [-1, 1] -> uint8 frames (N, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def mapping_camera(batch: int = 1) -> torch.Tensor:
    """The camera EG3D conditions the mapping network on when generating: the frontal one, (batch, 25)."""
    return frontal_camera(intrinsics=ffhq_intrinsics()).float()[None].expand(batch, -1)


def map_z(G, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
    """ws for latents z (N, z_dim), mapped with the frontal camera as EG3D's gen_samples.py does."""
    return G.mapping(z, mapping_camera(len(z)), truncation_psi=truncation_psi)


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 24, scale: int = 1) -> Path:
    """Write uint8 frames (T, H, W, 3) to .gif (Pillow) or .mp4 (H.264 via imageio-ffmpeg), atomically."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in VIDEO_FORMATS:
        raise ValueError(f"cannot write {path.name}: give a file name ending in {' or '.join(VIDEO_FORMATS)}")
    if scale > 1:  # small renders are easier to look at enlarged; nearest keeps them honest
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        if path.suffix.lower() == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        else:
            import imageio.v2 as imageio

            # H.264 in yuv420p needs even sides; macro_block_size=1 stops imageio from resizing
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                    pixelformat="yuv420p", macro_block_size=1) as writer:
                for f in frames:
                    writer.append_data(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
