"""`genfast sweep-bits` on tiny saved pipelines (a VARPipeline and a DiTPipeline): one row per model x format x
mode with its files, total bits by the stated rule (recomputed here from the parameters), relative quality,
the images a row measured are the quantized model's, resume skips measured rows, other settings are refused,
unknown bits / kinds / formats name the allowed values."""

from __future__ import annotations

import argparse
import fnmatch
import json

import numpy as np
import pytest
import torch
from PIL import Image

import genfast.eval.sweep_bits as sb
from genfast.cli_sweep import add_sweep_parser
from genfast.eval.class_quality import sample_class_images
from genfast.generators import MultiScaleVQModel
from genfast.pipelines import denoiser_of
from genfast.pipelines.class_conditional import ClassDiT, dit_config
from genfast.quant.config import DEFAULT_SKIP
from genfast.training.class_cond import save_class_pipeline
from genfast.training.var_train import build_var, save_var_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = dict(sample_size=64, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4, vocab_size=16,
           patch_nums=(1, 2, 4, 8), share_quant_resi=2, mid_block_add_attention=False)
N = 4  # images per row
FAST = {"dit": {"num_inference_steps": 2}}  # the tiny DiT samples in 2 steps
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: (folder, the in-memory denoiser saved there)}."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vq = MultiScaleVQModel(**TOK).eval()
    var = build_var(dict(width=16, depth=2, num_heads=2), vq)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere: adaLN-Zero would make the untrained blocks identities
        for p in var.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_var_pipeline(var, vq, root / "var")
    torch.manual_seed(0)
    dit = ClassDiT(**dit_config(20_000))
    save_class_pipeline(dit, root / "dit")
    return {"var": (root / "var", var), "dit": (root / "dit", dit)}


def _models(folders):
    return [("var", "var-tiny", folders["var"][0]), ("dit", "dit-tiny", folders["dit"][0])]


@pytest.fixture(scope="module")
def swept(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    results = sb.sweep_bits(_models(folders), ["int4", "fp3_e2m0"], out, modes=("ptq",), num_images=N,
                            sampling=FAST, **QUIET)
    return out, results


def expected_total_bits(model: torch.nn.Module, bits: int) -> int:
    """The rule, from the float model's parameters: quantized weights x bits + one float32 scale per output row
    (channel-wise scales) + everything else x 16; the quantized layers are the Linear / Conv2d not skipped."""
    total = sum(p.numel() for p in model.parameters())
    if bits == 16:
        return 16 * total
    layers = [m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and not any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_SKIP)]
    weights = sum(m.weight.numel() for m in layers)
    return weights * bits + 32 * sum(m.weight.shape[0] for m in layers) + 16 * (total - weights)


def test_one_row_per_combination_with_its_files(swept):
    out, results = swept
    assert {(r["model"], r["format"], r["mode"]) for r in results["rows"]} == {
        (m, f, mode) for m in ("var-tiny", "dit-tiny")
        for f, mode in (("fp16", "none"), ("int4", "ptq"), ("fp3_e2m0", "ptq"))}
    assert len(results["rows"]) == 6
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    for r in results["rows"]:
        assert f"| {r['model']} | {r['family']} |" in table and f"| {r['format']} | {r['mode']} |" in table
        assert len(list((out / "images" / r["model"] / f"{r['format']}-{r['mode']}").glob("*.png"))) == N
    with Image.open(out / "scaling.png") as im:
        assert im.size[0] > 0
    assert results["reference"]["real_vs_real"]["name"] == "FID[mini-features]"


def test_total_bits_follow_the_stated_rule(swept, folders):
    _, results = swept
    for r in results["rows"]:
        model = folders[r["family"]][1]
        assert r["total_bits"] == expected_total_bits(model, r["bits"]), (r["model"], r["format"])
        if r["format"] != "fp16":
            assert 0 < r["quantized_layers"] < sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                                                   for m in model.modules())  # some quantized, some kept at 16
    assert results["models"]["dit-tiny"]["parameters"] == sum(p.numel() for p in folders["dit"][1].parameters())


