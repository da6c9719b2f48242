"""EG3D TriPlaneGenerator in plain PyTorch: layout, deterministic rendering, safe checkpoint loading, conversion."""

from __future__ import annotations

import argparse
import builtins
import collections
import os
import pickle
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch

from genfast.cli_gan3d import add_convert_eg3d_parser, cmd_convert_eg3d
from genfast.gan3d import (
    TriPlaneConfig,
    UnsafePickleError,
    build_generator,
    convert_eg3d,
    eg3d_ffhq512_config,
    eg3d_small_config,
    load_converted,
    load_eg3d,
    load_generator,
    parameter_counts,
)
from genfast.gan3d.generator import FFHQ512_PARAMETER_COUNTS
from genfast.gan3d.loader import CONFIG_NAME, WEIGHTS_NAME
from genfast.gan3d.networks import modulated_conv2d
from genfast.gan3d.ops import bias_act, conv2d_resample, setup_filter, upfirdn2d, upsample2d
from genfast.gan3d.renderer import RaySampler, generate_planes, project_onto_planes

FOCAL = 4.2647


def frontal_camera(batch: int = 1) -> torch.Tensor:
    """EG3D's frontal FFHQ camera: at (0, 0, 2.7) looking at the origin, OpenCV axes (y column (0, -1, 0))."""
    cam2world = torch.tensor(
        [[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, -1.0, 2.7], [0, 0, 0, 1.0]],
    )
    intrinsics = torch.tensor([[FOCAL, 0, 0.5], [0, FOCAL, 0.5], [0, 0, 1.0]])
    return torch.cat([cam2world.reshape(16), intrinsics.reshape(9)]).expand(batch, 25).clone()


def small_generator(seed: int = 0):
    torch.manual_seed(seed)
    G = build_generator(eg3d_small_config())
    with torch.no_grad():
        # Make every kind of tensor matter for the render: noise strengths and w_avg start at zero.
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
        G.backbone.mapping.w_avg.normal_()
    return G


def render(G, seed: int = 1, **kwargs):
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G(z, frontal_camera(), truncation_psi=0.7, deterministic=True, **kwargs)


# -------------------------------------------------------------------------------------------------
# a pickle in the structure EG3D's torch_utils.persistence writes

MODULE_SRC = """
import pathlib
pathlib.Path({marker!r}).write_text("module_src was executed")
raise RuntimeError("module_src was executed")
"""

# genfast module type -> (EG3D module, EG3D class, persistent?)
EG3D_CLASSES = {
    "TriPlaneGenerator": ("training.triplane", "TriPlaneGenerator", True),
    "StyleGAN2Backbone": ("training.networks_stylegan2", "Generator", True),
    "MappingNetwork": ("training.networks_stylegan2", "MappingNetwork", True),
    "SynthesisNetwork": ("training.networks_stylegan2", "SynthesisNetwork", True),
    "SynthesisBlock": ("training.networks_stylegan2", "SynthesisBlock", True),
    "SynthesisLayer": ("training.networks_stylegan2", "SynthesisLayer", True),
    "ToRGBLayer": ("training.networks_stylegan2", "ToRGBLayer", True),
    "FullyConnectedLayer": ("training.networks_stylegan2", "FullyConnectedLayer", True),
    "SuperresolutionHybrid": ("training.superresolution", "SuperresolutionHybrid", True),
    "OSGDecoder": ("training.triplane", "OSGDecoder", False),
    "ImportanceRenderer": ("training.volumetric_rendering.renderer", "ImportanceRenderer", False),
    "MipRayMarcher2": ("training.volumetric_rendering.ray_marcher", "MipRayMarcher2", False),
    "RaySampler": ("training.volumetric_rendering.ray_sampler", "RaySampler", False),
}


