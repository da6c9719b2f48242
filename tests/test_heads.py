"""Procedural 3D heads (genfast.data.heads): determinism, symmetry, camera conventions."""

import math

import pytest
import torch

from genfast.data.heads import (
    _BOUND_C,
    _BOUND_R,
    BACKGROUND,
    HeadsDataset,
    head_sdf,
    render_head,
    render_views,
    sample_identity,
)
from genfast.gan3d.cameras import (
    camera_vector,
    ffhq_intrinsics,
    flip_yaw,
    frontal_camera,
    lookat_pose,
    sample_cameras,
    split_camera_vector,
)

RES = 48


def _project(c: torch.Tensor, point) -> tuple[int, int, float]:
    """Pixel (row, col) and camera-space depth of a world point seen by camera c (25,)."""
    pose, k = split_camera_vector(c.double())
    p_cam = pose[:3, :3].T @ (torch.tensor(point, dtype=torch.float64) - pose[:3, 3])
    u = k[0, 0] * p_cam[0] / p_cam[2] + k[0, 2]
    v = k[1, 1] * p_cam[1] / p_cam[2] + k[1, 2]
    return int(v * RES), int(u * RES), float(p_cam[2])


def test_identity_determinism_and_variety():
    a, b = sample_identity(0, 3), sample_identity(0, 3)
    assert a == b
    assert sample_identity(0, 4) != a and sample_identity(1, 3) != a
    cams = sample_cameras(2, torch.Generator().manual_seed(0))
    img_a = render_head(a, cams, RES)
    assert torch.equal(img_a, render_head(b, cams, RES))
    for other in (sample_identity(0, 4), sample_identity(1, 3)):
        assert (render_head(other, cams, RES) - img_a).abs().mean() > 0.02
    # the asymmetry flag only adds the asymmetric details
    sym, asym = sample_identity(0, 3, asymmetry=0.0), sample_identity(0, 3, asymmetry=0.5)
    assert sym.skin == asym.skin and sym.hair_style == asym.hair_style and asym.asymmetry == 0.5


def test_mirrored_camera_gives_flipped_image():
    cams = sample_cameras(3, torch.Generator().manual_seed(1))
    p = sample_identity(0, 3)
    img = render_head(p, cams, RES)
    mirrored = render_head(p, flip_yaw(cams), RES).flip(-1)
    torch.testing.assert_close(mirrored, img, atol=1e-5, rtol=0)
    p = sample_identity(0, 3, asymmetry=1.0)
    diff = (render_head(p, flip_yaw(cams), RES).flip(-1) - render_head(p, cams, RES)).abs()
    assert diff.max() > 0.2 and diff.mean() > 2e-3


