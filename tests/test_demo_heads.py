"""The demo's 3D heads tab as functions: an embedded identity through personalization to an orbit
video, an interpolation strip and an adapter zip that loads back; every bad input answered with a
gr.Error that names it; Cancel stops within one step; personalize's on_step reports every step of
each phase, and stopping through it leaves a work folder that a rerun resumes from."""

from __future__ import annotations

import copy
import tempfile
import zipfile
from pathlib import Path

import gradio as gr
import imageio.v2 as imageio
import pytest
import torch
from PIL import Image

from genfast.data.heads import render_views, sample_identity
from genfast.demo import heads_tab as H
from genfast.demo.common import DemoModels, Jobs, demo_dir
from genfast.eval.faithfulness import faithfulness
from genfast.gan3d import lora
from genfast.gan3d.adapter import load_personalized
from genfast.gan3d.photos import load_photos
from genfast.training.personalize import PersonalizeConfig, personalize, work_dir_of

TINY = dict(steps=2, invert_steps=1, camera_steps=1, symmetry=True)


@pytest.fixture(autouse=True)
def own_demo_dir(tmp_path, monkeypatch):
    """demo_dir() inside this test's tmp_path: what a job leaves behind is this test's to see."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    demo_dir.cache_clear()  # the process's folder is made once: here, once per test, under tmp_path
    yield
    demo_dir.cache_clear()


@pytest.fixture(scope="module")
def tab():
    return H.HeadsTab(DemoModels(), Jobs())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three 64x64 views of a held-out synthetic head, as a browser would upload them."""
    folder = tmp_path_factory.mktemp("uploads")
    images, _ = render_views(sample_identity(1, 2), torch.tensor([-0.4, 0.0, 0.4]), 0.0, 64)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"view{i}.png"))
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(paths[-1])
    return paths


def clean(prior, params: int, digest: str) -> bool:
    return sum(p.numel() for p in prior.parameters()) == params and lora.base_hash(prior) == digest


def test_embedded_identity_gives_orbit_strip_and_an_adapter_that_loads_back(tab, tmp_path):
    prior = tab.prior()
    params, digest = sum(p.numel() for p in prior.parameters()), lora.base_hash(prior)
    steps = []
    progress = lambda p, desc=None, **_: steps.append((desc, p)) if isinstance(p, tuple) else None
    video, strip, archive, table, numbers, crops = tab.run(None, H.IDENTITIES[0], **TINY, progress=progress)

    # the progress bar moved through every step of each phase
    assert steps == [("fitting cameras", (1, 1)), ("inverting photos", (1, 1)),
                     ("training adapters", (1, 2)), ("training adapters", (2, 2))]
    side = prior.img_resolution * H.SCALE
    with imageio.get_reader(video) as reader:  # (its len() is inf: list(reader) would not end)
        assert reader.count_frames() == H.ORBIT_FRAMES and reader.get_data(0).shape == (side, side, 3)
    assert video.endswith(".mp4")
    assert strip.size == (H.STRIP_FRAMES * side, side)
    assert numbers["photos"] == H.VIEWS and "inversion only" in table and "personalized" in table
    assert numbers["trained_percent"] == pytest.approx(100 * numbers["trained_parameters"] / params)
    assert {k: numbers["config"][k] for k in ("steps", "invert_steps", "camera_steps", "symmetry")} == {
        "steps": 2, "invert_steps": 1, "camera_steps": 1, "symmetry": True}
    assert crops.width > 0

    # the zip holds the adapter folder; loaded onto the clean prior it renders what the job measured
    with zipfile.ZipFile(archive) as z:
        assert {"adapter/personalize.json", "adapter/latents.safetensors", "adapter/cameras.json",
                "adapter/lora/adapter.safetensors"} <= set(z.namelist())
        z.extractall(tmp_path / "unzipped")
    G, ws, names, cams = load_personalized(copy.deepcopy(prior), tmp_path / "unzipped" / "adapter")
    assert names == numbers["photo_names"]
    job = demo_dir() / archive.split("/")[-2]
    assert sorted(p.name for p in job.iterdir()) == sorted(  # the person's photos are not kept
        [Path(archive).name, Path(video).name, "interpolation.png"])
    views = tmp_path / "views"
    views.mkdir()
    for i, view in enumerate(H._identity_views(0)[0]):
        Image.fromarray(view).save(views / f"{i:02d}.png")
    _, photos = load_photos(views, resolution=prior.img_resolution)
    measured = faithfulness(H._render(G, ws, cams), photos)["psnr"]
    assert measured == pytest.approx(numbers["reconstruction"]["personalized"]["psnr"], abs=1e-4)
    # the job trained a copy: the shared prior has no adapters, and every job got its own folder
    assert clean(prior, params, digest)
    assert [p.name for p in demo_dir().iterdir()] == [job.name]


def test_uploads_keep_their_names_and_a_clash_gets_a_suffix(tmp_path, photos):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "view0.png").write_bytes(Path(photos[1]).read_bytes())
    H._copy_uploads([*map(Path, photos), other / "view0.png"], tmp_path / "copied")
    assert sorted(p.name for p in (tmp_path / "copied").iterdir()) == ["view0-2.png", "view0.png", "view1.png",
                                                                       "view2.png"]
    assert (tmp_path / "copied" / "view0-2.png").read_bytes() == (other / "view0.png").read_bytes()


