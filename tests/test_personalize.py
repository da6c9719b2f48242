"""My3DGen personalization on the embedded prior: files, exact reload, base check, resume by content,
the work-folder lock, tampered checkpoints, the symmetry term, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch
from PIL import Image
from planted import assert_planted_pickles_refused, payload
from safetensors.torch import load_file

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
    cfg = dataclasses.replace(FAST, full_finetune=True, symmetry=False)
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
