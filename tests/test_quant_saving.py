"""Quantized pipeline folders: save_quantized / load_pipeline give back the quantized outputs bit for bit
for every format family, codes stay bit-packed on disk, bad folders are refused, writes are atomic, and
`genfast quantize` / `genfast compare` read and write them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from tiny_pipelines import build, denoiser, inputs

import genfast
from genfast.api import handles_on
from genfast.cli import main
from genfast.quant.layers import is_quantized, stored
from genfast.quant.saving import CONFIG_NAME, WEIGHTS_NAME, QuantizedFolderError

# one config per format family (integer symmetric group / asymmetric channel, fp8, fp6, fp4, MX, NVFP4)
FAMILIES = [
    dict(weights="int4", granularity="group:32"),
    dict(weights="int8", symmetric=False),
    dict(weights="fp8_e4m3"),
    dict(weights="fp6_e3m2", granularity="group:16"),
    dict(weights="fp4_e2m1", granularity="tensor"),
    dict(weights="mxfp4"),
    dict(weights="mxfp6"),
    dict(weights="nvfp4"),
]


def _run(pipe, kind):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**inputs(kind, steps=2)).images


def _quantized(kind, dtype=torch.float32, **options):
    pipe = build(kind).to(dtype)
    handle = genfast.quantize(pipe, genfast.QuantConfig(**options))
    return pipe, handle


@pytest.mark.parametrize("kind", ["sd", "pixart"])
@pytest.mark.parametrize("options", FAMILIES, ids=[f["weights"] for f in FAMILIES])
def test_reload_equals_the_in_memory_quantized_pipeline_bit_for_bit(kind, options, tmp_path):
    pipe, handle = _quantized(kind, **options)
    before = _run(pipe, kind)
    genfast.save_quantized(pipe, tmp_path / "q")
    loaded = genfast.load_pipeline(tmp_path / "q")
    assert np.array_equal(_run(loaded, kind), before)
    model = denoiser(loaded)
    assert sorted(n for n, m in model.named_modules() if is_quantized(m)) == sorted(handle.layers)
    for name, layer in handle.layers.items():
        for field, t in stored(model.get_submodule(name)).items():
            assert torch.equal(t, stored(layer)[field]), (name, field)
    # no float weight behind a quantized layer: the model holds exactly the tensors of the file
    on_disk = safetensors.torch.load_file(next((tmp_path / "q").glob(f"*/{WEIGHTS_NAME}")))
    assert sum(t.nbytes for t in model.state_dict().values()) == sum(t.nbytes for t in on_disk.values())


@pytest.mark.parametrize("weights", ["int2", "int3", "int4", "int6", "fp6_e2m3"])
def test_sub_byte_codes_stay_bit_packed_on_disk(weights, tmp_path):
    pipe, handle = _quantized("sd", weights=weights, granularity="channel")
    genfast.save_quantized(pipe, tmp_path / "q")
    on_disk = safetensors.torch.load_file(tmp_path / "q" / "unet" / WEIGHTS_NAME)
    bits = genfast.QuantConfig(weights=weights).bits
    for name, layer in handle.layers.items():
        param = layer.parametrizations["weight"][0]
        codes = on_disk[f"{name}.weight.codes"]
        assert codes.dtype == torch.uint8
        assert codes.numel() == -(-param.rows * param.width // 8) * bits  # bits per code, not a byte
    meta = json.loads((tmp_path / "q" / "unet" / CONFIG_NAME).read_text())
    assert meta["config"]["weights"] == weights and meta["genfast_version"] == genfast.__version__


def test_an_fp16_pipeline_reloads_in_fp16_with_the_same_weights(tmp_path):
    pipe, handle = _quantized("sd", dtype=torch.float16, weights="int4", granularity="group:32")
    genfast.save_quantized(pipe, tmp_path / "q")
    loaded = genfast.load_pipeline(tmp_path / "q")
    assert loaded.unet.dtype == torch.float16 and loaded.text_encoder.dtype == torch.float16
    for name, layer in handle.layers.items():
        assert torch.equal(loaded.unet.get_submodule(name).weight, layer.weight)
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)  # skipped: kept in fp16
    as32 = genfast.load_pipeline(tmp_path / "q", dtype=torch.float32)
    name = next(iter(handle.layers))
    assert as32.unet.dtype == torch.float32
    assert torch.equal(as32.unet.get_submodule(name).weight.half(), handle.layers[name].weight)


def test_a_loaded_pipeline_is_quantized_once_saves_again_and_cannot_restore_floats(tmp_path):
    pipe, _ = _quantized("sd", weights="int8")
    genfast.save_quantized(pipe, tmp_path / "q")
    loaded = genfast.load_pipeline(tmp_path / "q")
    handle = handles_on(loaded.unet)["quantize"]
    with pytest.raises(RuntimeError, match="no float weights to restore"):
        handle.remove()
    with pytest.raises(RuntimeError, match="already quantized"):
        genfast.quantize(loaded, weights="int4")
    genfast.save_quantized(loaded, tmp_path / "again")
    assert np.array_equal(_run(genfast.load_pipeline(tmp_path / "again"), "sd"), _run(pipe, "sd"))


def test_a_plain_pipeline_folder_loads_as_diffusers_loads_it(tmp_path):
    pipe = build("sd")
    pipe.save_pretrained(tmp_path / "plain")
    loaded = genfast.load_pipeline(tmp_path / "plain")
    assert "quantize" not in handles_on(loaded.unet)
    assert np.array_equal(_run(loaded, "sd"), _run(pipe, "sd"))


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    pipe, _ = _quantized("sd", weights="int4", granularity="group:32")
    genfast.save_quantized(pipe, root / "q")
    return root / "q"


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def _edit_meta(folder, change):
    path = folder / "unet" / CONFIG_NAME
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_a_truncated_weights_file_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    path = folder / "unet" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(QuantizedFolderError, match=rf"{WEIGHTS_NAME}: not a complete safetensors file .* truncated"):
        genfast.load_pipeline(folder)


def test_a_changed_weights_file_fails_its_sha256(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    path = folder / "unet" / WEIGHTS_NAME
    tensors = safetensors.torch.load_file(path)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + 1
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(QuantizedFolderError, match=rf"{WEIGHTS_NAME}: its sha256 does not match"):
        genfast.load_pipeline(folder)


def _first_layer(meta):
    return next(iter(meta["layers"]))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["layers"][_first_layer(m)].update(shape=[3, 3]), "has weight shape \\[3, 3\\] in the JSON"),
    (lambda m: m["layers"].pop(_first_layer(m)), "has packed tensors in .* but no entry in the JSON"),
    (lambda m: m["layers"][_first_layer(m)]["fields"].update(zero={"shape": [1], "dtype": "int32"}),
     "lists fields \\['codes', 'scale', 'zero'\\], but int4 symmetric stores \\['codes', 'scale'\\]"),
    (lambda m: m["layers"][_first_layer(m)]["fields"]["codes"].update(shape=[7]), "the JSON says"),
    (lambda m: m["config"].update(granularity="channel"), "needs"),  # scales of group:32, read per channel
    (lambda m: m["layers"].update({"no.such.layer": m["layers"][_first_layer(m)]}), "'no.such.layer' is not in"),
    (lambda m: m["config"].update(weights="int9"), "int9.*this genfast knows the formats int2"),
    (lambda m: m.update(format="genfast-quantized/99"), "this genfast reads 'genfast-quantized/1'"),
])
def test_a_config_that_does_not_match_its_tensors_is_refused_naming_the_file(saved, tmp_path, change, message):
    folder = _copy(saved, tmp_path)
    _edit_meta(folder, change)
    with pytest.raises(QuantizedFolderError, match=rf"unet/{CONFIG_NAME}: .*{message}") as err:
        genfast.load_pipeline(folder)
    assert "; " in str(err.value)  # followed by what to do


def test_saving_refuses_an_unquantized_pipeline_and_a_folder_that_is_not_its_own(tmp_path):
    with pytest.raises(ValueError, match="is not quantized: call genfast.quantize"):
        genfast.save_quantized(build("sd"), tmp_path / "q")
    with pytest.raises(TypeError, match="pass the pipeline"):
        genfast.save_quantized(build("sd").unet, tmp_path / "q")
    pipe, handle = _quantized("sd", weights="int8")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a genfast quantized pipeline"):
        genfast.save_quantized(pipe, other)
    assert (other / "notes.txt").read_text() == "keep me"
    other_handle = genfast.quantize(build("sd"), weights="int8")
    with pytest.raises(ValueError, match="quantized no component of this pipeline"):
        genfast.save_quantized(pipe, tmp_path / "q", handle=other_handle)
    handle.remove()
    with pytest.raises(ValueError, match="is not quantized"):
        genfast.save_quantized(pipe, tmp_path / "q")


def test_a_save_replaces_a_quantized_folder_atomically(tmp_path, monkeypatch):
    out = tmp_path / "q"
    pipe8, _ = _quantized("sd", weights="int8")
    genfast.save_quantized(pipe8, out)
    pipe4, _ = _quantized("sd", weights="int4")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        genfast.save_quantized(pipe4, out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left behind
    assert np.array_equal(_run(genfast.load_pipeline(out), "sd"), _run(pipe8, "sd"))  # the old save, whole
    genfast.save_quantized(pipe4, out)  # a quantized folder is replaced
    assert json.loads((out / "unet" / CONFIG_NAME).read_text())["config"]["weights"] == "int4"


# ---------------------------------------------------------------- command line and compare


def test_genfast_quantize_writes_what_genfast_quantize_computes(tmp_path, capsys):
    build("sd").save_pretrained(tmp_path / "sd")
    assert main(["quantize", str(tmp_path / "sd"), "--weights", "int4", "--granularity", "group:32",
                 "--asymmetric", "--out", str(tmp_path / "q")]) == 0
    line = capsys.readouterr().out
    reference = genfast.load_pipeline(tmp_path / "sd")
    handle = genfast.quantize(reference, weights="int4", granularity="group:32", symmetric=False)
    assert f"{len(handle.layers)} layers of unet -> int4" in line and "MB on disk" in line
    assert np.array_equal(_run(genfast.load_pipeline(tmp_path / "q"), "sd"), _run(reference, "sd"))


def test_genfast_quantize_skip_replaces_the_default_list(tmp_path, capsys):
    build("sd").save_pretrained(tmp_path / "sd")
    assert main(["quantize", str(tmp_path / "sd"), "--weights", "int8", "--skip", "--out", str(tmp_path / "q")]) == 0
    unet = genfast.load_pipeline(tmp_path / "q").unet
    assert is_quantized(unet.conv_in) and is_quantized(unet.conv_out)  # in the default skip list
    every = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert all(is_quantized(unet.get_submodule(n)) for n in every)


@pytest.mark.parametrize("args, message", [
    (["--weights", "int9"], "weights must be one of"),
    (["--weights", "mxfp4", "--granularity", "group:8"], "granularity does nothing for mxfp4"),
    (["--weights", "fp8_e4m3", "--asymmetric"], "symmetric=False applies to integer formats only"),
])
def test_genfast_quantize_bad_options_are_one_line(tmp_path, capsys, args, message):
    assert main(["quantize", *args, "--out", str(tmp_path / "q")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_genfast_quantize_refuses_a_quantized_source(saved, tmp_path, capsys):
    assert main(["quantize", str(saved), "--weights", "int8", "--out", str(tmp_path / "q")]) == 2
    assert "already a genfast quantized pipeline" in capsys.readouterr().err


def test_compare_loads_quantized_folders_as_baseline_and_as_variant(saved):
    from genfast.eval.compare import CompareSettings, _Generator, _load, _variant_pipeline
    from genfast.eval.variants import pipeline_variant

    settings = CompareSettings(pipeline=str(saved), prompts=["a red circle"], num_images=1, steps=2)
    base = _load(settings, "cpu")
    assert "quantize" in handles_on(base.unet)
    variant = _variant_pipeline(pipeline_variant(saved), _Generator(base, ["a red circle"], settings), settings, "cpu")
    assert variant.pipe is not base and "quantize" in handles_on(variant.pipe.unet)
    expected = genfast.load_pipeline(saved)
    expected.set_progress_bar_config(disable=True)
    kwargs = variant.kwargs(variant.batches[0])
    assert torch.equal(variant.call(variant.batches[0])(), expected(**kwargs).images)