def bad_uploads(tmp_path, photos, kind: str) -> list[str]:
    if kind == "text":
        (tmp_path / "notes.png").write_text("not a picture, only a renamed text file\n")
        return [*photos, str(tmp_path / "notes.png")]
    if kind == "truncated":
        data = Path(photos[0]).read_bytes()
        (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
        return [*photos, str(tmp_path / "broken.png")]
    if kind == "no face":  # not square, so not taken for aligned crops: each needs a face
        noise = torch.Generator().manual_seed(0)
        for i in range(3):
            pixels = torch.randint(0, 256, (48, 80, 3), generator=noise, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / f"noise{i}.png")
        return [str(tmp_path / f"noise{i}.png") for i in range(3)]
    (tmp_path / "notes.txt").write_text("hello\n")
    return [*photos, str(tmp_path / "notes.txt")]


@pytest.mark.parametrize(("case", "message"), [
    ("nothing", "Upload photos of one person (at least 3; My3DGen uses about 10), or pick an embedded identity"),
    ("both", "You uploaded 3 photo(s) and picked the identity 'synthetic head 0': clear the photos or set the identity"),
    ("too few", "Upload at least 3 photos of the person (got 2); My3DGen uses about 10"),
    ("too many", "The demo takes at most 20 photos (got 21)"),
    ("text", "Cannot read notes.png as an image"),
    ("truncated", "Cannot read broken.png as an image"),
    ("not an image", "notes.txt is not an image file"),
    ("no face", "no face found in noise0.png: use a photo where the face is visible"),
    ("unknown identity", "Unknown identity 'head 9': pick one of synthetic head 0"),
    ("steps 0", "Adapter training steps must be a whole number from 1 to 300, got 0"),
    ("steps 301", "Adapter training steps must be a whole number from 1 to 300, got 301"),
    ("steps 2.5", "Adapter training steps must be a whole number from 1 to 300, got 2.5"),
    ("invert 0", "Inversion steps must be a whole number from 1 to 300, got 0"),
    ("camera 101", "Camera fitting steps must be a whole number from 1 to 100, got 101"),
    ("symmetry", "Symmetry must be on or off (true/false), got 'yes'"),
])
def test_bad_input_says_what_to_fix(tab, tmp_path, photos, case, message):
    args = dict(photos=photos, identity="none", **TINY)
    args.update({
        "nothing": dict(photos=None), "both": dict(identity=H.IDENTITIES[0]), "too few": dict(photos=photos[:2]),
        "too many": dict(photos=photos * 7), "unknown identity": dict(photos=[], identity="head 9"),
        "steps 0": dict(steps=0), "steps 301": dict(steps=301), "steps 2.5": dict(steps=2.5),
        "invert 0": dict(invert_steps=0), "camera 101": dict(camera_steps=101), "symmetry": dict(symmetry="yes"),
    }.get(case, {}))
    if case in ("text", "truncated", "not an image", "no face"):
        args["photos"] = bad_uploads(tmp_path, photos, case)
    with pytest.raises(gr.Error) as err:
        tab.run(**args, progress=lambda *a, **k: None)
    assert message in err.value.message
    assert not any(demo_dir().iterdir())  # a refused job leaves no folder behind


def test_cancel_stops_within_one_step_and_leaves_the_prior_clean(tab, photos):
    prior = tab.prior()
    params, digest = sum(p.numel() for p in prior.parameters()), lora.base_hash(prior)
    seen = []

    def progress(p, desc=None, **_):
        if isinstance(p, tuple):
            seen.append((desc, p))
            tab.cancel(None)  # the Cancel button, pressed during the first step

    with pytest.raises(gr.Error) as err:
        tab.run(photos, "none", steps=5, invert_steps=5, camera_steps=5, symmetry=True, progress=progress)
    assert err.value.message == "Cancelled."
    assert seen == [("fitting cameras", (1, 5))]
    assert not any(demo_dir().iterdir())
    assert clean(prior, params, digest)


def test_personalize_on_step_counts_each_phase_and_stops_resumably(tab, tmp_path, photos):
    folder = Path(photos[0]).parent
    names, images = load_photos(folder)
    # batch=2 fits 3 photos in two chunks: their steps add up to one count per phase
    cfg = PersonalizeConfig(steps=4, invert_steps=2, camera_steps=2, camera_starts=(0.0,), ckpt_every=2,
                            symmetry_every=2, batch=2)
    out, calls = tmp_path / "adapter", []

    class Stop(Exception):
        pass

    def stop_at_step_3(phase, step, total):
        calls.append((phase, step, total))
        if (phase, step) == ("adapters", 3):
            raise Stop

    run = lambda on_step: personalize(copy.deepcopy(tab.prior()), names, images, out, cfg,
                                      identity=tab.identity_encoder(), progress=False, on_step=on_step)
    with pytest.raises(Stop):
        run(stop_at_step_3)
    assert calls == [("cameras", s, 4) for s in (1, 2, 3, 4)] + [("latents", s, 4) for s in (1, 2, 3, 4)] + [
        ("adapters", s, 4) for s in (1, 2, 3)]
    assert work_dir_of(out).is_dir() and not out.exists()

    calls.clear()
    summary = run(lambda *a: calls.append(a))
    # cameras and latents come back from the work folder; training goes on from its step-2 checkpoint
    assert calls == [("adapters", 3, 4), ("adapters", 4, 4)]
    assert len(summary["segments_minutes"]) == 2 and not work_dir_of(out).exists()
