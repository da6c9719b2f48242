"""Loading a person's photos: any size and mode, clear errors naming the file, the folder left untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from genfast.gan3d.photos import load_photos, read_cameras, write_cameras


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_any_size_and_mode_is_centre_cropped_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 80, 3), np.uint8)).save(tmp_path / "a.jpg")   # portrait
    Image.fromarray(rng.integers(0, 255, (50, 90), np.uint8), mode="L").save(tmp_path / "b.png")  # gray, landscape
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (255, 0, 0, 255)  # an opaque red square on a transparent field
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")  # ignored: not an image extension
    before = _snapshot(tmp_path)
    names, images = load_photos(tmp_path, resolution=32)
    assert names == ["a.jpg", "b.png", "c.png"]
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(images[1, 0], images[1, 1])  # gray stays gray in all three channels
    assert images[2, :, 0, 0].tolist() == pytest.approx([230 / 255] * 3, abs=1e-6)  # transparent -> background
    assert images[2, :, 16, 16].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    assert _snapshot(tmp_path) == before  # nothing in the photos folder was modified


def test_bad_folders_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_photos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        load_photos(tmp_path / "empty")
    few = tmp_path / "few"
    few.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(few / f"{i}.png")
    with pytest.raises(ValueError, match="has 2 image"):
        load_photos(few)
    Image.new("RGB", (8, 8)).save(few / "2.png")
    (few / "3.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read photo .*3\.jpg"):
        load_photos(few)


def test_cameras_json_round_trip_and_errors(tmp_path):
    cams = torch.randn(2, 25)
    write_cameras(tmp_path / "dataset.json", ["a.png", "b.png"], cams)
    assert torch.allclose(read_cameras(tmp_path / "dataset.json", ["b.png", "a.png"]), cams.flip(0), atol=1e-5)
    with pytest.raises(ValueError, match="no camera for c.png"):
        read_cameras(tmp_path / "dataset.json", ["c.png"])
    (tmp_path / "bad.json").write_text(json.dumps({"labels": [["a.png", [1.0, 2.0]]]}))
    with pytest.raises(ValueError, match="has 2 numbers, not 25"):
        read_cameras(tmp_path / "bad.json", ["a.png"])
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="not an EG3D dataset.json"):
        read_cameras(tmp_path / "junk.json", ["a.png"])
