"""FID / KID (clean-fid) and LPIPS metrics: offline, small, fast."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import torch
import torchvision
from cleanfid import fid as cfid
from cleanfid.resize import make_resizer
from PIL import Image

from genfast.data.shapes import render_batch
from genfast.eval import fid as gfid
from genfast.eval import lpips_metric
from genfast.eval.fid import FeatureSpace, MiniFeatureExtractor, fid_folders, kid_folders, save_images
from genfast.eval.lpips_metric import LPIPSMetric, lpips_available

N_IMAGES = 128
NOISE_LEVELS = (8, 24, 64)  # std of Gaussian pixel noise, in uint8 units


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Fail loudly if anything tries to fetch weights (clean-fid uses urllib, torchvision torch.hub)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A clean image folder and copies of it with increasing Gaussian noise."""
    root = tmp_path_factory.mktemp("fid")
    images, _, _ = render_batch(N_IMAGES, seed=1)
    out = {"clean": save_images(images, root / "clean")}
    rng = np.random.default_rng(0)
    for sigma in NOISE_LEVELS:
        noisy = np.clip(images.astype(np.float32) + rng.normal(0, sigma, images.shape), 0, 255)
        out[sigma] = save_images(noisy.round().astype(np.uint8), root / f"noise{sigma}")
    return out


@pytest.fixture(scope="module")
def extractor():
    return MiniFeatureExtractor()


# ---------------------------------------------------------------- mini-features extractor and FID


def test_extractor_maps_cleanfid_input_to_classifier_features(extractor):
    images = torch.from_numpy(render_batch(2, seed=3)[0]).permute(0, 3, 1, 2).float()  # [0, 255], as clean-fid
    feats = extractor(images)
    assert feats.shape == (2, 256)
    torch.testing.assert_close(feats, extractor.classifier.embed(images / 127.5 - 1))
    # other sizes (clean-fid's default 299 resize) are brought back to the evaluator's 64x64
    assert extractor(torch.nn.functional.interpolate(images, size=(299, 299))).shape == (2, 256)


def test_fid_of_a_set_with_itself_is_zero(folders):
    result = fid_folders(folders["clean"], folders["clean"])
    assert abs(result["value"]) < 1e-3
    assert result["name"] == "FID[mini-features]" and result["feature_space"] == "mini-features"
    assert result["n_a"] == result["n_b"] == N_IMAGES


@pytest.fixture(scope="module")
def fid_by_noise(folders):
    """FID of the clean folder against each noisy one, computed once for the tests below."""
    return {sigma: fid_folders(folders["clean"], folders[sigma], batch_size=64)["value"] for sigma in NOISE_LEVELS}


def test_fid_grows_with_noise(fid_by_noise):
    values = [fid_by_noise[sigma] for sigma in NOISE_LEVELS]
    assert values[0] > 1e-3
    assert values == sorted(values) and len(set(values)) == len(values), values


def test_fid_matches_cleanfid_called_directly(folders, extractor, fid_by_noise):
    ours = fid_by_noise[24]  # fid_folders(clean, noise24, batch_size=64)
    direct = cfid.compute_fid(
        str(folders["clean"]), str(folders[24]), mode="clean", custom_feat_extractor=extractor,
        custom_fn_resize=make_resizer("PIL", False, "bicubic", (64, 64)), batch_size=64,
        num_workers=0, device=torch.device("cpu"), verbose=False, use_dataparallel=False,
    )
    assert abs(ours - direct) / abs(direct) < 1e-6


def test_features_computed_once_give_the_same_fid_as_each_call_alone(folders, fid_by_noise):
    # what `genfast compare` does: one network, the reference's features reused against every set
    space = FeatureSpace("mini-features", batch_size=64)
    clean = space.features(folders["clean"])
    for sigma in NOISE_LEVELS:
        result = space.fid(clean, space.features(folders[sigma]))
        assert result["value"] == fid_by_noise[sigma] and result["name"] == "FID[mini-features]"
    noisy = space.features(folders[24])
    assert space.kid(clean, noisy, seed=3) == kid_folders(folders["clean"], folders[24], seed=3)


# ---------------------------------------------------------------- KID