def test_images_range_background_and_aux():
    p = sample_identity(0, 2)
    c = frontal_camera()[None]
    img, aux = render_head(p, c, RES, return_aux=True)
    assert img.shape == (1, 3, RES, RES) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    bg = torch.tensor(BACKGROUND)[:, None]
    corners = img[0, :, [0, 0, RES - 1], [0, RES - 1, 0]]  # top-left, top-right, bottom-left
    torch.testing.assert_close(corners, bg.expand(3, 3))
    assert aux["mask"][0, 0, [0, 0], [0, RES - 1]].sum() == 0
    assert aux["mask"][0, 0, RES // 2, RES // 2] == 1 and (aux["part"][0, 0, RES // 2, RES // 2] == 0)
    covered = aux["mask"].mean()
    assert 0.3 < covered < 0.85  # the head fills the frame like an FFHQ crop
    depth = aux["depth"][0, 0, RES // 2, RES // 2]
    assert 2.2 < depth < 2.7
    img2 = render_head(p, c, RES, supersample=2, background=(0.0, 0.0, 0.0))
    assert img2.shape == img.shape and img2[0, :, 0, 0].abs().max() == 0


def test_hair_on_top_and_face_towards_plus_z():
    for index in range(4):
        p = sample_identity(0, index)
        c = frontal_camera()
        _, aux = render_head(p, c[None], RES, return_aux=True)
        part = aux["part"][0, 0]
        rows = torch.arange(RES)[:, None].expand(RES, RES)
        hair_rows = rows[part == 3].float()
        skin_rows = rows[part == 0].float()
        assert hair_rows.numel() > 20
        assert hair_rows.median() < skin_rows.median()
        col = part[:, RES // 2]
        top = int(torch.nonzero(col >= 0)[0])
        assert col[top] == 3, f"identity {index}: the top of the head is not hair"
        # eyes above the lips; the face (nearest point: the nose) is at +z, facing the frontal camera
        assert rows[part == 2].float().mean() < rows[part == 1].float().mean()
        assert aux["depth"][0, 0][aux["mask"][0, 0] > 0].min() < 2.7 - 0.2
    # seen from behind (camera on -z): no eyes, mostly hair
    (_, back), _ = render_views(sample_identity(0, 1), math.pi, 0.0, resolution=RES, return_aux=True)
    part = back["part"]
    assert (part == 2).sum() == 0 and (part == 3).sum() > (part == 0).sum()


def test_yaw_shows_expected_side():
    p = sample_identity(0, 2)
    _, cams = render_views(p, torch.tensor([0.6, -0.6]), 0.0, resolution=RES)
    # subject's left ear is at +x: seen from the camera at yaw pi/2 + 0.6 (camera on the +x side) ...
    ear = (p.head_width * 0.97 + 0.022 * p.ear_size, 0.005, -0.055)
    for k, visible in ((0, True), (1, False)):
        _, aux = render_head(p, cams[k : k + 1], RES, return_aux=True)
        r, c, z = _project(cams[k], ear)
        seen = aux["depth"][0, 0, r, c].item()
        if visible:
            assert abs(seen - z) < 0.03
        else:
            assert seen < z - 0.1 or aux["mask"][0, 0, r, c] == 0
    assert cams[0][3] > 0.5 and cams[1][3] < -0.5  # camera x position


def test_camera_vectors_match_cameras_module():
    yaw_off = torch.tensor([-0.3, 0.0, 0.4])
    pitch_off = torch.tensor([0.1, 0.0, -0.2])
    _, cams = render_views(sample_identity(0, 0), yaw_off, pitch_off, resolution=16)
    expected = camera_vector(lookat_pose(math.pi / 2 + yaw_off, math.pi / 2 + pitch_off), ffhq_intrinsics())
    torch.testing.assert_close(cams, expected)
    torch.testing.assert_close(cams[1], frontal_camera())


def test_dataset():
    ds = HeadsDataset(num_identities=2, views_per_identity=3, seed=5, resolution=24, supersample=1)
    assert len(ds) == 6
    img, cam, ident = ds[4]
    assert img.shape == (3, 24, 24) and cam.shape == (25,) and ident == 1
    assert img.min() >= -1 and img.max() <= 1
    torch.testing.assert_close(cam, ds.cameras(1)[1])
    pose, k = split_camera_vector(cam)
    torch.testing.assert_close(pose[:3, 3].norm(), torch.tensor(2.7))
    torch.testing.assert_close(k, ffhq_intrinsics())
    fwd = torch.tensor([0.0, 0.0, 0.2]) - pose[:3, 3]
    torch.testing.assert_close(pose[:3, 2], fwd / fwd.norm(), atol=1e-5, rtol=0)
    # re-rendered from its own camera with render_head: the same image (up to uint8 rounding)
    again = render_head(ds.identity(1), cam[None], 24)[0] * 2 - 1
    assert (again - img).abs().max() <= 1.5 / 127.5
    ds2 = HeadsDataset(num_identities=2, views_per_identity=3, seed=5, resolution=24, supersample=1)
    assert torch.equal(ds2[4][0], img) and torch.equal(ds2[4][1], cam)
    with pytest.raises(IndexError):
        ds[6]


def test_head_inside_bounding_ellipsoid():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4000, 3, generator=g)
    pts = v / v.norm(dim=1, keepdim=True) * torch.tensor(_BOUND_R) + torch.tensor(_BOUND_C)
    for index in range(24):
        assert head_sdf(sample_identity(3, index), pts).min() > 0
