"""ArcFace IR-SE50: layout of model_ir_se50.pth, safe loading, and use as an identity encoder (CPU, random weights)."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from genfast.gan3d.arcface import PSP_CROP, ArcFaceIRSE50, load_arcface
from genfast.gan3d.identity import IdentityEncoder, identity_similarity

# 43,797,696 parameters; with the BatchNorm running statistics the float32 state dict holds
# 43,824,064 values = 175.3 MB, the size of the released model_ir_se50.pth.
N_PARAMS = 43_797_696
N_FLOAT_VALUES = 43_824_064


def _images(n=2, size=64, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ArcFaceIRSE50()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a buffer lost on the way would show
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.requires_grad_(False)


@pytest.fixture(scope="module")
def reference(model):
    with torch.no_grad():
        return model(_images())


def test_layout_matches_checkpoint(model):
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    sd = model.state_dict()
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == N_FLOAT_VALUES
    assert len(model.body) == 24
    shapes = {
        "input_layer.0.weight": (64, 3, 3, 3),
        "input_layer.2.weight": (64,),
        "body.0.res_layer.5.fc1.weight": (4, 64, 1, 1),
        "body.0.res_layer.5.fc2.weight": (64, 4, 1, 1),
        "body.3.shortcut_layer.0.weight": (128, 64, 1, 1),
        "body.3.res_layer.3.weight": (128, 128, 3, 3),
        "body.23.res_layer.0.running_var": (512,),
        "output_layer.3.weight": (512, 25088),
        "output_layer.3.bias": (512,),
        "output_layer.4.weight": (512,),
        "output_layer.4.running_mean": (512,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # stages open at units 0, 3, 7 and 21; only those that change width have a conv shortcut
    assert "body.0.shortcut_layer.0.weight" not in sd
    assert {k.split(".")[1] for k in sd if ".shortcut_layer." in k} == {"3", "7", "21"}


@pytest.mark.parametrize("variant", ["pth", "module_prefix", "no_bn_counters", "safetensors"])
def test_load_roundtrip(model, reference, tmp_path, variant):
    sd = model.state_dict()
    if variant == "safetensors":
        path = tmp_path / "model_ir_se50.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        if variant == "module_prefix":
            sd = {f"module.{k}": v for k, v in sd.items()}
        elif variant == "no_bn_counters":  # as saved by PyTorch releases before BatchNorm counted batches
            sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        path = tmp_path / "model_ir_se50.pth"
        torch.save(sd, path)
    loaded = load_arcface(path)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    out = loaded(_images())
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "model_ir_se50.pth"
    with pytest.raises(FileNotFoundError, match="InsightFace_Pytorch") as e:
        load_arcface(path)
    assert str(path) in str(e.value)


def test_wrong_checkpoints(tmp_path):
    wrong_keys = tmp_path / "other.pth"
    torch.save(IdentityEncoder().state_dict(), wrong_keys)
    with pytest.raises(ValueError, match="not an ArcFace IR-SE50 checkpoint") as e:
        load_arcface(wrong_keys)
    assert "body.0.res_layer.0" in str(e.value) and "net.0.0" in str(e.value)  # names a few of each

    wrong_shapes = tmp_path / "shapes.pth"  # the right names, the wrong tensors
    torch.save({k: torch.zeros(1) for k in ArcFaceIRSE50().state_dict()}, wrong_shapes)
    with pytest.raises(ValueError, match="size mismatch"):
        load_arcface(wrong_shapes)

    pickled_module = tmp_path / "module.pth"  # a whole pickled model: refused, never unpickled
    torch.save(nn.Linear(2, 2), pickled_module)
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        load_arcface(pickled_module)


def test_crop_selects_psp_window():
    m = ArcFaceIRSE50(crop=PSP_CROP)
    x = _images(1, 256)
    torch.testing.assert_close(m.preprocess(x), nn.functional.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], 112))
    with pytest.raises(ValueError, match="crop"):
        ArcFaceIRSE50(crop=(0.1, 0.9))


def test_identity_similarity_of_an_image_with_itself(model):
    x = _images().requires_grad_(True)
    sim = identity_similarity(model, x, x)
    torch.testing.assert_close(sim, torch.ones(2), rtol=0, atol=1e-5)
    (1 - identity_similarity(model, x, x.flip(-1))).sum().backward()  # as a loss, gradients reach the images
    assert x.grad is not None and x.grad.abs().sum() > 0