def test_kid_of_a_set_with_itself_is_zero_up_to_the_estimators_diagonal_term(folders, extractor):
    same = kid_folders(folders["clean"], folders["clean"])
    assert same["name"] == "KID[mini-features]" and same["n_a"] == same["n_b"] == N_IMAGES
    # clean-fid's (standard) KID estimator averages the cross kernel over all pairs, each image with
    # itself included, so for one set against itself it gives exactly 2 * (mean off-diagonal k -
    # mean diagonal k) / m: never positive, but not literally 0. Check it is that and nothing else.
    feats = cfid.get_folder_features(str(folders["clean"]), extractor, num_workers=0, device=torch.device("cpu"),
                                     mode="clean", custom_fn_resize=make_resizer("PIL", False, "bicubic", (64, 64)),
                                     verbose=False).astype(np.float64)
    k = (feats @ feats.T / feats.shape[1] + 1) ** 3
    m = len(k)
    diag, off = np.trace(k) / m, (k.sum() - np.trace(k)) / (m * (m - 1))
    assert same["value"] <= 0
    assert same["value"] == pytest.approx(2 * (off - diag) / m, rel=1e-3)


def test_kid_is_reproducible_and_leaves_numpy_rng_alone(tmp_path):
    images, _, _ = render_batch(24, seed=2)  # small: only the seeding is under test
    a, b = save_images(images[:12], tmp_path / "a"), save_images(images[12:], tmp_path / "b")
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = kid_folders(a, b, seed=5)["value"]
    assert np.random.rand() == expected_next
    assert kid_folders(a, b, seed=5)["value"] == first


# ---------------------------------------------------------------- Inception: offline only


