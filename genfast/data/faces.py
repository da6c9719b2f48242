"""Face detection, FFHQ/EG3D-style alignment and a landmark pose estimate for real photos.

Preprocessing, not model code. The steps, per photo:

1. detect the face: dlib's HOG frontal detector, or OpenCV's bundled Haar cascade (the fallback
   backend, and what ``dlib`` falls back to when HOG finds nothing); a photo with no face or with
   several faces of similar size is refused, naming the file (`FaceError`);
2. dlib's 68 landmarks (the model file that the ``face-recognition-models`` package carries);
3. the crop: FFHQ's quad fixes the in-plane rotation (its x axis is eye-to-eye minus eye-to-mouth
   turned by 90 degrees, so both tilt cues count), then EG3D's own framing fixes scale and centre:
   EG3D's in-the-wild preprocessing fits the 5 points (eye centres, nose tip, mouth corners) to
   Deep3DFaceRecon's standard 3D face by a scaled orthographic projection, scales the photo so the
   standard face measures 300 px per unit inside a 1024 crop centred on its origin, keeps the
   centre 700 and resizes to 512; i.e. the crop's side is 700/300 units of that face, centred on
   its origin. EG3D does not remove roll (its cameras carry it); genfast's look-at cameras have
   no roll, so the crop is de-rotated first;
4. yaw and pitch: ``cv2.solvePnP`` of the rigid landmarks (eye corners and nose; the mouth moves
   with a smile and the jaw with speech) against a generic 3D model defined below, with EG3D's
   intrinsics (f = 4.2647 of the crop's width), converted to genfast's look-at angles.

dlib's landmarks are not mirror-symmetric (a flipped photo gets slightly different points), which
moves pitch by several degrees; every photo is therefore landmarked twice, as is and mirrored, and
the two sets averaged, so a photo and its mirror image get the same crop and mirrored angles.

Everything comes from installed packages (``pip install 'genfast[faces]'``); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..gan3d.cameras import FFHQ_FOCAL

__all__ = ["ALIGN_MODES", "AlignedFace", "FaceError", "FacesUnavailable", "align_image", "align_photo",
           "contact_sheet", "estimate_pose", "faces_available"]

ALIGN_MODES = ("auto", "dlib", "opencv", "none")
INSTALL_HINT = "pip install 'genfast[faces]'"

# Deep3DFaceRecon's standard face (from the BFM mean shape), the reference EG3D's FFHQ crops and
# cameras were made against: image-left eye, image-right eye, nose tip, left and right mouth corner;
# x right, y up, z towards the camera.
STANDARD_FACE_5 = np.array([
    [-0.31148657, 0.29036078, 0.13377953],
    [0.30979887, 0.28972036, 0.13179526],
    [0.0032535, -0.04617932, 0.55244243],
    [-0.25216928, -0.38133916, 0.22405732],
    [0.2484662, -0.38128236, 0.22235769],
])
# The generic model for the pose: dlib indices of the outer and inner eye corners, nose root, tip and
# base, and nostril wings; x right, y up, z towards the camera, in units of the distance between the
# eye centres. x and y: an average frontal face as dlib marks it; depths: adult averages (inner eye
# corners ~13 mm in front of the outer ones, nose tip ~45 mm, for 63 mm between the eyes).
POSE_LANDMARKS = [36, 39, 42, 45, 27, 30, 33, 31, 35]
POSE_MODEL = np.array([
    [-0.70, 0.0, 0.0], [-0.30, 0.0, 0.20], [0.30, 0.0, 0.20], [0.70, 0.0, 0.0],  # eye corners
    [0.0, 0.03, 0.40], [0.0, -0.58, 0.70], [0.0, -0.80, 0.48],  # nose root, tip, base
    [-0.23, -0.72, 0.32], [0.23, -0.72, 0.32],  # nostril wings
])
# dlib's 68 points under a left-right mirror: jaw, brows, nose, eyes, outer and inner lips
MIRROR_68 = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])
EG3D_RESCALE, EG3D_CROP = 300.0, 700.0  # crop_images_in_the_wild.py: align_img(rescale 300), centre crop 700

# Of two detections, the smaller one counts as a second face when its width is at least this share
# of the larger one's; smaller ones are people in the background (EG3D's MTCNN step keeps the largest).
SECOND_FACE_RATIO = 0.5
DETECT_MAX_SIDE = 1024  # detect on a copy at most this large (HOG time grows with pixels); landmarks at full size


class FaceError(ValueError):
    """A photo with no face or several faces; the message names the file."""


class FacesUnavailable(ValueError):
    """Face alignment was asked for but its packages are not installed."""


@dataclass
class AlignedFace:
    """One aligned photo: the crop (R, R, 3) uint8, its 68 landmarks (68, 2) in crop pixels
    (x right, y down; pixel centres at +0.5), and the landmark pose as offsets from frontal in radians
    (genfast's look-at convention: yaw > 0 shows the subject's left cheek, pitch < 0 looks down)."""

    image: np.ndarray
    landmarks: np.ndarray
    yaw: float
    pitch: float
    backend: str
    box: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))  # left, top, right, bottom in the photo

    def tensor(self):
        import torch

        return torch.from_numpy(self.image.astype(np.float32) / 255).permute(2, 0, 1).contiguous()


def faces_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("dlib", "cv2", "face_recognition_models"))


def _require():
    if not faces_available():
        raise FacesUnavailable(f"face detection and alignment need dlib, OpenCV and dlib's landmark model: "
                               f"{INSTALL_HINT} (or --align none for photos that are already aligned crops)")


def _model_file(name: str) -> str:
    # The package's __init__ imports pkg_resources, which new setuptools no longer ships: find its
    # folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FacesUnavailable(f"{path} is missing; reinstall face-recognition-models ({INSTALL_HINT})")
    return str(path)


@lru_cache(maxsize=1)
def _dlib_models():
    import dlib

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(_model_file("shape_predictor_68_face_landmarks.dat"))


@lru_cache(maxsize=1)
def _cascade():
    import cv2

    return cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))


def _detect_dlib(gray: np.ndarray, upsamples=None) -> list[tuple[float, float, float, float]]:
    detector, _ = _dlib_models()
    # Upsampling finds small faces but also more false ones: only when the photo is small.
    for upsample in upsamples or ((0, 1) if min(gray.shape) >= 400 else (1, 2)):
        rects = detector(gray, upsample)
        if len(rects):
            return [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
    return []


def _detect_opencv(gray: np.ndarray) -> list[tuple[float, float, float, float]]:
    import cv2

    small = min(gray.shape) < 200
    if small:  # the cascade's smallest window is 24 px; small photos are enlarged first
        gray = cv2.resize(gray, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    found = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    k = 0.5 if small else 1.0
    # Haar boxes reach higher (forehead) than HOG's, which the landmark model was trained on:
    # move them to HOG-like boxes (measured on frontal faces: ~0.9x the size, ~0.15 of it lower).
    return [(k * (x + 0.05 * w), k * (y + 0.2 * h), k * (x + 0.95 * w), k * (y + 1.1 * h)) for x, y, w, h in found]


def _landmarks(image: np.ndarray, box) -> np.ndarray:
    import dlib

    _, predictor = _dlib_models()
    rect = dlib.rectangle(*(round(v) for v in box))
    shape = predictor(image, rect)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def _five(lm68: np.ndarray) -> np.ndarray:
    """The 5 points of the standard face from 68 landmarks: eye centres (mean of the two corners, as
    Deep3DFaceRecon takes them), nose tip, mouth corners."""
    return np.stack([lm68[[36, 39]].mean(0), lm68[[42, 45]].mean(0), lm68[30], lm68[48], lm68[54]])


def _fit_standard_face(points: np.ndarray) -> tuple[float, np.ndarray]:
    """Scaled orthographic fit of the standard face to 5 image points (y down): (pixels per unit,
    image position of the face's origin). A general affine 3D->2D map by least squares, whose two
    row norms average to the scale (the fit EG3D's preprocessing uses)."""
    n = len(points)
    a = np.zeros((2 * n, 8))
    a[0::2, :3], a[0::2, 3] = STANDARD_FACE_5, 1
    a[1::2, 4:7], a[1::2, 7] = STANDARD_FACE_5, 1
    flipped = np.stack([points[:, 0], -points[:, 1]], 1)  # y up, as the standard face
    k = np.linalg.lstsq(a, flipped.reshape(-1), rcond=None)[0]
    scale = (np.linalg.norm(k[:3]) + np.linalg.norm(k[4:7])) / 2
    return float(scale), np.array([k[3], -k[7]])


def _roll(lm68: np.ndarray) -> float:
    """In-plane angle of the face (radians, image coordinates) from FFHQ's quad: its x axis is
    eye-to-eye minus eye-to-mouth turned by 90 degrees."""
    eye_l, eye_r = lm68[36:42].mean(0), lm68[42:48].mean(0)
    eye_to_eye = eye_r - eye_l
    eye_to_mouth = (lm68[48] + lm68[54]) / 2 - (eye_l + eye_r) / 2
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    return math.atan2(x[1], x[0])


def _crop_transform(lm68: np.ndarray, resolution: int) -> np.ndarray:
    """2x3 affine from photo pixels to crop pixels: de-rotated by the FFHQ quad's angle, then EG3D's
    framing (side = 700/300 standard-face units, centred on the face's origin)."""
    angle = _roll(lm68)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])  # turns the face upright
    upright = lm68 @ rot.T
    scale, origin = _fit_standard_face(_five(upright))
    side = EG3D_CROP / EG3D_RESCALE * scale  # in photo pixels
    zoom = resolution / side
    m = np.zeros((2, 3))
    m[:, :2] = zoom * rot
    m[:, 2] = (resolution - 1) / 2 - zoom * origin  # pixel indices: the centre is between the middle two
    return m