class FakeEG3D:
    """Fake ``torch_utils`` / ``training`` / ``dnnlib`` modules, live only while the pickle is written."""

    def __init__(self, marker: str):
        self.marker = marker
        self.modules: dict[str, types.ModuleType] = {}
        persistence = self._module("torch_utils.persistence")

        def _reconstruct_persistent_obj(meta):  # what EG3D would run: exec(module_src) ...
            exec(meta["module_src"], {})  # noqa: S102 - deliberately what EG3D does, to prove we never do

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
        self.reconstruct = _reconstruct_persistent_obj
        self.EasyDict = self._class("dnnlib.util", "EasyDict", (dict,))
        self.by_reference = {
            key: self._class(mod, name, (object,))
            for key, (mod, name, persistent) in EG3D_CLASSES.items()
            if not persistent
        }

    def _module(self, name: str) -> types.ModuleType:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            self.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        return self.modules[name]

    def _class(self, module: str, name: str, bases) -> type:
        cls = type(name, bases, {"__module__": module})
        setattr(self._module(module), name, cls)
        return cls

    def persistent(self, class_name: str, state: dict):
        fake = self

        class Persistent:  # reduces exactly like EG3D's persistent_class instances
            def __reduce__(self):
                meta = dict(
                    type="class",
                    version=6,
                    module_src=MODULE_SRC.format(marker=fake.marker),
                    class_name=class_name,
                    state=state,
                )
                return fake.reconstruct, (meta,)

        return Persistent()

    def convert(self, module: torch.nn.Module):
        """A genfast module tree -> the object tree EG3D's G_ema pickles as."""
        state = {}
        for key, value in module.__dict__.items():
            if key in ("_parameters", "_buffers", "_modules", "_init_kwargs"):
                continue
            if isinstance(value, float):
                value = np.float64(value)  # EG3D keeps np.sqrt(...) gains in module state
            if isinstance(value, (bool, int, str, np.floating, type(None))) or (
                isinstance(value, (dict, set)) and not callable(value)
            ):
                state[key] = value
        non_persistent = module._non_persistent_buffers_set
        state["_parameters"] = collections.OrderedDict(module._parameters)
        state["_buffers"] = collections.OrderedDict(
            (k, v) for k, v in module._buffers.items() if k not in non_persistent
        )
        for name in non_persistent:  # e.g. the renderer's plane_axes: a plain attribute in EG3D
            state[name] = module._buffers[name]
        state["_non_persistent_buffers_set"] = set()
        state["_modules"] = collections.OrderedDict((k, self.convert(v)) for k, v in module._modules.items())
        kind = type(module).__name__
        if kind in ("Sequential", "Softplus"):  # torch classes, pickled by reference to torch.nn.modules.*
            obj = object.__new__(type(module))
            obj.__dict__.update(state)
            return obj
        if kind.startswith("SuperresolutionHybrid"):
            kind = "SuperresolutionHybrid"
        _, class_name, persistent = EG3D_CLASSES[kind]
        if not persistent:
            obj = object.__new__(self.by_reference[kind])
            obj.__dict__.update(state)
            return obj
        state["_init_args"] = ()
        state["_init_kwargs"] = self.EasyDict(getattr(module, "_init_kwargs", {}))
        if kind == "TriPlaneGenerator":
            kwargs = self.EasyDict(module._init_kwargs)
            for key in ("mapping_kwargs", "rendering_kwargs", "sr_kwargs"):
                kwargs[key] = self.EasyDict(kwargs[key])
            state["_init_kwargs"] = kwargs
            state["rendering_kwargs"] = kwargs["rendering_kwargs"]
            state["_last_planes"] = None
        return self.persistent(class_name, state)

    def dump(self, G, path, extra_tensors: dict | None = None, **data):
        with mock.patch.dict(sys.modules, self.modules):
            g_ema = self.convert(G)
            if extra_tensors:
                g_ema.__reduce__()[1][0]["state"]["_parameters"].update(extra_tensors)
            payload = {
                "G": g_ema,
                "D": self.persistent("training.dual_discriminator.DualDiscriminator", {"_parameters": {}}),
                "G_ema": g_ema,
                "training_set_kwargs": self.EasyDict(resolution=64, xflip=True),
                "augment_pipe": None,
                **data,
            }
            with open(path, "wb") as f:
                pickle.dump(payload, f)
        # mock.patch.dict restored sys.modules: nothing named training/torch_utils/dnnlib is importable now.
        assert "torch_utils.persistence" not in sys.modules and "training.triplane" not in sys.modules


@pytest.fixture(scope="module")
def small():
    return small_generator()