def test_inception_without_weights_raises_with_the_fix(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(gfid, "inception_cache_dir", lambda: tmp_path)  # an empty cache
    for metric in (fid_folders, kid_folders):
        with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt") as err:
            metric(folders["clean"], folders["clean"], feature_space="inception")
        assert str(tmp_path) in str(err.value) and "mini-features" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fid_folders(folders["clean"], folders["clean"], "inception", inception_weights=tmp_path / "nowhere.pt")
    assert not any(tmp_path.iterdir())  # nothing was fetched into the cache


class _FakeInception(torch.nn.Module):
    """Stand-in for clean-fid's TorchScript Inception: a `layers` module giving 2048-d features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048))

    def forward(self, x):
        return self.layers(x)


def test_inception_loads_from_a_local_file(folders, tmp_path, monkeypatch):
    # plumbing only: a random stand-in network saved under clean-fid's file name, not real Inception
    monkeypatch.setattr(gfid, "inception_cache_dir", lambda: tmp_path / "empty")
    torch.jit.script(_FakeInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    images, _, _ = render_batch(8, seed=2)
    a, b = save_images(images[:4], tmp_path / "a"), save_images(images[4:], tmp_path / "b")
    for weights in (tmp_path, tmp_path / "inception-2015-12-05.pt"):  # its folder or the file itself
        result = kid_folders(a, b, feature_space="inception", inception_weights=weights)
        assert result["name"] == "KID[inception]" and np.isfinite(result["value"]) and result["n_a"] == 4
    (tmp_path / "inception-2015-12-05.pt").rename(tmp_path / "renamed.pt")
    with pytest.raises(FileNotFoundError, match="rename"):
        kid_folders(a, b, feature_space="inception", inception_weights=tmp_path / "renamed.pt")


def test_unknown_feature_space_and_bad_folders(folders, tmp_path):
    with pytest.raises(ValueError, match="feature_space"):
        fid_folders(folders["clean"], folders["clean"], feature_space="clip")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid_folders(folders["clean"], tmp_path / "missing")
    save_images(np.zeros((1, 8, 8, 3), np.uint8), tmp_path / "one")
    with pytest.raises(ValueError, match="at least 2"):
        kid_folders(folders["clean"], tmp_path / "one")


# ---------------------------------------------------------------- save_images


def test_save_images_layouts_and_replacement(tmp_path):
    hwc = render_batch(3, seed=4)[0]
    folder = save_images(torch.from_numpy(hwc).permute(0, 3, 1, 2), tmp_path / "imgs")  # NCHW tensor
    assert [np.array_equal(np.asarray(Image.open(folder / f"{i:05d}.png")), hwc[i]) for i in range(3)] == [True] * 3
    save_images([Image.fromarray(hwc[0])], folder)  # replaces the folder: no stale images left
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png"]
    with pytest.raises(TypeError, match="uint8"):
        save_images(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "floats")
    assert not (tmp_path / "floats").exists()


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_alexnet_file(tmp_path_factory):
    """A torchvision-format AlexNet checkpoint with random weights (only the `features` part LPIPS uses)."""
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    features = torchvision.models.alexnet(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def test_lpips_missing_backbone_is_reported_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(lpips_metric, "hub_checkpoint_dir", lambda: tmp_path)  # an empty torch hub cache
    ok, reason = lpips_available("alex")
    assert not ok and "alexnet-owt-7be5be79.pth" in reason and str(tmp_path) in reason
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        LPIPSMetric("alex")
    ok, reason = lpips_available("alex", weights_path=tmp_path / "mine.pth")
    assert not ok and "mine.pth" in reason
    with pytest.raises(FileNotFoundError, match="mine.pth"):
        LPIPSMetric("alex", weights_path=tmp_path / "mine.pth")
    assert not any(tmp_path.iterdir())


def test_lpips_uses_the_cached_backbone(tmp_path, monkeypatch, random_alexnet_file):
    monkeypatch.setattr(lpips_metric, "hub_checkpoint_dir", lambda: tmp_path)
    (tmp_path / "alexnet-owt-7be5be79.pth").write_bytes(random_alexnet_file.read_bytes())
    assert lpips_available("alex")[0]
    metric = LPIPSMetric("alex")
    # every backbone weight comes from the file, none from lpips' random initialisation
    saved = torch.load(random_alexnet_file, weights_only=True)
    assert torch.equal(metric.model.net.slice1._modules["0"].weight, saved["features.0.weight"])
    assert torch.equal(metric.model.net.slice5._modules["10"].bias, saved["features.10.bias"])


def test_lpips_plumbing_with_a_user_given_backbone(random_alexnet_file):
    # the backbone is random, so only the plumbing is tested here (shapes, identical -> 0, different -> > 0),
    # not that the numbers mean anything perceptually
    metric = LPIPSMetric("alex", weights_path=random_alexnet_file)
    images = torch.from_numpy(render_batch(4, seed=5)[0]).permute(0, 3, 1, 2).float() / 255
    other = torch.from_numpy(render_batch(4, seed=6)[0]).permute(0, 3, 1, 2).float() / 255
    same = metric(images, images)
    assert same.shape == (4,) and torch.equal(same, torch.zeros(4))
    assert (metric(images, other) > 0).all()
    assert metric.name == "LPIPS[alex]"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric(images * 2 - 1, other * 2 - 1)


def test_fid_falls_back_to_a_ridge_when_cleanfid_finds_a_complex_root(monkeypatch):
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(48, 32)) @ rng.normal(size=(32, 32)), 0)
    b = np.maximum(rng.normal(size=(48, 32)) @ rng.normal(size=(32, 32)), 0) + 0.5
    exact = cfid.fid_from_feats(a, b)
    value, ridge = gfid.regularised_fid(a, b)
    assert value == pytest.approx(exact, rel=1e-3) and ridge > 0  # the ridge barely moves a well-posed FID
    space = FeatureSpace.__new__(FeatureSpace)  # fid() needs no network
    space.name = "mini-features"

    def refuse(*args, **kwargs):
        raise ValueError("Imaginary component 0.0014849246500221493")  # what clean-fid raised in bench/assembly.py

    monkeypatch.setattr(gfid.cfid, "fid_from_feats", refuse)
    report = space.fid(a, b)
    assert report["value"] == pytest.approx(value) and report["regularised"] == ridge

    def other(*args, **kwargs):
        raise ValueError("something else")

    monkeypatch.setattr(gfid.cfid, "fid_from_feats", other)
    with pytest.raises(ValueError, match="something else"):
        space.fid(a, b)