def estimate_pose(landmarks: np.ndarray, resolution: int) -> tuple[float, float]:
    """(yaw, pitch) offsets from frontal in radians, genfast's look-at convention, from 68 landmarks in
    a crop of `resolution` pixels (EG3D intrinsics: focal 4.2647 crop widths, principal point centred)."""
    import cv2

    f = FFHQ_FOCAL * resolution
    k = np.array([[f, 0, resolution / 2], [0, f, resolution / 2], [0, 0, 1]])
    # Standard face -> OpenCV object axes are the world axes of genfast's cameras (x right, y up,
    # the face looking down +z); start from the frontal camera 2.7 units away (EG3D's radius).
    rvec0 = np.array([[math.pi], [0.0], [0.0]])  # diag(1, -1, -1)
    tvec0 = np.array([[0.0], [0.0], [10.0]])  # ~2.7 world units in units of the eye distance
    ok, rvec, _ = cv2.solvePnP(POSE_MODEL, np.asarray(landmarks, np.float64)[POSE_LANDMARKS], k, None, rvec0,
                               tvec0, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return 0.0, 0.0
    world_to_cam = cv2.Rodrigues(rvec)[0]
    forward = world_to_cam[2]  # the camera's viewing direction in world axes (row 3 of R = column 3 of R^T)
    d = -forward / np.linalg.norm(forward)  # from the face towards the camera
    pitch = math.pi / 2 * (1 - float(np.clip(d[1], -1, 1)))  # inverse of phi = arccos(1 - 2 pitch / pi)
    yaw = math.atan2(d[2], -d[0])
    return yaw - math.pi / 2, pitch - math.pi / 2


def align_image(image: np.ndarray, resolution: int, backend: str = "dlib", name: str = "photo") -> AlignedFace:
    """Detect, landmark, align and pose one RGB uint8 image (H, W, 3); `name` is used in errors."""
    import cv2

    if backend not in ("dlib", "opencv"):
        raise ValueError(f"backend must be dlib or opencv, got {backend!r}")
    _require()
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    shrink = min(1.0, DETECT_MAX_SIDE / max(gray.shape))
    if shrink < 1:
        gray = cv2.resize(gray, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
    scaled = [[v / shrink for v in b] for b in (_detect_dlib(gray) if backend == "dlib" else _detect_opencv(gray))]
    found, used = _confirmed(image, scaled, backend), backend
    if not found and backend == "dlib":  # nothing HOG could confirm: the cascade's candidates
        scaled = [[v / shrink for v in b] for b in _detect_opencv(gray)]
        found, used = _confirmed(image, scaled, "opencv"), "opencv"
    if not found:
        raise FaceError(f"no face found in {name}: use a photo where the face is visible and at least "
                        f"~80 px wide, or remove it")
    found.sort(key=lambda b: b[2] - b[0], reverse=True)
    if len(found) > 1 and found[1][2] - found[1][0] >= SECOND_FACE_RATIO * (found[0][2] - found[0][0]):
        raise FaceError(f"{len(found)} faces found in {name}: use photos of the one person alone, or crop them")
    box = found[0]
    lm = _symmetric_landmarks(image, box)
    m = _crop_transform(lm, resolution)
    crop = _warp(image, m, resolution)
    crop_lm = lm @ m[:, :2].T + m[:, 2]
    yaw, pitch = estimate_pose(crop_lm, resolution)
    return AlignedFace(crop, crop_lm, yaw, pitch, used, tuple(round(v) for v in box))


def _confirmed(image: np.ndarray, boxes, backend: str, limit: int = 6) -> list:
    """The candidate boxes that are faces: each is landmarked and aligned, and the same detector must
    find a face again in the upright, canonically framed crop. Clothing patterns and textures that a
    detector takes for a face at one scale and angle (the astronaut's mission patch does) fail this."""
    import cv2

    kept = []
    for box in boxes[:limit]:
        lm = _landmarks(image, box)
        if backend == "opencv":  # move the cascade's box to where HOG would put it: around the landmarks
            lo, hi = lm[17:].min(0), lm[17:].max(0)
            box = (lo[0], lo[1], hi[0], hi[1] + 0.1 * (hi[1] - lo[1]))
            lm = _landmarks(image, box)
        size = 256
        crop = cv2.cvtColor(_warp(image, _crop_transform(lm, size), size), cv2.COLOR_RGB2GRAY)
        again = _detect_dlib(crop, upsamples=(0,)) if backend == "dlib" else _detect_opencv(crop)
        centre = np.array([size / 2, size / 2])
        if any(np.linalg.norm(np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]) - centre) < size / 4 for b in again):
            kept.append(list(box))
    return kept


