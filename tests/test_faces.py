"""Face detection and alignment on real photos: the astronaut portrait scikit-image ships, cropped,
rotated, rescaled and mirrored. Landmarks are re-detected by dlib in each aligned crop."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("dlib")
pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

from genfast.cli import main
from genfast.data.faces import FaceError, align_image, align_photo, prepare_photos
from genfast.gan3d.photos import load_photos

RES = 64  # the embedded prior's resolution
CENTRE_TOL = 0.04  # eye-mouth centre within 4% of the crop width of EG3D's framing (see below)
EYES_LEVEL_DEG = 2.0
FRONTAL_PITCH_DEG = 5.0


def _rotate(a, degrees):
    return np.asarray(Image.fromarray(a).rotate(degrees, resample=Image.BICUBIC, fillcolor=(128, 128, 128)))


def _scale(a, k):
    return np.asarray(Image.fromarray(a).resize((round(a.shape[1] * k), round(a.shape[0] * k)), Image.LANCZOS))


def astronaut_photos() -> dict[str, tuple[np.ndarray, bool]]:
    """name -> (photo, frontal?): ten variants of one real face (rotations stay frontal: roll only)."""
    img = skimage_data.astronaut()
    return {
        "full.png": (img, True),
        "crop.png": (img[20:420, 80:400], True),
        "tall.jpg": (img[0:512, 120:360], True),
        "rot10.png": (_rotate(img, 10), True),
        "rot-15.png": (_rotate(img, -15), True),
        "small.png": (_scale(img, 0.5), True),
        "zoom.png": (_scale(img[0:300, 100:380], 2.0), True),
        "flip.png": (img[:, ::-1], True),
        "flip_rot8.png": (_rotate(np.ascontiguousarray(img[:, ::-1]), 8), True),
        "flip_crop.png": (np.ascontiguousarray(img[:, ::-1][40:440, 100:420]), True),
    }


@pytest.fixture(scope="module")
def aligned():
    return {name: align_image(photo, RES, "dlib", name) for name, (photo, _) in astronaut_photos().items()}


def _eyes_and_mouth(lm):
    return lm[36:42].mean(0), lm[42:48].mean(0), lm[48:60].mean(0)


def test_every_crop_is_centred_with_eyes_level(aligned):
    """Checked on landmarks found again by dlib in the crop (at 4x, as a user would look at it), not on the
    alignment's own landmarks. EG3D's framing puts the eye-mouth centre ~2% of the width below the middle."""
    from genfast.data.faces import _symmetric_landmarks

    for name, face in aligned.items():
        big = np.asarray(Image.fromarray(face.image).resize((4 * RES, 4 * RES), Image.LANCZOS))
        lm = _symmetric_landmarks(big, (0.2 * 4 * RES, 0.2 * 4 * RES, 0.8 * 4 * RES, 0.85 * 4 * RES)) / 4
        eye_l, eye_r, mouth = _eyes_and_mouth(lm)
        centre = ((eye_l + eye_r) / 2 + mouth) / 2
        assert abs(centre[0] / RES - 0.5) < CENTRE_TOL, (name, centre)
        assert abs(centre[1] / RES - 0.52) < CENTRE_TOL, (name, centre)
        angle = math.degrees(math.atan2(eye_r[1] - eye_l[1], eye_r[0] - eye_l[0]))
        assert abs(angle) < EYES_LEVEL_DEG, (name, angle)
        # the crops are at one scale: the eye distance is ~27% of the width in EG3D's crops
        assert abs(np.linalg.norm(eye_r - eye_l) / RES - 0.28) < 0.03, name


def test_frontal_pitch_and_mirrored_yaw(aligned):
    frontal = {n for n, (_, f) in astronaut_photos().items() if f}
    for name in frontal:
        assert abs(math.degrees(aligned[name].pitch)) < FRONTAL_PITCH_DEG, (name, math.degrees(aligned[name].pitch))
    # a mirrored photo has the mirrored yaw (same magnitude, other sign) to within a degree
    assert aligned["flip.png"].yaw == pytest.approx(-aligned["full.png"].yaw, abs=math.radians(1.0))
    assert np.sign(aligned["flip.png"].yaw) == -np.sign(aligned["full.png"].yaw)


def test_camera_fit_starts_from_the_landmark_pose(aligned, monkeypatch):
    """fit_cameras(init=...) starts from the landmark estimate and stays within INIT_TRUST of it (made tiny
    here, so the two Adam steps of 0.02 rad would leave it if it were not enforced)."""
    from genfast.gan3d.cameras import split_camera_vector
    from genfast.models import load_heads_prior
    from genfast.training import personalize as P

    G, _ = load_heads_prior()
    face = aligned["flip.png"]
    targets = face.tensor()[None] * 2 - 1
    init = torch.tensor([[face.yaw, face.pitch]], dtype=torch.float64)
    monkeypatch.setattr(P, "INIT_TRUST", 1e-3)
    cams = P.fit_cameras(G, targets, P.PersonalizeConfig(camera_steps=2, camera_resolution=8), progress=False,
                         init=init)
    forward = split_camera_vector(cams)[0][0, :3, 2].double()
    yaw = math.atan2(-forward[2], forward[0]) - math.pi / 2  # the look-at angles of the fitted camera
    pitch = math.pi / 2 * (1 + forward[1]) - math.pi / 2
    # the look-at camera aims at the pivot (0, 0, 0.2), not the origin: its angles differ from the
    # camera position's by up to ~0.02 rad at these poses
    assert yaw == pytest.approx(face.yaw, abs=0.03) and pitch == pytest.approx(face.pitch, abs=0.03)
    with pytest.raises(ValueError, match=r"init must be \(N, 2\)"):
        P.fit_cameras(G, targets, P.PersonalizeConfig(camera_steps=1), progress=False, init=init[:, :1])


@pytest.fixture(scope="module")
def bad_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    img = skimage_data.astronaut()
    Image.fromarray(np.concatenate([img, img], 1)).save(root / "two_astronauts.png")
    Image.fromarray(skimage_data.coffee()).save(root / "coffee.png")
    return root


def test_no_face_and_two_faces_are_refused_naming_the_file(bad_photos):
    for backend in ("dlib", "opencv"):
        with pytest.raises(FaceError, match=r"2 faces found in .*two_astronauts\.png"):
            align_photo(bad_photos / "two_astronauts.png", RES, backend)
        with pytest.raises(FaceError, match=r"no face found in .*coffee\.png"):
            align_photo(bad_photos / "coffee.png", RES, backend)


def _folder(root, photos: dict[str, np.ndarray]):
    root.mkdir()
    for name, photo in photos.items():
        Image.fromarray(photo).save(root / name)
    return root


def test_cli_refuses_bad_photos_with_one_line(bad_photos, tmp_path, capsys):
    variants = astronaut_photos()
    for bad in ("two_astronauts.png", "coffee.png"):
        folder = _folder(tmp_path / bad, {n: variants[n][0] for n in ("crop.png", "tall.jpg", "rot10.png")})
        Image.open(bad_photos / bad).save(folder / bad)
        for align in ("auto", "dlib"):
            out = tmp_path / f"{bad}.{align}.adapter"
            assert main(["personalize", "--photos", str(folder), "--align", align, "--out", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and bad in err and "Traceback" not in err, err
            assert not out.exists()


def test_auto_aligns_real_photos_and_keeps_synthetic_heads(tmp_path):
    from genfast.data.heads import render_views, sample_identity

    variants = astronaut_photos()
    real = _folder(tmp_path / "real", {n: variants[n][0] for n in ("crop.png", "rot10.png", "flip.png")})
    names, crops = load_photos(real, RES)
    prepared = prepare_photos(real, names, crops, RES, "auto")
    assert prepared.record["align"] == "eg3d" and prepared.init.shape == (3, 2)
    assert not torch.equal(prepared.images, crops)  # aligned, not centre-cropped
    assert Image.open(io.BytesIO(prepared.sheet)).size[0] > 0
    with pytest.raises(ValueError, match="--align dlib would re-crop"):
        prepare_photos(real, names, crops, RES, "dlib", cameras_given=True)

    images, _ = render_views(sample_identity(1, 0), torch.tensor([-0.4, 0.0, 0.4]), 0.0, RES)
    heads = _folder(tmp_path / "heads", {f"{i}.png": (im.permute(1, 2, 0) * 255).round().byte().numpy()
                                         for i, im in enumerate(images)})
    names, crops = load_photos(heads, RES)
    prepared = prepare_photos(heads, names, crops, RES, "auto")  # dlib finds no face in these synthetic heads
    assert prepared.record["align"] == "none" and prepared.init is None and "aligned crops" in prepared.note
    assert torch.equal(prepared.images, crops)
    with pytest.raises(FaceError, match=r"no face found in .*0\.png"):
        prepare_photos(heads, names, crops, RES, "dlib")
    assert torch.equal(prepare_photos(heads, names, crops, RES, "none").images, crops)
