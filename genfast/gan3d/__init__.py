"""EG3D-style tri-plane GAN in plain PyTorch: cameras, generator, renderer, checkpoint loader.

>>> from genfast.gan3d import eg3d_ffhq512, load_generator
>>> G = eg3d_ffhq512()                      # official FFHQ-512 layout, random weights
>>> G = load_generator("ffhq512-128.pkl")   # official pickle, read without executing its code
"""

from .cameras import (
    camera_vector,
    ffhq_intrinsics,
    flip_yaw,
    fov_to_intrinsics,
    frontal_camera,
    lookat_pose,
    orbit_cameras,
    sample_cameras,
)
from .generator import (
    TriPlaneConfig,
    TriPlaneGenerator,
    build_generator,
    eg3d_ffhq512,
    eg3d_ffhq512_config,
    eg3d_small_config,
    parameter_counts,
)
from .loader import (
    UnsafePickleError,
    convert_eg3d,
    load_converted,
    load_eg3d,
    load_generator,
    save_converted,
)
from .video import map_z, render_orbit, write_video

__all__ = [
    "TriPlaneConfig",
    "TriPlaneGenerator",
    "UnsafePickleError",
    "build_generator",
    "camera_vector",
    "convert_eg3d",
    "eg3d_ffhq512",
    "eg3d_ffhq512_config",
    "eg3d_small_config",
    "ffhq_intrinsics",
    "flip_yaw",
    "fov_to_intrinsics",
    "frontal_camera",
    "load_converted",
    "load_eg3d",
    "load_generator",
    "lookat_pose",
    "map_z",
    "orbit_cameras",
    "parameter_counts",
    "render_orbit",
    "sample_cameras",
    "save_converted",
    "write_video",
]
