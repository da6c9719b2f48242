"""`genfast train-heads` (tiny) and `genfast render`: resumable training, the prior's files, orbit videos."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from planted import assert_planted_pickles_refused
from safetensors.torch import load_file

from genfast.cli import main
from genfast.gan3d.cameras import flip_yaw
from genfast.gan3d.video import map_z
from genfast.models import load_heads_prior
from genfast.training.heads import HeadsRecipe, _batch, train_heads

TINY = HeadsRecipe.tiny()


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    logs = []
    train_heads(root / "out", root / "work", TINY, log=logs.append)
    return root, logs


def test_tiny_training_writes_a_loadable_prior(prior):
    root, _ = prior
    assert sorted(p.name for p in (root / "out").iterdir()) == [
        "config.json", "latents.safetensors", "model.safetensors", "training.json"]
    G, z = load_heads_prior(root / "out")
    assert z.shape == (TINY.identities, G.z_dim)
    assert not any(p.requires_grad for p in G.parameters())
    with torch.no_grad():
        ws = map_z(G, z[:1])
        out = G.synthesis(ws, torch.load(root / "work" / "data.pt")["cameras"][0, :1], deterministic=True)
        # truncation psi = 0 lands on w_avg, which training sets to the identities' mean w
        mean_w = map_z(G, z)[:, 0].mean(0)
        assert torch.allclose(map_z(G, torch.randn(1, G.z_dim), truncation_psi=0.0)[0, 0], mean_w, atol=1e-6)
    assert out["image"].shape == (1, 3, 64, 64) and torch.isfinite(out["image"]).all()


def test_batches_are_a_function_of_the_step_and_mirror_consistently(prior):
    root, _ = prior
    data = torch.load(root / "work" / "data.pt")
    a, b = _batch(data, 5, TINY), _batch(data, 5, TINY)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    recipe = dataclasses.replace(TINY, batch_size=64)  # enough draws to see both mirrored and plain views
    ids, images, cams = _batch(data, 0, recipe)
    plain = 0
    for i in range(len(ids)):
        stored_cams = data["cameras"][ids[i]]
        stored = data["images"][ids[i]].float() / 127.5 - 1
        v = next((k for k, c in enumerate(stored_cams) if torch.equal(cams[i], c)), None)
        if v is not None:
            plain += 1
            assert torch.equal(images[i], stored[v])
        else:  # a mirrored view: the mirror camera of a stored view, and that view's image flipped left-right
            v = next(k for k, c in enumerate(stored_cams) if torch.allclose(flip_yaw(cams[i]), c))
            assert torch.equal(images[i], stored[v].flip(-1))
    assert 0 < plain < len(ids)


def test_an_interrupted_run_resumes_to_the_uninterrupted_prior(prior, tmp_path, monkeypatch):
    from genfast.training import heads

    real_batch = heads._batch

    def interrupted(data, step, recipe):
        if step == 4:  # after the step-3 checkpoint (ckpt_every=3)
            raise KeyboardInterrupt
        return real_batch(data, step, recipe)

    monkeypatch.setattr(heads, "_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_heads(tmp_path / "out", tmp_path / "work", TINY, log=lambda line: None)
    assert not (tmp_path / "out").exists()  # nothing half-written
    monkeypatch.setattr(heads, "_batch", real_batch)
    assert_planted_pickles_refused(
        tmp_path / "work" / "checkpoints",
        lambda: train_heads(tmp_path / "out", tmp_path / "work", TINY, log=lambda line: None), tmp_path)
    logs = []
    train_heads(tmp_path / "out", tmp_path / "work", TINY, log=logs.append)
    assert any("resumed at step 3" in line for line in logs), logs
    for name in ("model.safetensors", "latents.safetensors"):
        straight, resumed = load_file(prior[0] / "out" / name), load_file(tmp_path / "out" / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (name, key)


def test_the_time_budget_writes_a_prior_and_a_rerun_goes_on(tmp_path, monkeypatch):
    from genfast.training import loop

    clock = iter(range(0, 10_000, 60))  # a minute per reading: the 1.5-minute budget is spent after 2 steps
    monkeypatch.setattr(loop, "_now", lambda: next(clock))
    recipe = dataclasses.replace(TINY, max_minutes=1.5)
    logs = []
    train_heads(tmp_path / "out", tmp_path / "work", recipe, log=logs.append)
    assert json.loads((tmp_path / "out" / "training.json").read_text())["steps_done"] == 2
    assert any("time budget of 1.5 min spent at step 2" in line for line in logs), logs
    monkeypatch.setattr(loop, "_now", lambda: 0.0)
    train_heads(tmp_path / "out", tmp_path / "work", recipe, log=logs.append)
    assert any("resumed at step 2" in line for line in logs), logs
    assert json.loads((tmp_path / "out" / "training.json").read_text())["steps_done"] == TINY.steps


def test_a_rerun_with_another_recipe_is_refused(prior):
    root, _ = prior
    with pytest.raises(ValueError, match=r"recipe\.lr"):
        train_heads(root / "other-out", root / "work", dataclasses.replace(TINY, lr=1e-3), log=lambda line: None)
    assert not (root / "other-out").exists()


def test_identity_embedding_resumes_exactly_and_refuses_planted_pickles(prior, tmp_path, monkeypatch):
    from genfast.training import identity

    images = torch.load(prior[0] / "work" / "data.pt", weights_only=True)["images"]
    recipe = identity.IdentityRecipe(steps=4, batch_size=4, ckpt_every=2)
    straight = identity.train_identity_encoder(images, tmp_path / "a", recipe, log=lambda line: None)

    real_batch = identity._batch

    def interrupted(images, step, recipe):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(images, step, recipe)

    monkeypatch.setattr(identity, "_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        identity.train_identity_encoder(images, tmp_path / "b", recipe, log=lambda line: None)
    monkeypatch.setattr(identity, "_batch", real_batch)

    def rerun():
        return identity.train_identity_encoder(images, tmp_path / "b", recipe, log=logs.append)

    logs = []
    assert_planted_pickles_refused(tmp_path / "b" / "checkpoints", rerun, tmp_path)
    resumed = rerun()
    assert "[identity] resumed at step 2" in logs
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"images\.sha256"):
        identity.train_identity_encoder(images.flip(0), tmp_path / "b", recipe, log=lambda line: None)


def test_render_writes_gif_and_mp4(prior, tmp_path, capsys):
    root, _ = prior
    gif, mp4 = tmp_path / "orbit.gif", tmp_path / "orbit.mp4"
    assert main(["render", "--checkpoint", str(root / "out"), "--seed", "1", "--frames", "6", "--scale", "2",
                 "--out", str(gif), "--out", str(mp4)]) == 0
    with Image.open(gif) as im:
        assert im.n_frames == 6 and im.size == (128, 128)
    assert mp4.stat().st_size > 1000 and mp4.read_bytes()[4:8] == b"ftyp"  # an MP4 container
    assert main(["render", "--checkpoint", str(root / "out"), "--identity", "1", "--frames", "2",
                 "--out", str(tmp_path / "id.gif")]) == 0


def test_render_errors(prior, tmp_path, capsys):
    root, _ = prior
    assert main(["render", "--checkpoint", str(root / "out"), "--out", str(tmp_path / "orbit.avi")]) == 2
    assert "ending in .gif or .mp4" in capsys.readouterr().err
    assert main(["render", "--checkpoint", str(root / "out"), "--identity", "99", "--out", str(tmp_path / "a.gif")]) == 2
    assert "has 4 training identities" in capsys.readouterr().err
    assert main(["render", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.gif")]) == 2
    assert "nowhere" in capsys.readouterr().err