@pytest.fixture(scope="module")
def official_pickle(small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eg3d")
    marker = tmp / "module_src_ran"
    path = tmp / "small-eg3d.pkl"
    FakeEG3D(str(marker)).dump(small, path)
    return path, marker


# -------------------------------------------------------------------------------------------------
# layout


def test_ffhq512_has_eg3d_parameter_counts():
    with torch.device("meta"):
        G = build_generator(eg3d_ffhq512_config())
    counts = parameter_counts(G)
    assert counts == FFHQ512_PARAMETER_COUNTS
    assert counts["total"] == 30_662_136
    keys = set(G.state_dict())
    assert len(keys) == 176
    for key in (
        "backbone.mapping.embed.weight",
        "backbone.mapping.fc1.bias",
        "backbone.mapping.w_avg",
        "backbone.synthesis.b4.const",
        "backbone.synthesis.b4.conv1.noise_const",
        "backbone.synthesis.b256.conv0.affine.weight",
        "backbone.synthesis.b256.torgb.weight",
        "backbone.synthesis.b8.resample_filter",
        "superresolution.block0.conv0.noise_strength",
        "superresolution.block1.torgb.affine.bias",
        "decoder.net.0.weight",
        "decoder.net.2.bias",
    ):
        assert key in keys, key
    assert G.backbone.synthesis.b256.torgb.weight.shape == (96, 128, 1, 1)
    assert G.num_ws == 14 and G.neural_rendering_resolution == 128


def test_small_config_renders_and_roundtrips_json(small):
    out = render(small)
    assert out["image"].shape == (1, 3, 64, 64)
    assert out["image_raw"].shape == (1, 3, 32, 32)
    assert out["image_depth"].shape == (1, 1, 32, 32)
    assert torch.isfinite(out["image"]).all()
    assert 1_000_000 < parameter_counts(small)["total"] < 3_000_000
    config = TriPlaneConfig.from_dict(small.config().to_dict())
    assert config == eg3d_small_config()
    with pytest.raises(ValueError, match="unsupported mapping_kwargs"):
        build_generator({**eg3d_small_config().to_dict(), "mapping_kwargs": {"num_layer": 2}})


# -------------------------------------------------------------------------------------------------
# ops and renderer geometry


def test_upsampling_conv_paths_agree():
    torch.manual_seed(0)
    x, w, f = torch.randn(2, 4, 8, 8), torch.randn(5, 4, 3, 3), setup_filter([1, 3, 3, 1])
    fast = conv2d_resample(x, w, f=f, up=2, padding=1, flip_weight=False)  # transposed conv + FIR
    # Generic route: zero-insert, FIR-filter, then a true convolution (kernel flipped for conv2d).
    slow = torch.nn.functional.conv2d(upfirdn2d(x, f, up=2, padding=[3, 2, 3, 2], gain=4), w.flip([2, 3]))
    assert fast.shape == (2, 5, 16, 16)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    # Upsampling a constant image keeps it constant away from the borders.
    up = upsample2d(torch.ones(1, 1, 8, 8), f)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))
    styles = torch.randn(2, 4)
    for upsample in (1, 2):
        kwargs = dict(up=upsample, padding=1, resample_filter=f, flip_weight=upsample == 1)
        fused = modulated_conv2d(x, w, styles, fused_modconv=True, **kwargs)
        unfused = modulated_conv2d(x, w, styles, fused_modconv=False, **kwargs)
        torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)
    # lrelu(x + b) * sqrt(2), then the clamp.
    out = bias_act(torch.tensor([[-1.0, 100.0]]), torch.tensor([0.5]), act="lrelu", clamp=50)
    torch.testing.assert_close(out, torch.tensor([[-0.1 * 2**0.5, 50.0]]))


def test_plane_projection_keeps_eg3d_quirk_and_rays_use_opencv_axes():
    p = torch.tensor([[[0.1, 0.2, 0.3]]])
    uv = project_onto_planes(generate_planes(), p)
    assert torch.equal(uv[:, 0], torch.tensor([[0.1, 0.2], [0.1, 0.3], [0.3, 0.1]]))  # XY, XZ, ZX
    c = frontal_camera()
    origins, dirs = RaySampler()(c[:, :16].view(-1, 4, 4), c[:, 16:].view(-1, 3, 3), 4)
    assert torch.allclose(origins, torch.tensor([0.0, 0.0, 2.7]).expand(1, 16, 3))
    top_left, bottom_right = dirs[0, 0], dirs[0, -1]
    assert top_left[0] < 0 < top_left[1] and top_left[2] < 0  # image top-left: world -x, +y, looking down -z
    assert bottom_right[0] > 0 > bottom_right[1]


# -------------------------------------------------------------------------------------------------
# renderer determinism