def _symmetric_landmarks(image: np.ndarray, box) -> np.ndarray:
    """The mean of the landmarks of the photo and of its mirror image (mapped back, points renumbered)."""
    width = image.shape[1]
    direct = _landmarks(image, box)
    mirrored_box = (width - 1 - box[2], box[1], width - 1 - box[0], box[3])
    mirrored = _landmarks(np.ascontiguousarray(image[:, ::-1]), mirrored_box)[MIRROR_68]
    mirrored[:, 0] = width - 1 - mirrored[:, 0]
    return (direct + mirrored) / 2


def _warp(image: np.ndarray, m: np.ndarray, resolution: int) -> np.ndarray:
    """Resample the crop: at up to 4x the output size first, then an area resize (anti-aliased when the
    face is much larger than the crop); outside the photo, the photo is mirrored (as FFHQ pads)."""
    import cv2

    zoom = math.hypot(m[0, 0], m[0, 1])
    factor = max(1, min(4, round(1 / zoom)))
    big = m * factor
    big[:, 2] += (factor - 1) / 2  # keep pixel centres aligned between the two sizes
    out = cv2.warpAffine(image, big, (resolution * factor,) * 2, flags=cv2.INTER_CUBIC,
                         borderMode=cv2.BORDER_REFLECT101)
    if factor > 1:
        out = cv2.resize(out, (resolution, resolution), interpolation=cv2.INTER_AREA)
    return out


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """A photo as RGB uint8 (alpha over genfast's background); unreadable files are named."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..gan3d.photos import _rgb

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(_rgb(ImageOps.exif_transpose(im)))  # phone photos: upright as the camera held them
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read photo {path}: {err}. Remove it or replace it with a PNG/JPEG") from err


def align_photo(path: str | os.PathLike, resolution: int, backend: str = "dlib") -> AlignedFace:
    return align_image(read_rgb(path), resolution, backend, name=str(path))


def contact_sheet(images, names: list[str], landmarks=None, cell: int = 160, columns: int = 5) -> bytes:
    """PNG bytes of the crops (uint8 (R, R, 3) arrays) with their landmarks as dots and file names, so a
    user can check what the fitting saw."""
    from PIL import Image, ImageDraw

    rows = math.ceil(len(images) / columns)
    label = 14
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, name) in enumerate(zip(images, names, strict=True)):
        x, y = (i % columns) * cell, (i // columns) * (cell + label)
        sheet.paste(Image.fromarray(np.asarray(img)).resize((cell, cell), Image.LANCZOS), (x, y))
        if landmarks is not None and landmarks[i] is not None:
            k = cell / np.asarray(img).shape[1]
            for px, py in np.asarray(landmarks[i]) * k:
                draw.ellipse((x + px - 1.5, y + py - 1.5, x + px + 1.5, y + py + 1.5), fill=(0, 255, 0))
        draw.text((x + 2, y + cell + 1), name[:24], fill=(0, 0, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class PreparedPhotos:
    """What `genfast personalize` fits: the images (N, 3, R, R) in [0, 1], the landmark camera starts
    (N, 2) or None, a record for the adapter's summary, the contact sheet (PNG bytes) and a note for the user."""

    images: object
    init: object
    record: dict
    sheet: bytes
    note: str = ""