def test_relative_quality_is_to_the_models_16_bit_row(swept):
    _, results = swept
    rows = results["rows"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["format"] == "fp16")
        if r is base:
            assert r["relative"] == {"class_accuracy": 1.0, "fid": 1.0}
            assert r["to_16bit"] is None
            continue
        assert r["relative"]["fid"] == pytest.approx(r["fid"]["value"] / base["fid"]["value"])
        acc, base_acc = r["class_accuracy"]["class"], base["class_accuracy"]["class"]
        assert r["relative"]["class_accuracy"] == (pytest.approx(acc / base_acc) if base_acc else None)
        assert r["to_16bit"]["psnr"] < 100, "quantization changed the images"


def _png_images(folder):
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*.png"))])


@pytest.mark.parametrize("family", ["var", "dit"])
def test_a_row_measured_the_quantized_models_images(swept, folders, family):
    """The int4 row's images are what the folder's model, rounded to fp16 and quantized, samples."""
    import genfast

    out, results = swept
    pipe = sb.load_model(family, folders[family][0])
    with torch.no_grad():
        for p in denoiser_of(pipe).parameters():
            p.copy_(p.half().float())
    genfast.quantize(pipe, weights="int4")
    images, _ = sample_class_images(pipe, N, **results["models"][f"{family}-tiny"]["sampling"])
    saved = _png_images(out / "images" / f"{family}-tiny" / "int4-ptq")
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), saved)


