"""My3DGen personalization on the embedded prior: files, exact reload, base check, resume by content,
the work-folder lock, tampered checkpoints, the symmetry term, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil

import pytest
import torch
from PIL import Image
from planted import assert_planted_pickles_refused, payload
from safetensors.torch import load_file

import genfast.training.loop as loop_mod
import genfast.training.personalize as pers
from genfast.cli import main
from genfast.data.heads import render_views, sample_identity
from genfast.gan3d import lora
from genfast.gan3d.adapter import load_personalized
from genfast.gan3d.identity import load_identity_encoder
from genfast.gan3d.photos import load_photos, write_cameras
from genfast.gan3d.video import map_z
from genfast.models import load_heads_prior
from genfast.training.loop import WorkDirLock, WorkDirLocked
from genfast.training.personalize import PersonalizeConfig, personalize, symmetry_loss, work_dir_of

FAST = PersonalizeConfig(steps=4, invert_steps=3, camera_steps=2, symmetry_every=2, ckpt_every=2,
                         camera_starts=(-0.3, 0.3))


def save_png(image: torch.Tensor, path) -> None:
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("personal")
    base, _ = load_heads_prior()
    identity = load_identity_encoder()
    images, cams = render_views(sample_identity(1, 0), torch.tensor([-0.4, 0.0, 0.4]), 0.0, base.img_resolution)
    photos = root / "photos"
    photos.mkdir()
    for i, im in enumerate(images):
        save_png(im, photos / f"{i}.png")
    write_cameras(root / "dataset.json", ["0.png", "1.png", "2.png"], cams)  # for commands: no camera fitting
    return root, base, identity, photos, cams.float()


@pytest.fixture(scope="module")
def straight(setup):
    """One uninterrupted run (cameras fitted, photos inverted, adapters trained): the reference."""
    root, base, identity, photos, _ = setup
    names, images = load_photos(photos)
    G = copy.deepcopy(base)
    summary = personalize(G, names, images, root / "straight", FAST, identity=identity, progress=False)
    return root / "straight", G, summary


def adapter_tensors(out):
    return load_file(str(out / "lora" / lora.ADAPTER_WEIGHTS)), load_file(str(out / "latents.safetensors"))["ws"]


def interrupt(monkeypatch, name: str, at_call: int):
    """Make genfast.training.personalize.<name> raise KeyboardInterrupt on its `at_call`-th call (1-based)."""
    real, calls = getattr(pers, name), {"n": 0}

    def stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pers, name, stop)


def interrupted_run(monkeypatch, names, images, out, identity, base, cfg=FAST, **kwargs):
    """A run stopped in training step 2 (symmetry runs at steps 0 and 2), after the step-2 checkpoint."""
    interrupt(monkeypatch, "symmetry_loss", 2)
    with pytest.raises(KeyboardInterrupt):
        personalize(copy.deepcopy(base), names, images, out, cfg, identity=identity, progress=False, **kwargs)
    monkeypatch.undo()
    assert work_dir_of(out).is_dir() and not out.exists()


def test_adapter_reloads_exactly_and_refuses_another_base(setup, straight):
    _root, base, _, _photos, _ = setup
    out, G, summary = straight
    assert sorted(p.name for p in out.iterdir()) == ["cameras.json", "latents.safetensors", "lora", "personalize.json"]
    assert summary["photos"] == ["0.png", "1.png", "2.png"]
    assert summary["trainable_parameters"] == lora.count_lora_parameters(G)
    assert not work_dir_of(out).exists()  # finished: the work folder goes, a rerun starts afresh
    G2, ws, names, cams = load_personalized(copy.deepcopy(base), out)
    assert names == summary["photos"] and ws.shape[0] == 3 and cams.shape == (3, 25)
    with torch.no_grad():
        a = G.synthesis(ws, cams, deterministic=True)["image"]
        b = G2.synthesis(ws, cams, deterministic=True)["image"]
        plain = base.synthesis(ws, cams, deterministic=True)["image"]
    assert torch.equal(a, b) and not torch.equal(a, plain)  # trained, and reloaded bit for bit

    other = copy.deepcopy(base)
    with torch.no_grad():
        other.decoder.net[0].weight.mul_(1.001)  # another base: a slightly different decoder
    recorded = summary["base_hash"]
    assert lora.base_hash(other) != recorded
    with pytest.raises(ValueError, match="trained on base generator"):
        load_personalized(other, out)
    # The caller's hash never replaces the generator's own: the recorded one does not unlock another base.
    with pytest.raises(ValueError, match="does not match this generator's base"):
        lora.load_adapter(other, out / "lora", base_hash=recorded)
    with pytest.raises(ValueError, match="trained on base generator"):
        lora.load_adapter(other, out / "lora", base_hash=lora.base_hash(other))
    assert lora.get_lora_state(other) is None


@pytest.mark.parametrize("where", ["inversion", "training"])
def test_interrupted_run_resumes_to_the_same_adapter(setup, straight, monkeypatch, where):
    """Stopped during inversion (cameras cached) or in training step 2 (after a checkpoint), then rerun:
    the adapter, latents and cameras are bit for bit those of the uninterrupted run (CPU)."""
    root, base, identity, photos, _ = setup
    names, images = load_photos(photos)
    out = root / f"resumed-{where}"
    if where == "inversion":
        interrupt(monkeypatch, "invert", 1)
        with pytest.raises(KeyboardInterrupt):
            personalize(copy.deepcopy(base), names, images, out, FAST, identity=identity, progress=False)
        monkeypatch.undo()
        assert (work_dir_of(out) / "cameras.safetensors").is_file()
    else:
        interrupted_run(monkeypatch, names, images, out, identity, base)
    logs = []
    personalize(copy.deepcopy(base), names, images, out, FAST, identity=identity, progress=False, log=logs.append)
    assert any("resumed at step 2" in line for line in logs) == (where == "training"), logs
    reference, resumed = adapter_tensors(straight[0]), adapter_tensors(out)
    assert reference[0].keys() == resumed[0].keys()
    assert all(torch.equal(reference[0][k], resumed[0][k]) for k in reference[0])
    assert torch.equal(reference[1], resumed[1])
    assert (straight[0] / "cameras.json").read_text() == (out / "cameras.json").read_text()


def test_renamed_photos_resume_and_changed_photos_are_refused(setup, straight, tmp_path, monkeypatch):
    """Inputs are checked by content: renamed (and re-sorted) copies of the photos resume to the same
    adapter; a photo with its old name but other pixels, another base or other settings are refused."""
    _root, base, identity, photos, _ = setup
    names, images = load_photos(photos)
    out = tmp_path / "me"
    interrupted_run(monkeypatch, names, images, out, identity, base)

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for old, new in (("0.png", "c.png"), ("1.png", "a.png"), ("2.png", "b.png")):  # another sort order too
        shutil.copy(photos / old, renamed / new)
    new_names, new_images = load_photos(renamed)
    assert new_names == ["a.png", "b.png", "c.png"]

    changed = tmp_path / "changed"
    shutil.copytree(photos, changed)
    other_view, _ = render_views(sample_identity(1, 5), torch.tensor([0.0]), 0.0, base.img_resolution)
    save_png(other_view[0], changed / "1.png")
    with pytest.raises(ValueError, match=r"other settings \(photo 1\.png has other content than the 1\.png it "
                                         r"started with; its photo 1\.png is missing\).*delete"):
        personalize(copy.deepcopy(base), *load_photos(changed), out, FAST, identity=identity, progress=False)
    other_base = copy.deepcopy(base)
    with torch.no_grad():
        other_base.decoder.net[0].weight.mul_(1.001)
    with pytest.raises(ValueError, match=r"other settings \(base_hash\)"):
        personalize(other_base, names, images, out, FAST, identity=identity, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(rank\)"):
        personalize(copy.deepcopy(base), names, images, out, dataclasses.replace(FAST, rank=2), identity=identity,
                    progress=False)
    other_identity = copy.deepcopy(identity)
    with torch.no_grad():
        other_identity.net[-1].bias.add_(0.01)
    with pytest.raises(ValueError, match=r"other settings \(identity\)"):
        personalize(copy.deepcopy(base), names, images, out, FAST, identity=other_identity, progress=False)

    logs = []
    summary = personalize(copy.deepcopy(base), new_names, new_images, out, FAST, identity=identity, progress=False,
                          log=logs.append)
    assert any("resumed at step 2" in line for line in logs), logs
    assert summary["photos"] == new_names
    reference, resumed = adapter_tensors(straight[0]), adapter_tensors(out)
    assert all(torch.equal(reference[0][k], resumed[0][k]) for k in reference[0])
    assert torch.equal(resumed[1], reference[1][[1, 2, 0]])  # a.png is 1.png, b.png 2.png, c.png 0.png


def test_steps_may_change_on_resume(setup, tmp_path, monkeypatch):
    _root, base, identity, photos, cams = setup
    names, images = load_photos(photos)
    interrupted_run(monkeypatch, names, images, tmp_path / "me", identity, base, cameras=cams)
    with pytest.raises(ValueError, match="has trained 2 steps, more than steps=1"):
        personalize(copy.deepcopy(base), names, images, tmp_path / "me", dataclasses.replace(FAST, steps=1),
                    cameras=cams, identity=identity, progress=False)
    logs = []
    summary = personalize(copy.deepcopy(base), names, images, tmp_path / "me", dataclasses.replace(FAST, steps=5),
                          cameras=cams, identity=identity, progress=False, log=logs.append)
    assert summary["config"]["steps"] == 5 and any("resumed at step 2" in line for line in logs)
    _, _, _, saved = load_personalized(copy.deepcopy(base), tmp_path / "me")
    assert torch.allclose(saved, cams, atol=1e-5)  # given cameras are used as given


def test_planted_pickle_in_the_work_folder_is_refused_and_never_runs(setup, tmp_path, monkeypatch):
    """As `custom_checkpoint_0.pkl` beside a real checkpoint and in place of its real files: refused on
    rerun, naming the file, and the payload never runs."""
    _, base, identity, photos, cams = setup
    names, images = load_photos(photos)
    out = tmp_path / "me"
    interrupted_run(monkeypatch, names, images, out, identity, base, cameras=cams)

    def rerun():
        personalize(copy.deepcopy(base), names, images, out, FAST, cameras=cams, identity=identity, progress=False)

    assert_planted_pickles_refused(work_dir_of(out) / "checkpoints", rerun, tmp_path)
    rerun()  # the pristine checkpoint is back: the run resumes and finishes
    assert (out / "personalize.json").is_file()


def test_tampered_phase_file_is_refused(setup, tmp_path, monkeypatch):
    _root, base, identity, photos, _ = setup
    names, images = load_photos(photos)
    out = tmp_path / "me"
    interrupted_run(monkeypatch, names, images, out, identity, base)
    marker = tmp_path / "payload-ran"
    (work_dir_of(out) / "latents.safetensors").write_bytes(payload(marker))
    with pytest.raises(ValueError, match=r"latents\.safetensors is missing or was changed.*delete"):
        personalize(copy.deepcopy(base), names, images, out, FAST, identity=identity, progress=False)
    assert not marker.exists()


def test_second_run_on_the_same_out_is_refused_while_the_first_runs(setup, tmp_path, monkeypatch, capsys):
    _root, base, identity, photos, cams = setup
    names, images = load_photos(photos)
    out = tmp_path / "me"
    real, seen = pers.symmetry_loss, []

    def second_run_meanwhile(*args, **kwargs):  # runs inside the first run's training, lock held
        if not seen:
            with pytest.raises(WorkDirLocked, match="me.work") as err:
                personalize(copy.deepcopy(base), names, images, out, FAST, cameras=cams, identity=identity,
                            progress=False)
            seen.append(str(err.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(pers, "symmetry_loss", second_run_meanwhile)
    personalize(copy.deepcopy(base), names, images, out, FAST, cameras=cams, identity=identity, progress=False)
    monkeypatch.undo()
    assert seen and (out / "personalize.json").is_file()  # refused, and the first run finished unharmed

    with WorkDirLock(work_dir_of(tmp_path / "cli")):  # another process's run, as the command sees it
        assert main(["personalize", "--photos", str(photos), "--steps", "1", "--invert-steps", "1",
                     "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "genfast personalize: error:" in err and "cli.work" in err and "Traceback" not in err


def test_symmetry_loss_is_near_zero_on_a_symmetric_head_and_not_on_an_asymmetric_one(setup):
    """Real renders of the embedded prior (trained on mirror-symmetric heads) vs the same prior with one
    side (x > 0) of its tri-planes perturbed; the embedded identity encoder behind both."""
    _, base, identity, _, _ = setup
    G = copy.deepcopy(base)
    z = torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ws = map_z(G, z)
        symmetric = symmetry_loss(G, ws, identity, torch.Generator().manual_seed(1))
        planes = G.planes

        def one_side_perturbed(w, **kwargs):
            p = planes(w, **kwargs).clone()
            g, half = torch.Generator().manual_seed(3), p.shape[-1] // 2
            # x is the first in-plane axis (width) of the XY and XZ planes and the second (height) of ZX
            p[:, :2, ..., half:] += torch.randn(p[:, :2, ..., half:].shape, generator=g) * p.std()
            p[:, 2, :, half:, :] += torch.randn(p[:, 2, :, half:, :].shape, generator=g) * p.std()
            return p

        G.planes = one_side_perturbed
        asymmetric = symmetry_loss(G, ws, identity, torch.Generator().manual_seed(1))
    assert symmetric < 0.01
    assert asymmetric > 10 * symmetric and asymmetric > 0.05


def test_full_finetuning_row(setup, tmp_path):
    _root, base, identity, photos, cams = setup
    names, images = load_photos(photos)
    cfg = dataclasses.replace(FAST, full_finetune=True, symmetry=False,
                              symmetry_every=PersonalizeConfig.symmetry_every)  # moot without symmetry: refused
    G = copy.deepcopy(base)
    summary = personalize(G, names, images, tmp_path / "full", cfg, cameras=cams, identity=identity,
                          progress=False)
    assert summary["trainable_parameters"] == sum(
        p.numel() for part in (base.backbone.synthesis, base.superresolution) for p in part.parameters())
    G2, ws, _, c = load_personalized(copy.deepcopy(base), tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(G.synthesis(ws, c, deterministic=True)["image"],
                           G2.synthesis(ws, c, deterministic=True)["image"])


def test_cli_personalize_render_interpolate(setup, tmp_path, capsys):
    root, _, _, photos, _ = setup
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    out = tmp_path / "me"
    assert main(["personalize", "--photos", str(photos), "--cameras", str(root / "dataset.json"), "--steps", "2",
                 "--invert-steps", "3", "--no-symmetry", "--out", str(out)]) == 0
    assert "3 photos" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # the photos are never modified
    assert main(["render", "--adapter", str(out), "--frames", "2", "--out", str(tmp_path / "me.gif")]) == 0
    assert main(["interpolate", "--adapter", str(out), "0.png", "2.png", "--steps", "3",
                 "--out", str(tmp_path / "interp")]) == 0
    assert (tmp_path / "interp" / "interpolation.png").is_file()
    assert main(["interpolate", "--adapter", str(out), "0.png", "9.png", "--out", str(tmp_path / "x")]) == 2
    assert "9.png is neither one of the adapter's photos (0.png, 1.png, 2.png) nor an image file" in (
        capsys.readouterr().err)
    few = tmp_path / "few"
    few.mkdir()
    Image.new("RGB", (8, 8)).save(few / "a.png")
    assert main(["personalize", "--photos", str(few), "--out", str(out)]) == 2
    assert "at least 3 photos" in capsys.readouterr().err


def test_interpolate_fits_a_new_photo(setup, straight, tmp_path):
    """An image that is not one of the adapter's photos gets its camera and latent fitted first."""
    from genfast.cli_gan3d import _photo_latent
    from genfast.gan3d.photos import load_photo

    _root, base, _identity, photos, _cams = setup
    G, ws, names, _ = load_personalized(copy.deepcopy(base), straight[0])
    G.requires_grad_(False)
    assert torch.equal(_photo_latent(G, str(photos / "1.png"), ws, names, 5), ws[1:2])  # stored: no fitting
    new = tmp_path / "new.jpg"
    image, cam = render_views(sample_identity(1, 0), torch.tensor([0.2]), 0.1, 64)
    save_png(image[0], new)
    w = _photo_latent(G, str(new), ws, names, 20)
    assert w.shape == ws[:1].shape
    target = load_photo(new, 64)[None] * 2 - 1
    with torch.no_grad():
        fitted = G.synthesis(w, cam.float(), deterministic=True)["image"]
        start = G.synthesis(G.backbone.mapping.w_avg[None, None].expand_as(w), cam.float(), deterministic=True)
    assert (fitted - target).square().mean() < (start["image"] - target).square().mean()