def _is_square(path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0] == im.size[1]


def prepare_photos(folder, names: list[str], centre_crops, resolution: int, mode: str = "auto",
                   cameras_given: bool = False) -> PreparedPhotos:
    """Align a photo folder (already read and checked as `centre_crops`, (N, 3, R, R)) per ``mode``:

    * ``dlib`` / ``opencv``: every photo must show exactly one face (`FaceError` names the file);
    * ``none``: the centre crops as they are;
    * ``auto``: aligned when a face is found in every photo. A folder of square images in which faces
      are not all found is taken as aligned crops already (genfast's synthetic heads, EG3D/FFHQ dataset
      crops; the note says so); otherwise the photo without a face is refused. With ``cameras_given``
      the photos are used as they are (the cameras describe them as given).
    """
    import torch

    if mode not in ALIGN_MODES:
        raise ValueError(f"align must be one of {', '.join(ALIGN_MODES)}, got {mode!r}")
    paths = [Path(folder) / n for n in names]

    def as_given(note: str) -> PreparedPhotos:
        crops = [(c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for c in centre_crops]
        return PreparedPhotos(centre_crops, None, {"align": "none"}, contact_sheet(crops, names), note)

    if mode == "none":
        return as_given("")
    if cameras_given:
        if mode != "auto":
            raise ValueError(f"--align {mode} would re-crop the photos that --cameras describes: "
                             f"leave --align at auto (or none) with --cameras")
        return as_given("photos used as given: --cameras describes them")
    square = all(_is_square(p) for p in paths)
    if mode == "auto" and not faces_available():
        if square:
            return as_given(f"square photos used as aligned crops (to detect and align faces: {INSTALL_HINT})")
        _require()
    faces, problems = [], []
    for path in paths:
        try:
            faces.append(align_photo(path, resolution, "dlib" if mode == "auto" else mode))
        except FaceError as err:
            if mode != "auto":
                raise
            problems.append(err)
    if problems:
        if square and all(str(e).startswith("no face") for e in problems):
            return as_given(f"no face found in {len(problems)} of {len(paths)} photos: the square photos are "
                            f"used as aligned crops, e.g. synthetic heads (--align dlib requires a face in each)")
        raise problems[0]
    images = torch.stack([f.tensor() for f in faces])
    init = torch.tensor([[f.yaw, f.pitch] for f in faces], dtype=torch.float64)
    backends = sorted({f.backend for f in faces})
    record = {"align": "eg3d", "detector": "+".join(backends),
              "landmark_pose_degrees": {n: [round(math.degrees(f.yaw), 2), round(math.degrees(f.pitch), 2)]
                                        for n, f in zip(names, faces, strict=True)}}
    sheet = contact_sheet([f.image for f in faces], names, [f.landmarks for f in faces])
    return PreparedPhotos(images, init, record, sheet, f"{len(faces)} faces aligned ({', '.join(backends)})")
