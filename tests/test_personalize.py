"""My3DGen personalization end to end on a small generator: files, exact reload, base check, resume, CLI."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from PIL import Image

from genfast.cli import main
from genfast.data.heads import render_views, sample_identity
from genfast.gan3d.generator import build_generator
from genfast.gan3d.identity import IdentityEncoder, save_identity_encoder
from genfast.gan3d.loader import save_converted
from genfast.gan3d.personalize import PersonalizeConfig, load_personalized, personalize
from genfast.gan3d.photos import load_photos
from genfast.training.heads import heads_prior_config

FAST = PersonalizeConfig(steps=4, invert_steps=3, camera_steps=2, symmetry_every=2, ckpt_every=2,
                         camera_starts=(-0.3, 0.3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("personal")
    torch.manual_seed(0)
    base = build_generator(heads_prior_config()).requires_grad_(False)
    torch.manual_seed(1)
    identity = IdentityEncoder().eval().requires_grad_(False)  # untrained: these tests check plumbing only
    images, cams = render_views(sample_identity(1, 0), torch.tensor([-0.4, 0.0, 0.4]), 0.0, 64)
    photos = root / "photos"
    photos.mkdir()
    for i, im in enumerate(images):
        Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()).save(photos / f"{i}.png")
    return root, base, identity, photos, cams.float()


def test_adapter_reloads_exactly_and_refuses_another_base(setup):
    root, base, identity, photos, _ = setup
    names, images = load_photos(photos)
    G = copy.deepcopy(base)
    summary = personalize(G, names, images, root / "adapter", FAST, identity=identity, progress=False)
    assert sorted(p.name for p in (root / "adapter").iterdir()) == [
        "cameras.json", "latents.safetensors", "lora", "personalize.json"]
    assert summary["photos"] == ["0.png", "1.png", "2.png"]
    assert 0 < summary["trainable_parameters"] < 0.1 * summary["generator_parameters"]
    G2, ws, loaded_names, loaded_cams = load_personalized(copy.deepcopy(base), root / "adapter")
    assert loaded_names == names and ws.shape[0] == 3 and loaded_cams.shape == (3, 25)
    with torch.no_grad():
        a = G.synthesis(ws, loaded_cams, deterministic=True)["image"]
        b = G2.synthesis(ws, loaded_cams, deterministic=True)["image"]
        plain = base.synthesis(ws, loaded_cams, deterministic=True)["image"]
    assert torch.equal(a, b) and not torch.equal(a, plain)  # trained, and reloaded bit for bit
    torch.manual_seed(5)
    other = build_generator(heads_prior_config())
    with pytest.raises(ValueError, match="trained on base generator"):
        load_personalized(other, root / "adapter")


def test_given_cameras_are_used_and_training_resumes(setup, monkeypatch):
    root, base, identity, photos, cams = setup
    names, images = load_photos(photos)
    import genfast.gan3d.personalize as pers

    calls = {"n": 0}
    real = pers.symmetry_loss

    def interrupt_at_step_2(*args, **kwargs):  # symmetry runs at steps 0 and 2: stop at the second
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pers, "symmetry_loss", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        personalize(copy.deepcopy(base), names, images, root / "resumed", FAST, cameras=cams, identity=identity,
                    progress=False)
    monkeypatch.setattr(pers, "symmetry_loss", real)
    logs = []
    personalize(copy.deepcopy(base), names, images, root / "resumed", FAST, cameras=cams, identity=identity,
                progress=False, log=logs.append)
    assert any("resumed at step 2" in line for line in logs), logs
    assert not (root / "resumed.work").exists()  # finished: the work folder goes, a rerun starts afresh
    _, _, _, saved = load_personalized(copy.deepcopy(base), root / "resumed")
    assert torch.allclose(saved, cams, atol=1e-5)


def test_full_finetuning_row(setup):
    root, base, identity, photos, cams = setup
    names, images = load_photos(photos)
    cfg = dataclasses.replace(FAST, full_finetune=True, symmetry=False)
    summary = personalize(copy.deepcopy(base), names, images, root / "full", cfg, cameras=cams, identity=identity,
                          progress=False)
    assert summary["trainable_parameters"] > 0.9 * summary["generator_parameters"]
    assert (root / "full" / "generator" / "model.safetensors").is_file()


def test_cli_personalize_render_interpolate(setup, tmp_path, capsys, monkeypatch):
    _, base, identity, photos, _ = setup
    save_converted(base, tmp_path / "base")
    save_identity_encoder(identity, tmp_path / "assets" / "genfast-identity")
    monkeypatch.setattr("genfast.models.ASSETS", tmp_path / "assets")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    out = tmp_path / "me"
    assert main(["personalize", "--photos", str(photos), "--base", str(tmp_path / "base"), "--steps", "2",
                 "--invert-steps", "3", "--no-symmetry", "--out", str(out)]) == 0
    assert "3 photos" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # the photos are never modified
    assert main(["render", "--checkpoint", str(tmp_path / "base"), "--adapter", str(out), "--frames", "2",
                 "--out", str(tmp_path / "me.gif")]) == 0
    assert main(["interpolate", "--base", str(tmp_path / "base"), "--adapter", str(out), "0.png", "2.png",
                 "--steps", "3", "--out", str(tmp_path / "interp")]) == 0
    assert (tmp_path / "interp" / "interpolation.png").is_file()
    assert main(["interpolate", "--base", str(tmp_path / "base"), "--adapter", str(out), "0.png", "9.png",
                 "--out", str(tmp_path / "x")]) == 2
    assert "9.png is neither one of the adapter's photos (0.png, 1.png, 2.png) nor an image file" in (
        capsys.readouterr().err)
    few = tmp_path / "few"
    few.mkdir()
    Image.new("RGB", (8, 8)).save(few / "a.png")
    assert main(["personalize", "--photos", str(few), "--base", str(tmp_path / "base"), "--out", str(out)]) == 2
    assert "at least 3 photos" in capsys.readouterr().err


def test_interpolate_fits_a_new_photo(setup, tmp_path):
    """An image that is not one of the adapter's photos gets its camera and latent fitted first."""
    from genfast.gan3d.cli import _photo_latent
    from genfast.gan3d.photos import load_photo

    root, base, identity, photos, cams = setup
    names, images = load_photos(photos)
    G = copy.deepcopy(base)
    personalize(G, names, images, root / "interp", FAST, cameras=cams, identity=identity, progress=False)
    G, ws, names, _ = load_personalized(copy.deepcopy(base), root / "interp")
    G.requires_grad_(False)
    assert torch.equal(_photo_latent(G, str(photos / "1.png"), ws, names, 5), ws[1:2])  # stored: no fitting
    new = tmp_path / "new.jpg"
    image, cam = render_views(sample_identity(1, 0), torch.tensor([0.2]), 0.1, 64)
    Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(new)
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

    _, base, _, photos, _ = setup
    save_converted(base, tmp_path / "base")
    torch.manual_seed(3)
    torch.save(ArcFaceIRSE50().state_dict(), tmp_path / "model_ir_se50.pth")  # random: plumbing only
    out = tmp_path / "me"
    assert main(["personalize", "--photos", str(photos), "--base", str(tmp_path / "base"), "--steps", "1",
                 "--invert-steps", "2", "--arcface", str(tmp_path / "model_ir_se50.pth"), "--out", str(out)]) == 0
    assert "symmetry identity network: ArcFace IR-SE50" in capsys.readouterr().out
    assert main(["personalize", "--photos", str(photos), "--base", str(tmp_path / "base"),
                 "--arcface", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.pth" in capsys.readouterr().err and not (tmp_path / "x.work").exists()


@pytest.mark.parametrize("space", ["w", "w+"])
def test_inversion_in_w_and_w_plus(setup, space):
    from genfast.gan3d.personalize import _recon, invert

    _, base, _, photos, cams = setup
    _, images = load_photos(photos)
    targets = images * 2 - 1
    cfg = dataclasses.replace(FAST, invert_steps=6, latent_space=space)
    ws = invert(base, targets, cams, cfg, progress=False)
    assert ws.shape == (3, base.num_ws, base.backbone.mapping.w_avg.shape[0])
    assert torch.equal(ws[:, :1].expand_as(ws), ws) == (space == "w")  # W: every layer shares one w
    with torch.no_grad():
        start = base.backbone.mapping.w_avg[None, None].expand_as(ws)
        fitted = _recon(base.synthesis(ws, cams, deterministic=True), targets)
        assert fitted < _recon(base.synthesis(start, cams, deterministic=True), targets)
    with pytest.raises(ValueError, match="latent_space must be one of w, w\\+"):
        PersonalizeConfig(latent_space="z")


def test_resume_refuses_other_settings(setup, monkeypatch):
    """An unfinished run is resumed only with the settings it started with; the error names what differs."""
    root, base, identity, photos, cams = setup
    names, images = load_photos(photos)
    import genfast.gan3d.personalize as pers

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pers, "symmetry_loss", stop)  # stops in the first training step
    with pytest.raises(KeyboardInterrupt):
        personalize(copy.deepcopy(base), names, images, root / "other", FAST, cameras=cams, identity=identity,
                    progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"unfinished run with other settings \(rank\).*delete"):
        personalize(copy.deepcopy(base), names, images, root / "other", dataclasses.replace(FAST, rank=2),
                    cameras=cams, identity=identity, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(photos\)"):
        personalize(copy.deepcopy(base), names[:2], images[:2], root / "other", FAST, cameras=cams[:2],
                    identity=identity, progress=False)
    summary = personalize(copy.deepcopy(base), names, images, root / "other", dataclasses.replace(FAST, steps=5),
                          cameras=cams, identity=identity, progress=False)  # same settings (a longer run) resume
    assert summary["config"]["steps"] == 5
    assert (root / "other" / "personalize.json").is_file()
