"""Procedural 3D heads: a signed-distance head model rendered from EG3D-convention cameras.

Data for training a small EG3D-architecture prior by multi-view reconstruction (one latent per
identity) and for testing 3D personalization. Every identity is a pure function of
``(seed, index)``; every view comes with the 25-number EG3D camera vector it was rendered with.

Scene conventions (EG3D's FFHQ world, see :mod:`genfast.gan3d.cameras`):

* world **+y is up** (image-up), the face looks towards **+z**, the subject's left is **+x**;
  the head is centred near the origin: skull centre ~(0, 0.07, -0.04), 0.34-0.42 wide,
  chin at y ~ -0.23, nose tip at z ~ 0.25, neck down to y = -0.6. At radius 2.7 with the FFHQ
  focal 4.2647 the image spans ~0.63 units at the origin, so the head fills the frame like an
  FFHQ crop; everything lies inside EG3D's [-0.5, 0.5]^3 tri-plane box except the neck's end.
* cameras: EG3D ``LookAtPoseSampler`` on the radius-2.7 sphere looking at (0, 0, 0.2) (the FFHQ
  ``avg_camera_pivot``); yaw pi/2 + offset (offset > 0 shows the subject's left cheek), pitch
  pi/2 + offset (offset < 0 looks down on the head).
* parts: skull + jaw, neck, nose, ears, eyes (white, iris, pupil) with lids, brows, lips, hair in
  7 styles (HAIR_STYLES), optional mustache or beard and glasses; per-identity sizes and colours.
* shading: per-part albedo (skin, eye white / iris / pupil, lips, hair, brows, glasses) times a
  view-independent Lambertian term: ambient 0.32 + sky 0.12 * n_y + key light 0.62 from the
  front-top direction (0, 0.5, 1). The lighting is fixed in the world (so views are
  3D-consistent, as EG3D's view-independent radiance assumes) and mirror-symmetric.
* background: constant light grey ``BACKGROUND = (0.9, 0.9, 0.9)`` (changeable per call).

With ``asymmetry = 0`` the head is exactly symmetric about the x = 0 plane, and the renderer is
written so that the render from ``flip_yaw(c)`` is the horizontal flip of the render from ``c``
bit for bit (odd/even parts are evaluated on |x|; rays are built sign-symmetrically). With
``asymmetry > 0`` one eye sits higher, the ears differ, the hair parts to one side, the mouth and
nose tip shift and a mole appears on one cheek, all scaled by the amount.

Rendering is sphere tracing of the SDF in torch, vectorised over all rays of all views of one
identity, starting at the analytic entry into a bounding ellipsoid, with a fixed number of
iterations and active-ray compaction; normals by central differences (mirror-symmetric).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genfast.gan3d.cameras import (
    AVG_CAMERA_PIVOT,
    AVG_CAMERA_RADIUS,
    camera_rays,
    camera_vector,
    ffhq_intrinsics,
    lookat_pose,
    sample_cameras,
)

__all__ = [
    "BACKGROUND",
    "FACIAL_HAIR",
    "HAIR_STYLES",
    "HeadParams",
    "HeadsDataset",
    "head_sdf",
    "render_head",
    "render_views",
    "sample_identity",
]

BACKGROUND = (0.9, 0.9, 0.9)
HAIR_STYLES = ("short", "long", "buzz", "bun", "afro", "bangs", "bob")
FACIAL_HAIR = ("none", "mustache", "beard")

_SKIN_TONES = np.array(
    [
        [0.97, 0.82, 0.72],
        [0.93, 0.75, 0.62],
        [0.84, 0.63, 0.48],
        [0.72, 0.53, 0.37],
        [0.56, 0.38, 0.25],
        [0.38, 0.25, 0.16],
    ]
)
_HAIR_COLOURS = {  # name: (rgb, probability weight)
    "black": ((0.07, 0.06, 0.05), 0.24),
    "dark_brown": ((0.22, 0.14, 0.08), 0.22),
    "brown": ((0.42, 0.27, 0.15), 0.16),
    "auburn": ((0.58, 0.25, 0.11), 0.09),
    "blonde": ((0.86, 0.71, 0.42), 0.12),
    "grey": ((0.62, 0.62, 0.63), 0.08),
    "red_dye": ((0.72, 0.12, 0.18), 0.03),
    "blue_dye": ((0.18, 0.30, 0.72), 0.03),
    "green_dye": ((0.20, 0.58, 0.36), 0.03),
}
_EYE_COLOURS = {
    "brown": (0.38, 0.21, 0.09),
    "dark_brown": (0.20, 0.11, 0.05),
    "blue": (0.22, 0.46, 0.82),
    "green": (0.26, 0.58, 0.30),
    "hazel": (0.55, 0.42, 0.18),
    "grey": (0.52, 0.57, 0.62),
}
_HAIR_STYLE_WEIGHTS = (0.22, 0.18, 0.12, 0.1, 0.1, 0.14, 0.14)
_FACIAL_HAIR_WEIGHTS = (0.72, 0.1, 0.18)

# skull centre; all features are placed relative to it
_CY, _CZ = 0.07, -0.04
_NECK_BOTTOM = -0.6
# bounding ellipsoid of everything (used to start the sphere tracer)
_BOUND_C = (0.0, -0.05, -0.05)
_BOUND_R = (0.42, 0.62, 0.46)


@dataclass
class HeadParams:
    """Shape and colour of one procedural head (units: EG3D world units; colours: RGB in [0, 1])."""

    skin: tuple[float, float, float] = (0.93, 0.75, 0.62)
    hair: tuple[float, float, float] = (0.22, 0.14, 0.08)
    iris: tuple[float, float, float] = (0.38, 0.21, 0.09)
    lips: tuple[float, float, float] = (0.78, 0.42, 0.40)
    hair_style: str = "short"
    facial_hair: str = "none"
    glasses: bool = False
    glasses_colour: tuple[float, float, float] = (0.08, 0.08, 0.09)
    head_width: float = 0.19  # skull half-width (x radius)
    head_height: float = 0.225  # skull y radius
    head_depth: float = 0.235  # skull z radius
    jaw_width: float = 0.86  # lower-face width relative to the skull
    chin_length: float = 0.17  # lower-face y radius
    eye_spacing: float = 0.075  # eye centre |x|
    eye_height: float = 0.03  # eye centre y
    eye_size: float = 0.033  # eyeball radius
    nose_length: float = 0.075
    nose_width: float = 0.024
    nose_projection: float = 0.05
    mouth_width: float = 0.052  # lips x radius
    mouth_height: float = -0.115  # mouth centre y
    lip_thickness: float = 0.016
    ear_size: float = 1.0
    brow_thickness: float = 0.009
    hair_thickness: float = 0.028
    hairline: float = 0.16  # y of the front hairline
    hair_length: float = -0.38  # lowest y of long hair
    neck_width: float = 0.082
    asymmetry: float = 0.0
    # unit-scale asymmetry directions, multiplied by ``asymmetry`` (drawn per identity)
    asym: dict = field(
        default_factory=lambda: dict(
            eye_dy=0.0, eye_dr=0.0, ear=0.0, brow=0.0, part=0.0, mouth_dx=0.0, nose_dx=0.0, mole_side=1.0, mole_y=0.0
        )
    )

    def to_dict(self) -> dict:
        return asdict(self)


def sample_identity(seed: int, index: int, asymmetry: float = 0.0) -> HeadParams:
    """The head of identity ``index`` in the family ``seed`` (deterministic; ``asymmetry`` in [0, 1])."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x4EAD])
    u = rng.uniform

    t = u(0, 1) * (len(_SKIN_TONES) - 1)
    i0 = min(int(t), len(_SKIN_TONES) - 2)
    skin = (1 - (t - i0)) * _SKIN_TONES[i0] + (t - i0) * _SKIN_TONES[i0 + 1]
    skin = np.clip(skin * u(0.95, 1.05) + rng.normal(0, 0.015, 3), 0, 1)

    names = list(_HAIR_COLOURS)
    w = np.array([_HAIR_COLOURS[n][1] for n in names])
    hair = np.array(_HAIR_COLOURS[names[rng.choice(len(names), p=w / w.sum())]][0])
    hair = np.clip(hair * u(0.85, 1.15) + rng.normal(0, 0.02, 3), 0, 1)

    iris = np.array(list(_EYE_COLOURS.values())[rng.integers(len(_EYE_COLOURS))])
    iris = np.clip(iris + rng.normal(0, 0.03, 3), 0, 1)

    lip_tint = np.array([0.86, 0.45, 0.45]) if u(0, 1) < 0.8 else np.array([0.85, 0.15, 0.25])  # natural / lipstick
    lips = np.clip(0.55 * skin + 0.45 * lip_tint * (0.7 + 0.3 * skin.mean()), 0, 1)

    style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=np.array(_HAIR_STYLE_WEIGHTS) / sum(_HAIR_STYLE_WEIGHTS))]
    facial = FACIAL_HAIR[rng.choice(len(FACIAL_HAIR), p=np.array(_FACIAL_HAIR_WEIGHTS) / sum(_FACIAL_HAIR_WEIGHTS))]
    if style in ("long", "bob", "bun") and u(0, 1) < 0.7:
        facial = "none"
    glasses = bool(u(0, 1) < 0.15)
    frame = [(0.08, 0.08, 0.09), (0.45, 0.28, 0.12), (0.75, 0.62, 0.3), (0.6, 0.1, 0.12)][rng.integers(4)]

    head_width = u(0.168, 0.21)
    p = HeadParams(
        skin=tuple(float(v) for v in skin),
        hair=tuple(float(v) for v in hair),
        iris=tuple(float(v) for v in iris),
        lips=tuple(float(v) for v in lips),
        hair_style=style,
        facial_hair=facial,
        glasses=glasses,
        glasses_colour=tuple(float(v) for v in frame),
        head_width=head_width,
        head_height=u(0.21, 0.24),
        head_depth=u(0.22, 0.25),
        jaw_width=u(0.74, 0.97),
        chin_length=u(0.15, 0.19),
        eye_spacing=head_width * u(0.37, 0.43),
        eye_height=u(0.015, 0.04),
        eye_size=u(0.026, 0.032),
        nose_length=u(0.06, 0.09),
        nose_width=u(0.018, 0.03),
        nose_projection=u(0.035, 0.065),
        mouth_width=u(0.042, 0.062),
        mouth_height=u(-0.125, -0.105),
        lip_thickness=u(0.012, 0.02),
        ear_size=u(0.85, 1.2),
        brow_thickness=u(0.008, 0.013),
        hair_thickness={"buzz": u(0.006, 0.01), "afro": u(0.075, 0.095)}.get(style, u(0.022, 0.034)),
        hairline={"bangs": u(0.085, 0.1)}.get(style, u(0.13, 0.18)),
        hair_length={"long": u(-0.45, -0.3), "bob": u(-0.2, -0.14)}.get(style, -0.38),
        neck_width=u(0.07, 0.095),
        asymmetry=float(asymmetry),
        asym=dict(
            eye_dy=float(rng.choice([-1, 1]) * u(0.6, 1.0) * 0.014),
            eye_dr=float(rng.choice([-1, 1]) * u(0.5, 1.0) * 0.004),
            ear=float(rng.choice([-1, 1]) * u(0.6, 1.0) * 0.2),
            brow=float(rng.choice([-1, 1]) * u(0.6, 1.0) * 0.015),
            part=float(rng.choice([-1, 1]) * u(0.6, 1.0) * 0.35),
            mouth_dx=float(rng.choice([-1, 1]) * u(0.6, 1.0) * 0.012),
            nose_dx=float(rng.choice([-1, 1]) * u(0.6, 1.0) * 0.01),
            mole_side=float(rng.choice([-1, 1])),
            mole_y=float(u(-0.09, -0.02)),
        ),
    )
    return p