def test_deterministic_render_repeats_and_jitter_differs(small):
    a, b = render(small), render(small)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_depth"], b["image_depth"])

    z = torch.randn(1, small.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r1 = small(z, frontal_camera(), generator=torch.Generator().manual_seed(1))
        r2 = small(z, frontal_camera(), generator=torch.Generator().manual_seed(2))
        r1_again = small(z, frontal_camera(), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(r1["image_raw"], r2["image_raw"])
    assert torch.equal(r1["image_raw"], r1_again["image_raw"])


def test_gradients_reach_the_backbone(small):
    G = small_generator()
    G.requires_grad_(True)
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(3))
    out = G(z, frontal_camera(), deterministic=True)
    (out["image"].square().mean() + out["image_raw"].mean()).backward()
    for name in ("backbone.synthesis.b4.const", "backbone.mapping.fc0.weight", "decoder.net.0.weight"):
        grad = dict(G.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


# -------------------------------------------------------------------------------------------------
# loading official-structure pickles


def test_load_official_structure_pickle_matches_and_never_runs_module_src(small, official_pickle):
    path, marker = official_pickle
    loaded = load_eg3d(path)
    assert not marker.exists(), "the embedded module_src was executed"
    assert loaded.neural_rendering_resolution == small.neural_rendering_resolution
    assert loaded.rendering_kwargs == small.rendering_kwargs
    reference, restored = render(small), render(loaded)
    for key in ("image", "image_raw", "image_depth"):
        assert torch.equal(reference[key], restored[key]), key


def test_fake_module_src_is_observable_under_plain_pickle(small, tmp_path):
    # Sanity check of the fixture: EG3D's own loading path (plain pickle.load with torch_utils importable)
    # runs module_src, which leaves the marker; load_eg3d above did not.
    marker = tmp_path / "ran"
    fake = FakeEG3D(str(marker))
    path = tmp_path / "probe.pkl"
    fake.dump(small, path)
    with mock.patch.dict(sys.modules, fake.modules), pytest.raises(RuntimeError, match="module_src was executed"):
        pickle.loads(path.read_bytes())
    assert marker.exists()


class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("func", [os.system, builtins.eval], ids=["os.system", "builtins.eval"])
def test_pickle_carrying_code_is_refused(tmp_path, func, where):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    payload = _Payload(func, (cmd,))
    data = {"G_ema": payload} if where == "top" else {"G_ema": {"deep": [collections.OrderedDict(x=payload)]}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(UnsafePickleError, match=r"system|eval"):
        load_eg3d(path)
    assert not marker.exists()


def test_code_hidden_in_tensor_bytes_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    inner = pickle.dumps(_Payload(os.system, (f"touch {marker}",)), protocol=2)
    path = tmp_path / "evil-storage.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _Payload(torch.storage._load_from_bytes, (inner,))}))
    with pytest.raises(UnsafePickleError):
        load_eg3d(path)
    assert not marker.exists()


def test_loader_error_paths(tmp_path, small):
    with pytest.raises(FileNotFoundError):
        load_eg3d(tmp_path / "missing.pkl")
    text = tmp_path / "notes.pkl"
    text.write_text("this is not a pickle\n")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_eg3d(text)
    no_g = tmp_path / "no-g.pkl"
    no_g.write_bytes(pickle.dumps({"G": None, "D": None}))
    with pytest.raises(ValueError, match="G_ema"):
        load_eg3d(no_g)
    extra = tmp_path / "extra.pkl"
    FakeEG3D(str(tmp_path / "marker")).dump(small, extra, extra_tensors={"lora_A": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected.*lora_A"):
        load_eg3d(extra)
    assert not (tmp_path / "marker").exists()
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "nowhere")


# -------------------------------------------------------------------------------------------------
# conversion


def test_convert_roundtrip_and_cli(small, official_pickle, tmp_path, capsys):
    path, _ = official_pickle
    out = convert_eg3d(path, tmp_path / "converted")
    assert (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "atomic write left a temp folder"
    converted = load_converted(out)
    assert torch.equal(render(small)["image"], render(converted)["image"])
    assert torch.equal(render(load_generator(out))["image"], render(small)["image"])

    parser = argparse.ArgumentParser(prog="genfast")
    add_convert_eg3d_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert-eg3d", str(path), str(tmp_path / "cli-out")])
    assert args.func is cmd_convert_eg3d
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "config.json" in printed
    assert torch.equal(render(load_converted(tmp_path / "cli-out"))["image"], render(small)["image"])
