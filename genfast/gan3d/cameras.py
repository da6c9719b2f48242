"""EG3D camera conventions in plain torch.

A camera is the 25-vector EG3D conditions on and renders with::

    c = cam2world.reshape(16) ‖ K.reshape(9)

* ``cam2world`` is a 4x4 camera-to-world matrix in **OpenCV axes**: its columns are the camera's
  x (image right), y (image down) and z (viewing direction) axes in world coordinates, and its
  last column the camera centre.
* ``K`` is normalised by the image size: ``[[f, 0, cx], [0, f, cy], [0, 0, 1]]`` with
  ``cx = cy = 0.5``; a pixel centre ``(u, v)`` in [0, 1] maps to the camera-space direction
  ``((u - cx) / f, (v - cy) / f, 1)``. FFHQ uses ``f = 4.2647`` (``FFHQ_FOCAL``);
  ``fov_to_intrinsics(18.837)`` gives 4.2634.

World frame (as in EG3D's FFHQ models): **+y is up** (image-up for an unrolled camera), the face
looks towards **+z**, and the frontal camera sits at ``(0, 0, 2.7)`` looking down -z, so world +x
appears on the image's right (the subject's left side). Its ``cam2world`` rotation is
``diag(1, -1, -1)`` (y column ``(0, -1, 0)``).

Angles follow EG3D's ``LookAtPoseSampler`` (yaw = theta, pitch = v):

    phi    = arccos(1 - 2 * pitch / pi)        # pitch = pi/2  ->  phi = pi/2 (horizon)
    origin = radius * (sin(phi) cos(pi - yaw), cos(phi), sin(phi) sin(pi - yaw))
    forward = normalize(lookat - origin)

The camera centre lies on the sphere of ``radius`` around the *world origin* (not around the
look-at point) and looks at ``lookat``; EG3D's FFHQ generator uses ``lookat = (0, 0, 0.2)``
(``avg_camera_pivot``) and ``radius = 2.7`` (``avg_camera_radius``). ``yaw = pitch = pi/2`` is
frontal; ``yaw > pi/2`` moves the camera towards +x (showing the subject's left cheek);
``pitch < pi/2`` moves it up (+y) so it looks down on the head.

Horizontal mirroring about the x = 0 plane is ``flip_yaw``: ``M P M`` with ``M = diag(-1, 1, 1, 1)``,
i.e. negate entries [0,1], [0,2], [0,3], [1,0], [2,0]. A left-right symmetric scene rendered from
the mirrored camera is exactly the horizontally flipped render (pixel centres are symmetric about
``cx = 0.5``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "AVG_CAMERA_PIVOT",
    "AVG_CAMERA_RADIUS",
    "FFHQ_FOCAL",
    "FFHQ_FOV_DEGREES",
    "camera_origin",
    "camera_rays",
    "camera_vector",
    "ffhq_intrinsics",
    "flip_yaw",
    "fov_to_intrinsics",
    "frontal_camera",
    "lookat_pose",
    "orbit_cameras",
    "sample_cameras",
    "split_camera_vector",
]

FFHQ_FOCAL = 4.2647  # fx = fy = 2985.29 / 700, what the FFHQ data set and My3DGen hard-code
FFHQ_FOV_DEGREES = 18.837  # gen_samples.py / gen_videos.py; fov_to_intrinsics gives f = 4.2634
AVG_CAMERA_RADIUS = 2.7
MAX_YAW = 1.2  # rad either side of frontal: camera fitting and orbits keep yaw within this
AVG_CAMERA_PIVOT = (0.0, 0.0, 0.2)

# flat indices of the 16 pose entries that change sign under the x-mirror M P M
_FLIP_INDICES = (1, 2, 3, 4, 8)  # [0,1], [0,2], [0,3], [1,0], [2,0]


def _as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.as_tensor(x, dtype=dtype)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def lookat_pose(
    yaw,
    pitch,
    radius=AVG_CAMERA_RADIUS,
    lookat: Sequence[float] | torch.Tensor = AVG_CAMERA_PIVOT,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """cam2world (..., 4, 4) of EG3D's ``LookAtPoseSampler.sample(yaw, pitch, lookat, radius=radius)``.

    ``yaw``, ``pitch`` and ``radius`` are python floats or tensors and broadcast together (scalars
    give a single ``(4, 4)`` matrix); ``lookat`` is a 3-sequence or a ``(..., 3)`` tensor. Pitch is
    clamped to (1e-5, pi - 1e-5) as in EG3D. Computed in float64, returned as ``dtype``.
    """
    yaw = _as_tensor(yaw)
    device = yaw.device  # the pose follows the yaw's device (python floats and lists: the CPU)
    pitch = _as_tensor(pitch).to(device).clamp(1e-5, math.pi - 1e-5)
    radius = _as_tensor(radius).to(device)
    lookat = _as_tensor(lookat).to(device)
    shape = torch.broadcast_shapes(yaw.shape, pitch.shape, radius.shape, lookat.shape[:-1])
    yaw, pitch, radius = (t.expand(shape) for t in (yaw, pitch, radius))
    lookat = lookat.expand(*shape, 3)

    phi = torch.arccos(1 - 2 * pitch / math.pi)
    origin = torch.stack(
        (
            radius * torch.sin(phi) * torch.cos(math.pi - yaw),
            radius * torch.cos(phi),
            radius * torch.sin(phi) * torch.sin(math.pi - yaw),
        ),
        dim=-1,
    )
    forward = _normalize(lookat - origin)
    world_up = torch.zeros_like(forward)
    world_up[..., 1] = 1.0
    right = -_normalize(torch.cross(world_up, forward, dim=-1))
    up = _normalize(torch.cross(forward, right, dim=-1))

    pose = torch.zeros(*shape, 4, 4, dtype=torch.float64, device=device)
    pose[..., :3, 0] = right
    pose[..., :3, 1] = up
    pose[..., :3, 2] = forward
    pose[..., :3, 3] = origin
    pose[..., 3, 3] = 1.0
    return pose.to(dtype)


def fov_to_intrinsics(fov_degrees: float = FFHQ_FOV_DEGREES, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 3x3 intrinsics of EG3D's ``FOV_to_intrinsics``: f = 1 / (tan(fov / 2) * 1.414), cx = cy = 0.5."""
    focal = 1.0 / (math.tan(math.radians(float(fov_degrees)) / 2) * 1.414)
    return _intrinsics(focal, dtype)