# ----------------------------------------------------------------------------------------------
# SDF primitives (on separate x, y, z tensors; python-float parameters broadcast for free)


def _ellipsoid(x, y, z, rx, ry, rz):
    """Inigo Quilez's bound for the distance to an ellipsoid centred at the origin."""
    k0 = torch.sqrt((x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2)
    k1 = torch.sqrt((x / (rx * rx)) ** 2 + (y / (ry * ry)) ** 2 + (z / (rz * rz)) ** 2).clamp_min(1e-9)
    return k0 * (k0 - 1.0) / k1


def _capsule(x, y, z, a, b, ra, rb=None):
    """Distance to the segment a-b with a radius going linearly from ra to rb (a round cone, approx.)."""
    bax, bay, baz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    px, py, pz = x - a[0], y - a[1], z - a[2]
    bb = bax * bax + bay * bay + baz * baz
    h = ((px * bax + py * bay + pz * baz) / bb).clamp(0.0, 1.0)
    dx, dy, dz = px - bax * h, py - bay * h, pz - baz * h
    r = ra if rb is None else ra + (rb - ra) * h
    return torch.sqrt(dx * dx + dy * dy + dz * dz) - r


def _smin(a, b, k):
    h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _side(x, pos, neg):
    """Per-side value: ``pos`` where x >= 0 (subject's left), ``neg`` elsewhere; a float when equal."""
    if pos == neg:
        return pos
    return torch.where(x >= 0, torch.as_tensor(pos, dtype=x.dtype), torch.as_tensor(neg, dtype=x.dtype))


class _Head:
    """Derived geometry of one HeadParams (python floats), and its SDF."""

    def __init__(self, p: HeadParams):
        self.p = p
        a = float(p.asymmetry)
        s = {k: float(v) * a for k, v in p.asym.items() if k not in ("mole_side", "mole_y")}
        self.s = s
        self.w, self.h, self.d = p.head_width, p.head_height, p.head_depth
        # lower face ellipsoid
        self.fcy, self.fcz = -0.05, 0.0
        self.frx, self.fry, self.frz = p.head_width * p.jaw_width, p.chin_length, 0.205
        ex, ey, er = p.eye_spacing, p.eye_height, p.eye_size
        self.eye = (ex, ey, er)
        self.eye_z = self.front_z(ex, ey) - 0.78 * er
        self.nose_top = (0.0, ey + 0.01, self.front_z(0.0, ey + 0.01) - 0.012)
        ny = ey - p.nose_length
        self.nose_tip = (0.0, ny, self.front_z(0.0, ny) + p.nose_projection - 0.012)
        self.ala = (0.0, ny - 0.004, self.front_z(0.0, ny) + 0.004)
        self.mouth = (0.0, p.mouth_height, self.front_z(0.0, p.mouth_height) - 0.004)
        self.ear = (p.head_width * 0.97, 0.005, -0.055)
        self.brow_y = ey + er + 0.018
        bz = self.front_z(ex, self.brow_y)
        self.brow_in = (ex - 0.03, self.brow_y - 0.002, bz + 0.001)
        self.brow_out = (ex + 0.036, self.brow_y + 0.006, self.front_z(ex + 0.036, self.brow_y) - 0.002)
        self.brow_z0 = bz
        self.mole = (p.asym["mole_side"] * 0.095, p.asym["mole_y"])

    # z of the front surface of the skull / lower face union (for placing features on the face)
    def front_z(self, x: float, y: float) -> float:
        zs = []
        for cx, cy, cz, rx, ry, rz in (
            (0.0, _CY, _CZ, self.w, self.h, self.d),
            (0.0, self.fcy, self.fcz, self.frx, self.fry, self.frz),
        ):
            q = 1 - ((x - cx) / rx) ** 2 - ((y - cy) / ry) ** 2
            if q > 0:
                zs.append(cz + rz * math.sqrt(q))
        return max(zs) if zs else 0.0

    def parts(self, x, y, z):
        """Part distances (skin, lips, eyes, hair, brows, glasses or None) and the distance to the eye centres."""
        p, s = self.p, self.s
        ax = x.abs()
        # --- skin: skull + lower face + neck + nose + ears
        skin = _ellipsoid(x, y - _CY, z - _CZ, self.w, self.h, self.d)
        face = _ellipsoid(x, y - self.fcy, z - self.fcz, self.frx, self.fry, self.frz)
        skin = _smin(skin, face, 0.05)
        neck = torch.maximum(
            _capsule(x, y, z, (0.0, -0.1, -0.07), (0.0, _NECK_BOTTOM - 0.1, -0.07), p.neck_width), _NECK_BOTTOM - y
        )
        skin = _smin(skin, neck, 0.05)
        ntx = self.nose_tip[0] + s.get("nose_dx", 0.0)
        nose = _capsule(x, y, z, self.nose_top, (ntx, self.nose_tip[1], self.nose_tip[2]), 0.011, p.nose_width * 0.55)
        ala = _ellipsoid(x - ntx * 0.7, y - self.ala[1], z - self.ala[2], p.nose_width * 1.05, 0.016, 0.022)
        nose = _smin(nose, ala, 0.012)
        skin = _smin(skin, nose, 0.018)
        # ears on |x| (per-side scale with asymmetry)
        es = p.ear_size * _side(x, 1.0 + s.get("ear", 0.0), 1.0 - s.get("ear", 0.0))
        ear = _ellipsoid(ax - self.ear[0], y - self.ear[1], z - self.ear[2], 0.022 * es, 0.052 * es, 0.034 * es)
        skin = _smin(skin, ear, 0.012)
        # eye sockets: carve a little so the eyes sit in the face
        ex, ey, er = self.eye
        ey_side = ey + _side(x, s.get("eye_dy", 0.0), 0.0)
        er_side = er + _side(x, s.get("eye_dr", 0.0), 0.0)
        eye_dist = torch.sqrt((ax - ex) ** 2 + (y - ey_side) ** 2 + (z - self.eye_z) ** 2)
        socket = eye_dist - (er_side + 0.006)
        skin = -_smin(-skin, socket, 0.012)
        # upper eyelids: a skin shell over the top of the eyeball
        lid = torch.maximum(eye_dist - (er_side + 0.0025), (ey_side + 0.3 * er_side) - y)
        skin = _smin(skin, lid, 0.006)
        # cheekbones and chin
        cheek = _ellipsoid(ax - 0.068, y + 0.035, z - 0.075, 0.065, 0.055, 0.08)
        skin = _smin(skin, cheek, 0.03)
        chin = _ellipsoid(x, y - (self.fcy - self.fry + 0.035), z - (self.fcz + self.frz * 0.55), 0.045, 0.035, 0.05)
        skin = _smin(skin, chin, 0.03)
        # --- lips
        mx = s.get("mouth_dx", 0.0)
        lips = _ellipsoid(x - mx, y - self.mouth[1], z - self.mouth[2], p.mouth_width, p.lip_thickness, 0.03)
        # --- eyes
        eyes = eye_dist - er_side
        # --- brows (on |x|)
        bdy = _side(x, s.get("brow", 0.0), 0.0)
        brows = _capsule(ax, y - bdy, z, self.brow_in, self.brow_out, p.brow_thickness)
        # --- hair
        hair = self._hair(x, y, z)
        # --- glasses: two rings in front of the eyes, a bridge and the arms to the ears
        glasses = None
        if p.glasses:
            gz = self.eye_z + er + 0.022
            ring_r = er * 1.55
            ring = torch.sqrt((ax - ex) ** 2 + (y - ey) ** 2)
            glasses = torch.sqrt((ring - ring_r) ** 2 + (z - gz) ** 2) - 0.0055
            bridge = _capsule(ax, y, z, (0.0, ey + 0.3 * ring_r, gz), (ex - ring_r, ey + 0.3 * ring_r, gz), 0.005)
            arm = _capsule(
                ax, y, z, (ex + ring_r, ey + 0.2 * ring_r, gz - 0.004), (self.ear[0] + 0.012, ey, -0.04), 0.0045
            )
            glasses = torch.minimum(glasses, torch.minimum(bridge, arm))
        return skin, lips, eyes, hair, brows, glasses, eye_dist

    def _hair(self, x, y, z):
        p, s = self.p, self.s
        style = p.hair_style
        t = p.hair_thickness
        shell = _ellipsoid(x, y - _CY - 0.3 * t, z - _CZ - 0.1 * t, self.w + t, self.h + t, self.d + t)
        if style == "afro":
            shell = shell + 0.007 * torch.cos(60 * x) * torch.cos(60 * y) * torch.cos(60 * z)
        # hairline: rising towards the front, lower at the temples; the parting tilts it with asymmetry
        side_drop = 0.16 if style == "afro" else 0.07
        y_line = p.hairline + 0.45 * (z - 0.2) - side_drop * (x / self.w) ** 2 + s.get("part", 0.0) * 0.12 * x
        cut = (y_line - y) / 1.3
        hair = -_smin(-shell, -cut, 0.03 if style == "afro" else 0.012)
        if style in ("long", "bob"):
            bottom = p.hair_length
            cy = 0.5 * (_CY + self.h + bottom)
            ry = 0.5 * (_CY + self.h - bottom)
            curtain = _ellipsoid(x, y - cy, z - (_CZ - 0.02), self.w + t + 0.02, ry, self.d + 0.01)
            front = z - (0.02 if style == "long" else 0.05)  # keep the face free
            curtain = torch.maximum(curtain, front)
            curtain = torch.maximum(curtain, bottom + 0.03 - y)
            hair = _smin(hair, curtain, 0.03)
        elif style == "bun":
            bun = torch.sqrt(x * x + (y - (_CY + self.h * 0.92)) ** 2 + (z - (_CZ - self.d * 0.45)) ** 2) - 0.075
            hair = _smin(hair, bun, 0.02)
        elif style == "bangs":
            fringe = _ellipsoid(x, y - (p.hairline + 0.08), z - (_CZ + 0.03), self.w * 0.92, 0.085, self.d + 0.02)
            hair = torch.minimum(hair, torch.maximum(fringe, p.hairline - 0.01 - y))
        if p.facial_hair == "beard":
            beard = _ellipsoid(x, y - self.fcy, z - self.fcz, self.frx + 0.016, self.fry + 0.02, self.frz + 0.016)
            beard = torch.maximum(beard, y - (self.mouth[1] + 0.005))
            beard = torch.maximum(beard, -(z - 0.0))
            hole = _ellipsoid(x, y - self.mouth[1], z - self.mouth[2], self.p.mouth_width + 0.012, 0.03, 0.06)
            hair = torch.minimum(hair, torch.maximum(beard, -hole))
        elif p.facial_hair == "mustache":
            my = self.mouth[1] + p.lip_thickness + 0.012
            mz = self.front_z(0.0, my) + 0.014
            must = _capsule(x.abs(), y, z, (0.0, my, mz), (p.mouth_width * 1.1, my - 0.016, mz - 0.024), 0.011, 0.007)
            hair = torch.minimum(hair, must)
        return hair

    def sdf(self, x, y, z):
        skin, lips, eyes, hair, brows, glasses, _ = self.parts(x, y, z)
        d = _smin(skin, lips, 0.008)
        d = torch.minimum(torch.minimum(d, eyes), torch.minimum(hair, brows))
        return d if glasses is None else torch.minimum(d, glasses)

    def albedo(self, x, y, z):
        """Per-point colour (P, 3) at surface points."""
        p = self.p
        skin, lips, eyes, hair, brows, glasses, eye_dist = self.parts(x, y, z)
        if glasses is None:
            glasses = torch.full_like(skin, float("inf"))
        dists = torch.stack((skin, lips, eyes, hair, brows, glasses), dim=-1)
        part = dists.argmin(dim=-1)
        ax = x.abs()
        dt = x.dtype

        skin_c = torch.tensor(p.skin, dtype=dt).expand(x.shape[0], 3).clone()
        # cheek blush and a slightly darker chin/neck
        blush = torch.exp(-(((ax - 0.085) / 0.04) ** 2 + ((y + 0.055) / 0.035) ** 2))
        skin_c = skin_c * (1 - 0.12 * blush[:, None] * torch.tensor([0.0, 1.0, 1.0], dtype=dt))
        skin_c = skin_c * (1 - 0.12 * (y < -0.2).to(dt)[:, None] * (-(y + 0.2) / 0.2).clamp(0, 1)[:, None])
        if p.asymmetry > 0:
            mx, my = self.mole
            mole = ((x - mx) ** 2 + (y - my) ** 2) < (0.011 * min(1.0, 0.5 + p.asymmetry)) ** 2
            mole = mole & (z > 0)
            skin_c = torch.where(mole[:, None], skin_c * 0.35, skin_c)

        lip_c = torch.tensor(p.lips, dtype=dt).expand_as(skin_c)
        mouth_line = (y - self.mouth[1]).abs() < 0.0035
        lip_c = torch.where(mouth_line[:, None], lip_c * 0.35, lip_c)

        # eyes: white, iris and pupil by the angle from the forward (+z) gaze direction
        ez = (z - self.eye_z) / eye_dist.clamp_min(1e-9)
        white = torch.tensor((0.95, 0.94, 0.92), dtype=dt)
        iris = torch.tensor(p.iris, dtype=dt)
        eye_c = torch.where((ez > 0.83)[:, None], iris, white)
        eye_c = torch.where((ez > 0.965)[:, None], torch.tensor((0.03, 0.03, 0.03), dtype=dt), eye_c)

        hair_base = torch.tensor(p.hair, dtype=dt)
        if p.hair_style == "afro":
            strands = 0.94 + 0.06 * torch.cos(100 * ax) * torch.cos(100 * y) * torch.cos(100 * z)
        else:  # strands radiating from the crown
            strands = 0.93 + 0.07 * torch.cos(45 * torch.atan2(ax, z + 0.06))
        hair_c = hair_base * strands[:, None]
        # facial hair (below the nose) a little darker
        hair_c = torch.where((y < self.nose_tip[1] - 0.01)[:, None], hair_c * 0.75, hair_c)
        brow_c = hair_base.expand_as(skin_c) * 0.7

        glasses_c = torch.tensor(p.glasses_colour, dtype=dt).expand_as(skin_c)
        colours = torch.stack((skin_c, lip_c, eye_c, hair_c, brow_c, glasses_c), dim=1)  # (P, 6, 3)
        return colours.gather(1, part[:, None, None].expand(-1, 1, 3))[:, 0], part


def head_sdf(params: HeadParams, points: torch.Tensor) -> torch.Tensor:
    """Signed distance (bound) of the head at world points (..., 3)."""
    head = _Head(params)
    flat = points.reshape(-1, 3)
    return head.sdf(flat[:, 0], flat[:, 1], flat[:, 2]).reshape(points.shape[:-1])


# ----------------------------------------------------------------------------------------------
# rendering

_LIGHT = (0.0, 0.5, 1.0)


def _bound_entry(o: torch.Tensor, d: torch.Tensor):
    """Entry/exit distances of rays into the bounding ellipsoid (inf where missed)."""
    c = torch.tensor(_BOUND_C, dtype=o.dtype)
    r = torch.tensor(_BOUND_R, dtype=o.dtype)
    oc = (o - c) / r
    dd = d / r
    a = (dd * dd).sum(-1)
    b = (oc * dd).sum(-1)
    cc = (oc * oc).sum(-1) - 1
    disc = b * b - a * cc
    hit = disc > 0
    sq = torch.sqrt(disc.clamp_min(0))
    t0 = ((-b - sq) / a).clamp_min(0)
    t1 = (-b + sq) / a
    return t0, t1, hit & (t1 > 0)


@torch.no_grad()
def render_head(
    params: HeadParams,
    cameras: torch.Tensor,
    resolution: int = 64,
    supersample: int = 1,
    background=BACKGROUND,
    iterations: int = 40,
    return_aux: bool = False,
    max_rays: int = 1 << 16,
):
    """Render ``params`` from ``cameras`` (N, 25) to (N, 3, H, W) float images in [0, 1].

    ``supersample`` s renders at s*resolution and averages s x s blocks (anti-aliasing).
    With ``return_aux`` also returns ``{"mask": (N,1,H,W) coverage in [0,1], "depth": (N,1,H,W)
    camera-space z (0 on background), "part": (N,1,H,W) part ids (0 skin, 1 lips, 2 eyes,
    3 hair, 4 brows, 5 glasses, -1 background; only for supersample 1)}``. Views are traced in
    chunks of about ``max_rays`` rays (keeps the working set in cache).
    """
    cameras = torch.as_tensor(cameras, dtype=torch.float32)
    if cameras.dim() == 1:
        cameras = cameras[None]
    res = resolution * supersample
    head = _Head(params)
    chunk = max(1, max_rays // (res * res))
    outs = [_trace(head, cameras[i : i + chunk], res, background, iterations) for i in range(0, len(cameras), chunk)]
    img, mask, depth, part = (torch.cat(t) for t in zip(*outs, strict=True))
    if supersample > 1:
        img = F.avg_pool2d(img, supersample)
    if not return_aux:
        return img
    aux = {"mask": mask, "depth": depth, "part": part}
    if supersample > 1:
        aux["mask"] = F.avg_pool2d(mask, supersample)
        aux["depth"] = F.avg_pool2d(depth * mask, supersample) / aux["mask"].clamp_min(1e-6)
        del aux["part"]
    return img, aux


def _trace(head: _Head, cameras: torch.Tensor, res: int, background, iterations: int):
    n = cameras.shape[0]
    origins, dirs = camera_rays(cameras, res)
    o = origins.reshape(-1, 3)
    d = dirs.reshape(-1, 3)
    total = o.shape[0]

    t_near, t_far, in_bound = _bound_entry(o, d)
    idx = torch.nonzero(in_bound).squeeze(1)
    t = t_near[idx].clone()
    tf = t_far[idx]
    oa, da = o[idx], d[idx]
    hit_t = torch.full((total,), float("inf"))
    eps = 6e-4
    for it in range(iterations):
        p = oa + t[:, None] * da
        dist = head.sdf(p[:, 0], p[:, 1], p[:, 2])
        t = t + dist * 0.95
        if it == iterations - 1:  # last step: accept near-misses of grazing rays as hits
            done_hit = dist < 4e-3
            done = torch.ones_like(done_hit)
        else:
            done_hit = dist < eps
            done = done_hit | (t > tf)
        if done.any():
            hit_t[idx[done_hit]] = t[done_hit]
            keep = ~done
            idx, t, tf, oa, da = idx[keep], t[keep], tf[keep], oa[keep], da[keep]
            if idx.numel() == 0:
                break

    hit = torch.isfinite(hit_t)
    hidx = torch.nonzero(hit).squeeze(1)
    ph = o[hidx] + hit_t[hidx, None] * d[hidx]
    x, y, z = ph[:, 0], ph[:, 1], ph[:, 2]
    e = 1e-3
    gx = head.sdf(x + e, y, z) - head.sdf(x - e, y, z)
    gy = head.sdf(x, y + e, z) - head.sdf(x, y - e, z)
    gz = head.sdf(x, y, z + e) - head.sdf(x, y, z - e)
    nrm = torch.stack((gx, gy, gz), -1)
    nrm = nrm / torch.sqrt((nrm * nrm).sum(-1, keepdim=True)).clamp_min(1e-12)
    light = torch.tensor(_LIGHT)
    light = light / light.norm()
    lam = (nrm @ light).clamp_min(0)
    shade = 0.32 + 0.12 * nrm[:, 1] + 0.62 * lam
    albedo, part = head.albedo(x, y, z)
    colour = (albedo * shade[:, None]).clamp(0, 1)

    img = torch.tensor(background, dtype=torch.float32).expand(total, 3).clone()
    img[hidx] = colour
    img = img.reshape(n, res, res, 3).permute(0, 3, 1, 2).contiguous()
    mask = hit.to(torch.float32).reshape(n, 1, res, res)
    fwd = cameras[:, [2, 6, 10]].repeat_interleave(res * res, 0)  # camera z axis (cam2world column 2), per ray
    depth = torch.zeros(total)
    depth[hidx] = hit_t[hidx] * (d[hidx] * fwd[hidx]).sum(-1)
    part_map = torch.full((total,), -1, dtype=torch.long)
    part_map[hidx] = part
    return img, mask, depth.reshape(n, 1, res, res), part_map.reshape(n, 1, res, res)


def render_views(
    params: HeadParams,
    yaw_offsets,
    pitch_offsets=0.0,
    resolution: int = 64,
    supersample: int = 1,
    radius: float = AVG_CAMERA_RADIUS,
    lookat=AVG_CAMERA_PIVOT,
    **kwargs,
):
    """Render views at yaw = pi/2 + yaw_offsets, pitch = pi/2 + pitch_offsets (broadcast, radians).

    Returns ``(images (N, 3, H, W) in [0, 1], cameras (N, 25))``.
    """
    yaw = torch.as_tensor(yaw_offsets, dtype=torch.float64).reshape(-1) + math.pi / 2
    pitch = torch.as_tensor(pitch_offsets, dtype=torch.float64).reshape(-1) + math.pi / 2
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    cams = camera_vector(lookat_pose(yaw, pitch, radius, lookat), ffhq_intrinsics())
    return render_head(params, cams, resolution, supersample, **kwargs), cams


class HeadsDataset(Dataset):
    """Multi-view renders of ``num_identities`` procedural heads, ``views_per_identity`` each.

    Item ``k`` is view ``k % views_per_identity`` of identity ``k // views_per_identity``:
    ``(image (3, H, W) float in [-1, 1], camera (25,), identity index)``. Identities come from
    :func:`sample_identity` ``(seed, i, asymmetry)``; cameras from :func:`sample_cameras` with a
    generator seeded by ``(seed, i)`` (FFHQ-like yaw clipped to ``yaw_range``, pitch to
    ``pitch_range``, radius 2.7, look-at (0, 0, 0.2), FFHQ intrinsics). Renders are cached per
    identity as uint8 the first time one of its views is asked for (``prepare()`` renders all).
    """

    def __init__(
        self,
        num_identities: int,
        views_per_identity: int = 32,
        seed: int = 0,
        resolution: int = 64,
        yaw_range: float = 0.8,
        pitch_range: float = 0.25,
        supersample: int = 2,
        asymmetry: float = 0.0,
        cache: bool = True,
    ):
        self.num_identities = int(num_identities)
        self.views_per_identity = int(views_per_identity)
        self.seed = int(seed)
        self.resolution = int(resolution)
        self.yaw_range = float(yaw_range)
        self.pitch_range = float(pitch_range)
        self.supersample = int(supersample)
        self.asymmetry = float(asymmetry)
        self.cache = cache
        self._images: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_identities * self.views_per_identity

    def identity(self, i: int) -> HeadParams:
        return sample_identity(self.seed, i, self.asymmetry)

    def cameras(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i * 7919 + 17) % (2**63))
        return sample_cameras(
            self.views_per_identity, g, yaw_max=self.yaw_range, pitch_max=self.pitch_range, intrinsics=ffhq_intrinsics()
        )

    def render_identity(self, i: int) -> torch.Tensor:
        """(V, 3, H, W) uint8 renders of identity ``i``."""
        if i in self._images:
            return self._images[i]
        img = render_head(self.identity(i), self.cameras(i), self.resolution, self.supersample)
        img = (img * 255).round().clamp(0, 255).to(torch.uint8)
        if self.cache:
            self._images[i] = img
        return img

    def prepare(self) -> HeadsDataset:
        for i in range(self.num_identities):
            self.render_identity(i)
        return self

    def __getitem__(self, k: int):
        if not 0 <= k < len(self):
            raise IndexError(k)
        i, v = divmod(int(k), self.views_per_identity)
        img = self.render_identity(i)[v].to(torch.float32) / 127.5 - 1.0
        return img, self.cameras(i)[v], i
