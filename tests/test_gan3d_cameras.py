"""EG3D camera conventions (genfast.gan3d.cameras)."""

import math

import torch

from genfast.gan3d.cameras import (
    FFHQ_FOCAL,
    camera_rays,
    camera_vector,
    ffhq_intrinsics,
    flip_yaw,
    fov_to_intrinsics,
    frontal_camera,
    lookat_pose,
    orbit_cameras,
    sample_cameras,
    split_camera_vector,
)

HALF_PI = math.pi / 2


def test_frontal_camera_on_z_axis_opencv_axes():
    pose = lookat_pose(HALF_PI, HALF_PI, radius=2.7, lookat=(0, 0, 0))
    assert pose.shape == (4, 4)
    torch.testing.assert_close(pose[:3, 3], torch.tensor([0.0, 0.0, 2.7]), atol=1e-6, rtol=0)
    torch.testing.assert_close(pose[:3, 2], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6, rtol=0)  # looks at origin
    torch.testing.assert_close(pose[:3, 1], torch.tensor([0.0, -1.0, 0.0]), atol=1e-6, rtol=0)  # image y is down
    torch.testing.assert_close(pose[:3, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(pose[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    c = frontal_camera()
    assert c.shape == (25,)
    torch.testing.assert_close(c[3::4][:3], torch.tensor([0.0, 0.0, 2.7]), atol=1e-6, rtol=0)


def test_rotation_orthonormal_and_looks_at_target():
    yaw = torch.tensor([0.9, 1.2, HALF_PI, 2.0, 2.3])
    pitch = torch.tensor([1.3, 1.7, HALF_PI, 1.4, 1.8])
    lookat = torch.tensor([0.0, 0.0, 0.2])
    pose = lookat_pose(yaw, pitch, 2.7, lookat, dtype=torch.float64)
    assert pose.shape == (5, 4, 4)
    rot = pose[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3, dtype=torch.float64).expand(5, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(5, dtype=torch.float64))
    to_target = lookat - pose[:, :3, 3]
    torch.testing.assert_close(rot[:, :, 2], to_target / to_target.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(pose[:, :3, 3].norm(dim=-1), torch.full((5,), 2.7, dtype=torch.float64))
    assert (rot[:, 1, 0].abs() < 1e-12).all()  # no roll: the image x axis stays horizontal


def test_yaw_and_pitch_directions():
    right = lookat_pose(HALF_PI + 0.4, HALF_PI, lookat=(0, 0, 0))
    up = lookat_pose(HALF_PI, HALF_PI - 0.3, lookat=(0, 0, 0))
    assert right[0, 3] > 0.5  # larger yaw -> camera towards +x
    assert up[1, 3] > 0.3  # smaller pitch -> camera above the head


def test_flip_yaw_involution_and_mirror():
    c = sample_cameras(16, torch.Generator().manual_seed(0))
    assert torch.equal(flip_yaw(flip_yaw(c)), c)
    pose = split_camera_vector(c)[0]
    assert torch.equal(flip_yaw(flip_yaw(pose)), pose)
    m = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(flip_yaw(pose), m @ pose @ m)
    torch.testing.assert_close(flip_yaw(c)[:, 16:], c[:, 16:])
    for d in (0.1, 0.35, 0.7):
        for p in (HALF_PI - 0.2, HALF_PI, HALF_PI + 0.15):
            for lookat in ((0, 0, 0), (0, 0, 0.2), (0, 0.05, 0.2)):
                a = lookat_pose(HALF_PI + d, p, lookat=lookat, dtype=torch.float64)
                b = lookat_pose(HALF_PI - d, p, lookat=lookat, dtype=torch.float64)
                torch.testing.assert_close(flip_yaw(a), b)


def test_intrinsics():
    k = fov_to_intrinsics(18.837)
    assert abs(k[0, 0].item() - 4.2634) < 1e-3 and k[0, 0] == k[1, 1]
    assert k[0, 2] == 0.5 and k[1, 2] == 0.5 and k[2, 2] == 1
    assert ffhq_intrinsics()[0, 0].item() == torch.tensor(FFHQ_FOCAL).item()


def test_camera_vector_round_trip():
    pose = lookat_pose(torch.tensor([1.2, 1.9]), torch.tensor([1.5, 1.6]))
    k = ffhq_intrinsics()
    c = camera_vector(pose, k)
    assert c.shape == (2, 25)
    torch.testing.assert_close(c[0, :16], pose[0].reshape(16))
    p2, k2 = split_camera_vector(c)
    assert torch.equal(p2, pose) and torch.equal(k2, k.expand(2, 3, 3))


def test_orbit_and_sampler():
    orbit = orbit_cameras(120)
    assert orbit.shape == (120, 25)
    c1 = sample_cameras(32, torch.Generator().manual_seed(3))
    c2 = sample_cameras(32, torch.Generator().manual_seed(3))
    assert torch.equal(c1, c2)
    _, yaw, pitch = sample_cameras(2000, torch.Generator().manual_seed(1), return_angles=True)
    assert (yaw - HALF_PI).abs().max() <= 0.8 + 1e-9 and (pitch - HALF_PI).abs().max() <= 0.25 + 1e-9
    assert 0.5 < ((yaw - HALF_PI).abs() < 0.3).double().mean() < 0.75


def test_camera_rays_centre_and_mirror():
    c = frontal_camera(lookat=(0, 0, 0)).unsqueeze(0)
    _, dirs = camera_rays(c, 4)
    assert dirs.shape == (1, 16, 3)
    torch.testing.assert_close(dirs.mean(1)[0] / dirs.mean(1)[0].norm(), torch.tensor([0.0, 0.0, -1.0]))
    grid = dirs.reshape(4, 4, 3)
    assert grid[0, 0, 1] > 0 and grid[0, 0, 0] < 0  # top-left pixel: world up (+y) and left (-x)
    # mirrored camera: rays of the horizontally flipped image are the x-mirrored rays
    c2 = sample_cameras(3, torch.Generator().manual_seed(0))
    o1, d1 = camera_rays(c2, 5)
    o2, d2 = camera_rays(flip_yaw(c2), 5)
    d2_flipped = d2.reshape(3, 5, 5, 3).flip(2).reshape(3, 25, 3)
    sign = torch.tensor([-1.0, 1.0, 1.0])
    torch.testing.assert_close(d2_flipped, d1 * sign)
    torch.testing.assert_close(o2, o1 * sign)