def test_cli_personalize_with_arcface_weights(setup, tmp_path, capsys):
    """--arcface PTH puts ArcFace IR-SE50 behind the symmetry term; a missing file stops before any work."""
    from genfast.gan3d.arcface import ArcFaceIRSE50

    root, _, _, photos, _ = setup
    torch.manual_seed(3)
    torch.save(ArcFaceIRSE50().state_dict(), tmp_path / "model_ir_se50.pth")  # random: plumbing only
    out = tmp_path / "me"
    assert main(["personalize", "--photos", str(photos), "--cameras", str(root / "dataset.json"), "--steps", "1",
                 "--invert-steps", "2",
                 "--arcface", str(tmp_path / "model_ir_se50.pth"), "--out", str(out)]) == 0
    assert "symmetry identity network: ArcFace IR-SE50" in capsys.readouterr().out
    assert main(["personalize", "--photos", str(photos), "--arcface", str(tmp_path / "missing.pth"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "missing.pth" in capsys.readouterr().err and not (tmp_path / "x.work").exists()


@pytest.mark.parametrize("space", ["w", "w+"])
def test_inversion_in_w_and_w_plus(setup, space):
    _, base, _, photos, cams = setup
    _, images = load_photos(photos)
    targets = images * 2 - 1
    cfg = dataclasses.replace(FAST, invert_steps=6, latent_space=space)
    ws = pers.invert(base, targets, cams, cfg, progress=False)
    assert ws.shape == (3, base.num_ws, base.backbone.mapping.w_avg.shape[0])
    assert torch.equal(ws[:, :1].expand_as(ws), ws) == (space == "w")  # W: every layer shares one w
    with torch.no_grad():
        start = base.backbone.mapping.w_avg[None, None].expand_as(ws)
        fitted = pers._recon(base.synthesis(ws, cams, deterministic=True), targets)
        assert fitted < pers._recon(base.synthesis(start, cams, deterministic=True), targets)
    with pytest.raises(ValueError, match="latent_space must be one of w, w\\+"):
        PersonalizeConfig(latent_space="z")


# ---- limits and clean errors: one line, exit 2, no traceback, nothing written ----

def assert_clean_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("field, value, message", [
    ("alpha", -1.0, "alpha must be a finite number > 0"),
    ("alpha", float("nan"), "alpha must be a finite number > 0"),
    ("rank", 0, "rank must be an integer >= 1"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("steps", 2.5, "steps must be an integer >= 1"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("invert_lr", -0.1, "invert_lr must be a finite number > 0"),
    ("symmetry_weight", 0.0, "symmetry_weight must be a finite number > 0"),
    ("identity_weight", -1.0, "identity_weight must be a finite number >= 0"),
    ("symmetry_every", 0, "symmetry_every must be an integer >= 1"),
    ("invert_steps", 0, "invert_steps must be an integer >= 1"),
    ("camera_steps", 0, "camera_steps must be an integer >= 1"),
    ("camera_resolution", 2, "camera_resolution must be an integer >= 4"),
    ("ckpt_every", 0, "ckpt_every must be an integer >= 1"),
    ("ckpt_minutes", 0.0, "ckpt_minutes must be a finite number > 0"),
    ("batch", 0, "batch must be an integer >= 1"),
    ("conv_layout", "big", "conv_layout must be one of my3dgen, loralib"),
    ("camera_starts", (0.0, 2.0), "camera_starts must be a non-empty tuple of yaws in [-1.2, 1.2]"),
    ("camera_starts", (), "camera_starts must be a non-empty tuple"),
    ("symmetry", "yes", "symmetry must be True or False"),
])
def test_config_refuses_values_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PersonalizeConfig(**{field: value})


def test_config_refuses_options_that_would_do_nothing():
    with pytest.raises(ValueError, match="symmetry_every has no effect with symmetry off"):
        PersonalizeConfig(symmetry=False, symmetry_every=2)
    with pytest.raises(ValueError, match="rank, conv_layout has no effect with full_finetune=True"):
        PersonalizeConfig(full_finetune=True, rank=2, conv_layout="loralib")
    PersonalizeConfig(ckpt_minutes=None)  # None turns the time-based checkpoints off


@pytest.mark.parametrize("argv, fragment", [
    (["--alpha", "-1"], "alpha must be a finite number > 0, got -1.0"),
    (["--rank", "0"], "rank must be an integer >= 1, got 0"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--symmetry-weight", "-1"], "symmetry_weight must be a finite number > 0"),
    (["--symmetry-every", "0"], "symmetry_every must be an integer >= 1"),
    (["--no-symmetry", "--symmetry-every", "2"], "symmetry_every has no effect with symmetry off"),
    (["--invert-steps", "0"], "invert_steps must be an integer >= 1"),
    (["--batch", "0"], "batch must be an integer >= 1"),
    (["--checkpoint-every", "0"], "ckpt_every must be an integer >= 1"),
    (["--checkpoint-minutes", "-5"], "ckpt_minutes must be a finite number > 0"),
])
def test_cli_personalize_refuses_bad_options_before_any_work(setup, tmp_path, capsys, argv, fragment):
    _, _, _, photos, _ = setup
    out = tmp_path / "me"
    assert main(["personalize", "--photos", str(photos), *argv, "--out", str(out)]) == 2
    assert_clean_error(capsys, "genfast personalize: error:", fragment)
    assert not out.exists() and not work_dir_of(out).exists()


def _unwritable(tmp_path):
    """A place no file can be created in, whoever runs the tests (root too): sysfs refuses new files."""
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("needs Linux sysfs for a folder that refuses writes")
    return "/sys/kernel"


def test_cli_personalize_refuses_bad_out_before_any_work(setup, tmp_path, capsys, monkeypatch):
    _, _, _, photos, _ = setup
    monkeypatch.setattr(pers, "fit_cameras", lambda *a, **k: pytest.fail("fitting started"))
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    not_adapter = tmp_path / "holiday"
    not_adapter.mkdir()
    (not_adapter / "keep.txt").write_text("mine")
    cases = [
        (tmp_path / "missing" / "me", "does not exist; create it first"),
        (a_file / "me", "is not a folder"),
        (a_file, "is an existing file"),
        (not_adapter, "holds no adapter (personalize.json)"),
        (f"{_unwritable(tmp_path)}/me", "cannot write in /sys/kernel"),
    ]
    for out, fragment in cases:
        assert main(["personalize", "--photos", str(photos), "--out", str(out)]) == 2
        assert_clean_error(capsys, "genfast personalize: error:", str(out), fragment)
    assert a_file.read_text() == "mine" and [p.name for p in not_adapter.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "missing").exists() and not work_dir_of(not_adapter).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "holiday"]


def test_cli_render_checks_its_outputs_and_options_before_rendering(tmp_path, capsys, monkeypatch):
    from genfast.gan3d import video

    monkeypatch.setattr(video, "render_orbit", lambda *a, **k: pytest.fail("rendering started"))
    (tmp_path / "taken.gif").mkdir()
    cases = [
        (["--out", str(tmp_path / "missing" / "me.gif")], "does not exist; create it first"),
        (["--out", str(tmp_path / "taken.gif")], "is an existing folder; give a file name"),
        (["--out", str(tmp_path / "ok.gif"), "--out", f"{_unwritable(tmp_path)}/me.mp4"], "cannot write in"),
        (["--frames", "0", "--out", str(tmp_path / "ok.gif")], "--frames must be an integer >= 1, got 0"),
        (["--yaw-range", "-0.1", "--out", str(tmp_path / "ok.gif")], "--yaw-range must be in (0, 1.2]"),
        (["--yaw-range", "3", "--out", str(tmp_path / "ok.gif")], "--yaw-range must be in (0, 1.2]"),
        (["--fps", "0", "--out", str(tmp_path / "ok.gif")], "--fps must be an integer >= 1"),
        (["--scale", "0", "--out", str(tmp_path / "ok.gif")], "--scale must be an integer >= 1"),
        (["--truncation", "1.5", "--out", str(tmp_path / "ok.gif")], "--truncation must be in [0, 1]"),
    ]
    for argv, fragment in cases:
        assert main(["render", *argv]) == 2
        assert_clean_error(capsys, "genfast render: error:", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gif"]


def test_cli_interpolate_checks_its_output_and_options_before_any_work(setup, straight, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    adapter = str(straight[0])
    cases = [
        (["--out", str(a_file)], "is an existing file; give a folder name"),
        (["--out", str(tmp_path / "missing" / "between")], "does not exist; create it first"),
        (["--out", f"{_unwritable(tmp_path)}/between"], "cannot write in"),
        (["--steps", "1", "--out", str(tmp_path / "between")], "--steps must be an integer >= 2"),
        (["--invert-steps", "0", "--out", str(tmp_path / "between")], "invert_steps must be an integer >= 1"),
    ]
    for argv, fragment in cases:
        assert main(["interpolate", "--adapter", adapter, "0.png", "1.png", *argv]) == 2
        assert_clean_error(capsys, "genfast interpolate: error:", fragment)
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_personalize_refuses_more_photos_than_the_limit(tmp_path, capsys):
    from genfast.gan3d.photos import MAX_PHOTOS

    many = tmp_path / "many"
    many.mkdir()
    for i in range(MAX_PHOTOS + 1):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(many / f"{i:03d}.png")
    out = tmp_path / "me"
    assert main(["personalize", "--photos", str(many), "--out", str(out)]) == 2
    assert_clean_error(capsys, f"has {MAX_PHOTOS + 1} images", f"at most {MAX_PHOTOS}", "memory")
    assert not out.exists() and not work_dir_of(out).exists()


# ---- batches: more photos than --batch give the same fits in flat memory ----

def test_photos_in_batches_fit_and_train_as_one_batch(setup, tmp_path):
    """3 photos at batch 2 (chunks of 1 and 2; gradient accumulation in training) against batch 10 (one
    chunk): the same cameras, latents and adapters, to float rounding (batch sizes change summation order)."""
    _, base, identity, photos, _ = setup
    names, images = load_photos(photos)
    runs = {}
    for batch in (10, 2):
        G = copy.deepcopy(base)
        personalize(G, names, images, tmp_path / f"b{batch}", dataclasses.replace(FAST, batch=batch),
                    identity=identity, progress=False)
        runs[batch] = adapter_tensors(tmp_path / f"b{batch}"), load_personalized(copy.deepcopy(base),
                                                                                 tmp_path / f"b{batch}")[3]
    (lora_a, ws_a), cams_a = runs[10]
    (lora_b, ws_b), cams_b = runs[2]
    assert torch.allclose(cams_a, cams_b, atol=1e-4)
    assert torch.allclose(ws_a, ws_b, atol=1e-4)
    for key in lora_a:  # Adam's per-element step magnifies rounding where a gradient is near 0: compare norms
        assert (lora_a[key] - lora_b[key]).norm() <= 1e-2 * lora_a[key].norm() + 1e-7, key
    assert pers.chunks(3, 2) == [slice(0, 1), slice(1, 3)] and pers.chunks(10, 10) == [slice(0, 10)]


# ---- checkpoints and time across resumed runs ----

def test_checkpoint_every_reaches_the_loop(setup, tmp_path, monkeypatch):
    """--checkpoint-every 1: a run stopped in step 2 has the checkpoints of steps 1 and 2 (at the default
    of 100 it would have none)."""
    root, _, _, photos, _ = setup
    interrupt(monkeypatch, "symmetry_loss", 3)  # symmetry every step: the 3rd call is in step 2
    out = tmp_path / "me"
    with pytest.raises(KeyboardInterrupt):
        main(["personalize", "--photos", str(photos), "--cameras", str(root / "dataset.json"), "--steps", "4",
              "--invert-steps", "2", "--symmetry-every", "1", "--checkpoint-every", "1", "--out", str(out)])
    assert sorted(p.name for p in (work_dir_of(out) / "checkpoints").glob("step-*")) == ["step-0000001",
                                                                                          "step-0000002"]


class FakeTime:
    """Stands in for the `time` module inside genfast.training.personalize: the test moves the clock."""

    def __init__(self):
        self.now = 1_000.0

    def time(self):
        return self.now

    def monotonic(self):
        return self.now


def test_time_based_checkpoints_and_minutes_over_resumed_runs(setup, straight, tmp_path, monkeypatch):
    """ckpt_minutes=1 with ckpt_every=100: checkpoints come from the clock (6 minutes per step here); the
    rerun resumes from the last one to the same adapter as a run never stopped, and the summary's minutes are
    both runs' (10 and 2), not the last one's."""
    _, base, identity, photos, _ = setup
    names, images = load_photos(photos)
    clock = FakeTime()
    monkeypatch.setattr(pers, "time", clock)
    monkeypatch.setattr(loop_mod, "_now", clock.monotonic)
    real, calls = pers.symmetry_loss, {"n": 0}

    def tick(*args, **kwargs):  # symmetry runs on steps 0 and 2 (FAST: symmetry_every=2)
        calls["n"] += 1
        if calls["n"] == 2:  # in step 2 of the first run: stop, 10 minutes after it started
            clock.now += 4 * 60
            raise KeyboardInterrupt
        clock.now += 6 * 60
        return real(*args, **kwargs)

    monkeypatch.setattr(pers, "symmetry_loss", tick)
    cfg = dataclasses.replace(FAST, ckpt_every=100, ckpt_minutes=1.0)
    out = tmp_path / "me"
    with pytest.raises(KeyboardInterrupt):
        personalize(copy.deepcopy(base), names, images, out, cfg, identity=identity, progress=False)
    assert sorted(p.name for p in (work_dir_of(out) / "checkpoints").glob("step-*")) == ["step-0000001"]
    clock.now += 60 * 60  # an hour between the runs does not count
    logs = []

    def two_minutes(*args, **kwargs):  # the rerun resumes at step 1: symmetry in step 2 only
        clock.now += 2 * 60
        return real(*args, **kwargs)

    monkeypatch.setattr(pers, "symmetry_loss", two_minutes)
    summary = personalize(copy.deepcopy(base), names, images, out, cfg, identity=identity, progress=False,
                          log=logs.append)
    assert any("resumed at step 1" in line for line in logs), logs
    assert summary["segments_minutes"] == [10.0, 2.0] and summary["minutes"] == 12.0
    reference, resumed = adapter_tensors(straight[0]), adapter_tensors(out)
    assert all(torch.equal(reference[0][k], resumed[0][k]) for k in reference[0])