def test_rerun_skips_measured_rows_and_adds_new_ones(swept, folders, monkeypatch):
    out, before = swept
    calls = []
    real = sb.quantize
    monkeypatch.setattr(sb, "quantize", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = sb.sweep_bits(_models(folders), ["int4", "fp3_e2m0"], out, modes=("ptq",), num_images=N,
                          sampling=FAST, **QUIET)
    assert calls == [] and again["rows"] == before["rows"]
    more = sb.sweep_bits(_models(folders)[1:], ["int4", "int2"], out, modes=("ptq",), num_images=N,
                         sampling=FAST, **QUIET)
    assert len(calls) == 1  # dit-tiny int2 only
    assert len(more["rows"]) == 7 and [r for r in more["rows"] if r["format"] != "int2"] == before["rows"]


def test_other_settings_in_the_same_folder_are_refused(swept, folders):
    out, _ = swept
    with pytest.raises(ValueError, match="other settings.*num_images: 4 there, 6 now"):
        sb.sweep_bits(_models(folders), ["int4"], out, modes=("ptq",), num_images=6, sampling=FAST, **QUIET)
    with pytest.raises(ValueError, match="other settings.*granularity"):
        sb.sweep_bits(_models(folders), ["int4"], out, modes=("ptq",), num_images=N, granularity="tensor",
                      sampling=FAST, **QUIET)
    with pytest.raises(ValueError, match="model 'dit-tiny' was measured before with other sampling"):
        sb.sweep_bits(_models(folders), ["int4"], out, modes=("ptq",), num_images=N, **QUIET)
    with pytest.raises(ValueError, match="model 'dit-tiny' was measured before with its weights changed"):
        sb.sweep_bits([("dit", "dit-tiny", folders["var"][0])], ["int4"], out, modes=("ptq",), num_images=N,
                      **QUIET)


def test_bits_kinds_and_formats_map_and_unknown_ones_name_the_allowed_values(folders, tmp_path):
    assert sb.formats_for(sb.BITS, sb.KINDS) == ["fp16", "int8", "fp8_e4m3", "int6", "fp6_e2m3", "int4",
                                                 "fp4_e2m1", "int3", "fp3_e2m0", "int2", "fp2_e1m0"]
    assert sb.format_for(16, "int") == sb.format_for(16, "fp") == "fp16"
    with pytest.raises(ValueError, match="unknown bit width 5; choose from 16, 8, 6, 4, 3, 2"):
        sb.format_for(5, "int")
    with pytest.raises(ValueError, match="unknown kind 'float'; choose from int, fp"):
        sb.format_for(4, "float")
    models = _models(folders)
    with pytest.raises(ValueError, match="unknown format 'int9'; choose from fp16, int2"):
        sb.sweep_bits(models, ["int9"], tmp_path / "a", modes=("ptq",), **QUIET)
    with pytest.raises(ValueError, match="unknown mode 'rtn'; choose from ptq, qat"):
        sb.sweep_bits(models, ["int4"], tmp_path / "a", modes=("rtn",), **QUIET)
    with pytest.raises(ValueError, match="qat_steps has no effect without the 'qat' mode"):
        sb.sweep_bits(models, ["int4"], tmp_path / "a", modes=("ptq",), qat_steps=3, **QUIET)
    with pytest.raises(ValueError, match="sampling option 'top_k' does not apply to dit models"):
        sb.sweep_bits(models, ["int4"], tmp_path / "a", modes=("ptq",), sampling={"dit": {"top_k": 3}}, **QUIET)
    with pytest.raises(ValueError, match="holds a DiTPipeline, not the VARPipeline"):
        sb.load_model("var", folders["dit"][0])


def _cli(argv):
    parser = argparse.ArgumentParser(prog="genfast")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sweep-bits", *argv])
    return args.func(args)


def test_the_command_writes_a_sweep_and_refuses_what_has_no_effect(folders, tmp_path, capsys):
    var, dit = str(folders["var"][0]), str(folders["dit"][0])
    assert _cli(["--var", f"v={var}", "--dit", dit, "--bits", "16", "4", "--kinds", "int", "--modes", "ptq",
                 "--num-images", "2", "--dit-steps", "2", "--out", str(tmp_path / "s")]) == 0
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert {(r["model"], r["format"]) for r in results["rows"]} == {(m, f) for m in ("v", "dit")
                                                                    for f in ("fp16", "int4")}
    assert (tmp_path / "s" / "scaling.png").is_file() and (tmp_path / "s" / "results.md").is_file()
    with pytest.raises(ValueError, match="--qat-steps has no effect without --modes qat"):
        _cli(["--dit", dit, "--modes", "ptq", "--qat-steps", "2", "--out", str(tmp_path / "t")])
    with pytest.raises(ValueError, match="--var-top-k has no effect without --var models"):
        _cli(["--dit", dit, "--var-top-k", "4", "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit):
        _cli(["--dit", dit, "--bits", "5", "--out", str(tmp_path / "t")])
    assert "invalid choice: 5 (choose from 16, 8, 6, 4, 3, 2)" in capsys.readouterr().err


def test_qat_rows_quantize_the_same_layers_as_ptq(folders, tmp_path):
    pytest.importorskip("genfast.training.qat")
    models = _models(folders)
    with pytest.raises(ValueError, match="TopKLD, whose K is the sampler's top-k.*--var-top-k"):
        sb.sweep_bits(models, ["int4"], tmp_path / "q", modes=("qat",), num_images=N,
                      sampling={**FAST, "var": {"top_k": 0}}, **QUIET)
    with pytest.raises(ValueError, match="qat option loss applies to VAR models only"):
        sb.sweep_bits(models[1:], ["int4"], tmp_path / "q", modes=("qat",), num_images=N, sampling=FAST,
                      qat_options={"loss": "fkl"}, **QUIET)
    sampling = {**FAST, "var": {"top_k": 4}}
    results = sb.sweep_bits(models, ["int4"], tmp_path / "q", modes=("ptq", "qat"), num_images=N, qat_steps=2,
                            sampling=sampling, qat_options={"batch_size": 2, "pool_size": 4}, **QUIET)
    for name in ("var-tiny", "dit-tiny"):
        ptq, qat = (next(r for r in results["rows"] if (r["model"], r["format"], r["mode"]) == (name, "int4", m))
                    for m in ("ptq", "qat"))
        assert qat["total_bits"] == ptq["total_bits"] and qat["quantized_layers"] == ptq["quantized_layers"]
        assert qat["qat"]["last"]["step"] == 2
    assert results["settings"]["qat"]["steps"] == 2 and not (tmp_path / "q" / "qat-work").exists()