def ffhq_intrinsics(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 3x3 intrinsics of the FFHQ data set (f = 4.2647, cx = cy = 0.5)."""
    return _intrinsics(FFHQ_FOCAL, dtype)


def _intrinsics(focal: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], dtype=dtype)


def camera_vector(cam2world: torch.Tensor, intrinsics: torch.Tensor | None = None) -> torch.Tensor:
    """(..., 25) = cam2world.reshape(16) ‖ K.reshape(9); ``intrinsics`` (3, 3) or (..., 3, 3), default FFHQ's."""
    if intrinsics is None:
        intrinsics = ffhq_intrinsics(cam2world.dtype)
    intrinsics = intrinsics.to(device=cam2world.device, dtype=cam2world.dtype)
    batch = torch.broadcast_shapes(cam2world.shape[:-2], intrinsics.shape[:-2])
    pose = cam2world.expand(*batch, 4, 4).reshape(*batch, 16)
    k = intrinsics.expand(*batch, 3, 3).reshape(*batch, 9)
    return torch.cat((pose, k), dim=-1)


def split_camera_vector(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`camera_vector`: (..., 25) -> (cam2world (..., 4, 4), intrinsics (..., 3, 3))."""
    if c.shape[-1] != 25:
        raise ValueError(f"camera vectors have 25 entries, got shape {tuple(c.shape)}")
    return c[..., :16].reshape(*c.shape[:-1], 4, 4), c[..., 16:].reshape(*c.shape[:-1], 3, 3)


def flip_yaw(c_or_pose: torch.Tensor) -> torch.Tensor:
    """The camera mirrored about the x = 0 plane (EG3D's ``flip_yaw``: M P M, M = diag(-1, 1, 1, 1)).

    Accepts (..., 4, 4) poses or (..., 25) camera vectors (intrinsics are kept; cx stays 0.5).
    Pure sign flips, so ``flip_yaw(flip_yaw(x)) == x`` exactly.
    """
    x = c_or_pose
    if x.shape[-2:] == (4, 4):
        flat = x.reshape(*x.shape[:-2], 16)
        return _flip_flat(flat).reshape(x.shape)
    if x.shape[-1] == 25:
        return torch.cat((_flip_flat(x[..., :16]), x[..., 16:]), dim=-1)
    raise ValueError(f"expected (..., 4, 4) poses or (..., 25) cameras, got shape {tuple(x.shape)}")


def _flip_flat(flat: torch.Tensor) -> torch.Tensor:
    sign = torch.ones(16, dtype=flat.dtype, device=flat.device)
    sign[list(_FLIP_INDICES)] = -1
    return flat * sign


def frontal_camera(
    radius=AVG_CAMERA_RADIUS,
    lookat: Sequence[float] | torch.Tensor = AVG_CAMERA_PIVOT,
    intrinsics: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The (25,) frontal camera (yaw = pitch = pi/2) EG3D conditions the mapping network on."""
    return camera_vector(lookat_pose(math.pi / 2, math.pi / 2, radius, lookat, dtype=dtype), intrinsics)


def orbit_cameras(
    n: int,
    yaw_range: float = 0.35,
    pitch_range: float = 0.25,
    radius=AVG_CAMERA_RADIUS,
    lookat: Sequence[float] | torch.Tensor = AVG_CAMERA_PIVOT,
    intrinsics: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(n, 25) cameras of gen_videos.py's orbit, t = i / n:

    yaw = pi/2 + yaw_range sin(2 pi t), pitch = pi/2 - 0.05 + pitch_range cos(2 pi t).
    """
    t = torch.arange(n, dtype=torch.float64) / n
    yaw = math.pi / 2 + yaw_range * torch.sin(2 * math.pi * t)
    pitch = math.pi / 2 - 0.05 + pitch_range * torch.cos(2 * math.pi * t)
    return camera_vector(lookat_pose(yaw, pitch, radius, lookat, dtype=dtype), intrinsics)


def sample_cameras(
    n: int,
    generator: torch.Generator | None = None,
    yaw_std: float = 0.3,
    yaw_max: float = 0.8,
    wide_fraction: float = 0.2,
    pitch_std: float = 0.1,
    pitch_max: float = 0.25,
    pitch_offset: float = 0.0,
    radius=AVG_CAMERA_RADIUS,
    lookat: Sequence[float] | torch.Tensor = AVG_CAMERA_PIVOT,
    intrinsics: torch.Tensor | None = None,
    return_angles: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """(n, 25) FFHQ-like cameras, deterministic given ``generator``.

    Distribution (offsets from the frontal pi/2, in radians):

    * yaw: a mixture; with probability ``1 - wide_fraction`` N(0, ``yaw_std``), otherwise
      uniform in [-``yaw_max``, ``yaw_max``]; clipped to +-``yaw_max``. With the defaults about
      62% of the views are within +-0.3 rad, ~91% within +-0.6 rad, tails reach +-0.8 rad.
    * pitch: ``pitch_offset`` + N(0, ``pitch_std``) clipped to +-``pitch_max`` (EG3D's pitch,
      i.e. pi/2 - pitch is roughly the elevation; < pi/2 looks down on the face).

    With ``return_angles`` returns ``(cameras, yaw, pitch)`` with the absolute angles (float64).
    """
    normal = torch.randn(n, generator=generator, dtype=torch.float64) * yaw_std
    wide = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * yaw_max
    pick_wide = torch.rand(n, generator=generator, dtype=torch.float64) < wide_fraction
    dyaw = torch.where(pick_wide, wide, normal).clamp(-yaw_max, yaw_max)
    dpitch = (pitch_offset + torch.randn(n, generator=generator, dtype=torch.float64) * pitch_std).clamp(
        -pitch_max, pitch_max
    )
    yaw = math.pi / 2 + dyaw
    pitch = math.pi / 2 + dpitch
    cams = camera_vector(lookat_pose(yaw, pitch, radius, lookat, dtype=dtype), intrinsics)
    return (cams, yaw, pitch) if return_angles else cams


def camera_origin(c_or_pose: torch.Tensor) -> torch.Tensor:
    """Camera centres (..., 3) of (..., 25) cameras or (..., 4, 4) poses."""
    pose = split_camera_vector(c_or_pose)[0] if c_or_pose.shape[-1] == 25 else c_or_pose
    return pose[..., :3, 3]


def camera_rays(c: torch.Tensor, resolution: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through pixel centres, EG3D ``RaySampler`` style (skew ignored).

    ``c``: (N, 25). Returns ``origins`` (N, H*W, 3) and unit ``directions`` (N, H*W, 3), pixels in
    row-major order (row = image y, top first; column = image x, left first).
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    pose, k = split_camera_vector(c)
    n = c.shape[0]
    fx, fy, cx, cy = k[:, 0, 0:1], k[:, 1, 1:2], k[:, 0, 2:3], k[:, 1, 2:3]
    # ((j + 0.5) / w - cx) / fx written so that mirrored pixels get exactly negated values when cx = 0.5
    u = torch.arange(w, dtype=c.dtype, device=c.device) + 0.5
    v = torch.arange(h, dtype=c.dtype, device=c.device) + 0.5
    xc = ((u[None, :] - cx * w) / (fx * w))[:, None, :].expand(n, h, w).reshape(n, h * w)
    yc = ((v[None, :] - cy * h) / (fy * h))[:, :, None].expand(n, h, w).reshape(n, h * w)
    rot = pose[:, None, :3, :3]
    # elementwise (not matmul) so the result is bit-exactly mirror-symmetric under flip_yaw
    dirs = xc[..., None] * rot[..., 0] + yc[..., None] * rot[..., 1] + rot[..., 2]
    dirs = dirs / torch.sqrt((dirs * dirs).sum(-1, keepdim=True))
    origins = pose[:, None, :3, 3].expand(n, h * w, 3)
    return origins, dirs
