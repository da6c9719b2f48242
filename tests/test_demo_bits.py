"""The demo's Bits tab, its handler called as a function on a tiny VARPipeline and a tiny DiTPipeline folder:
the 16-bit image is the fp16-rounded pipeline's own and, at 16 bits, also the chosen one; below 16 bits the
image, total bits and PSNR are those of the model quantized as sweep-bits quantizes it, and the kept 16-bit
model is not changed by it; a missing folder is named with its build command while the other family runs;
Cancel stops a run; bad input gets a gr.Error naming the field."""

import shlex
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from demo_helpers import shrink
from test_sweep_bits import TOK
from tiny_pipelines import tiny_tokenizer, wake_gates

import genfast.eval.sweep_bits as sb
from genfast.demo.bits_tab import BitsModel, BitsTab, default_models
from genfast.demo.common import DemoModels, Jobs
from genfast.eval.class_quality import to_uint8
from genfast.eval.compare import class_label_ids
from genfast.eval.faithfulness import faithfulness
from genfast.pipelines import denoiser_of
from genfast.quant import QuantConfig, quantize

pytestmark = pytest.mark.usefixtures("one_thread")

LABEL, SEED = "blue star", 7


def tiny_bits_models(root: Path) -> list[BitsModel]:
    """A tiny VARPipeline and a tiny DiTPipeline folder under `root` (float32, random weights everywhere in the
    VAR and in the DiT's adaLN-Zero modulation, so the label and the quantization reach the images)."""
    from genfast.pipelines.class_conditional import ClassDiT, dit_config
    from genfast.training.class_cond import save_class_pipeline
    from genfast.training.var_train import build_var, save_var_pipeline

    vq = tiny_tokenizer(**TOK)
    torch.manual_seed(0)
    var = wake_gates(build_var(dict(width=16, depth=2, num_heads=2), vq), "", std=0.3)  # "": every parameter
    save_var_pipeline(var, vq, root / "var")
    torch.manual_seed(0)
    save_class_pipeline(wake_gates(ClassDiT(**dit_config(20_000))), root / "dit")
    return [BitsModel("VAR", "var", root / "var", f"genfast train-var --out {root / 'var'}"),
            BitsModel("DiT", "dit", root / "dit", f"genfast train-class --model dit --out {root / 'dit'}")]


def made(model: BitsModel, fmt: str):
    """(pipeline, quantize handle or None): the folder loaded plainly, rounded to fp16 and quantized as
    `genfast sweep-bits` makes a PTQ row, outside the demo."""
    pipe = sb.load_model(model.family, model.folder)
    sb._round_to_fp16(denoiser_of(pipe))
    if fmt == sb.FP16:
        return pipe, None
    return pipe, quantize(pipe, QuantConfig(weights=fmt, kernel="dequantize", **sb._granularity(fmt, "channel")))


def direct(pipe, model: BitsModel, label: str, seed: int) -> np.ndarray:
    """HWC uint8 image of a pipeline for one class name and seed, with the family's sweep-bits settings."""
    device = pipe.transformer.device if model.family == "var" else "cpu"  # as class_quality samples
    out = pipe(class_label_ids(pipe, [label]), generator=torch.Generator(device).manual_seed(seed), output_type="pt",
               **sb.sampling_settings(model.family, model.folder)).images
    return to_uint8(out)[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    return tiny_bits_models(tmp_path_factory.mktemp("bits"))


@pytest.fixture(scope="module")
def models(chosen):
    models = DemoModels(workers=1)
    models.bits_pipelines = chosen
    return models


@pytest.fixture(scope="module")
def tab(models):
    return BitsTab(models, Jobs())


@pytest.fixture(scope="module")
def sixteen(chosen):
    """Each family's 16-bit image, sampled outside the demo."""
    return {m.name: direct(made(m, sb.FP16)[0], m, LABEL, SEED) for m in chosen}


def run(tab, label=LABEL, seed=SEED, bits=4, kind="int", request=None, progress=lambda *a, **k: None):
    return tab.run(label, seed, bits, kind, request=request, progress=progress)


def test_at_16_bits_the_chosen_image_is_the_16_bit_one_and_the_plain_pipeline_s(tab, chosen, sixteen):
    gallery, table, n = run(tab, bits=16, kind="int")
    assert [caption for _, caption in gallery] == ["VAR 16-bit", "VAR fp16", "DiT 16-bit", "DiT fp16"]
    for i, (model, row) in enumerate(zip(chosen, n["models"], strict=True)):
        base, picked = shrink(gallery[2 * i][0]), shrink(gallery[2 * i + 1][0])
        assert (base == picked).all() and (base == sixteen[model.name]).all(), model.name
        params = sum(p.numel() for p in denoiser_of(made(model, sb.FP16)[0]).parameters())
        assert row["parameters"] == params and row["total_bits"] == row["total_bits_16"] == 16 * params
        assert row["ratio"] == 1 and row["psnr_to_16bit"] is None and row["format"] == "fp16"
    assert n["format"] == "fp16" and n["missing"] == [] and "identical (16 bits)" in table
    # one kept 16-bit model per folder, whatever the kind
    assert tab.load(chosen[0], "fp16") is tab.load(chosen[0], sb.format_for(16, "fp"))


@pytest.mark.parametrize("kind, fmt", [("int", "int4"), ("fp", "fp4_e2m1")])
def test_below_16_bits_the_image_and_bits_are_the_sweep_s_quantized_model_s(tab, chosen, sixteen, kind, fmt):
    kept = {m.name: {k: v.clone() for k, v in denoiser_of(tab.load(m, "fp16").pipe).state_dict().items()}
            for m in chosen}
    gallery, table, n = run(tab, bits=4, kind=kind)
    assert [caption for _, caption in gallery] == ["VAR 16-bit", f"VAR {fmt}", "DiT 16-bit", f"DiT {fmt}"]
    assert "Round to nearest (PTQ) here; QAT results: docs/bits (genfast sweep-bits)" in table
    for i, (model, row) in enumerate(zip(chosen, n["models"], strict=True)):
        pipe, handle = made(model, fmt)
        expected = direct(pipe, model, LABEL, SEED)
        assert (shrink(gallery[2 * i][0]) == sixteen[model.name]).all(), model.name
        assert (shrink(gallery[2 * i + 1][0]) == expected).all(), model.name
        assert row["total_bits"] == sb.total_bits(denoiser_of(pipe), handle)["total_bits"] < row["total_bits_16"]
        assert row["ratio"] == row["total_bits"] / row["total_bits_16"]
        assert f"{row['total_bits'] / 8e6:.4f}" in table
        to16 = faithfulness(torch.from_numpy(expected).permute(2, 0, 1)[None].float() / 255,
                            torch.from_numpy(sixteen[model.name]).permute(2, 0, 1)[None].float() / 255)["psnr"]
        assert row["psnr_to_16bit"] == pytest.approx(to16) and to16 < 100, model.name  # quantization shows
        # the kept 16-bit model is the same, bit for bit, after the quantized one was made and run
        after, before = denoiser_of(tab.load(model, "fp16").pipe).state_dict(), kept[model.name]
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_the_images_differ_by_class(tab):
    red = [np.asarray(image) for image, _ in run(tab, label="red circle", bits=16)[0]]
    star = [np.asarray(image) for image, _ in run(tab, bits=16)[0]]
    assert not np.array_equal(red[0], star[0]) and not np.array_equal(red[2], star[2])


def test_a_missing_folder_is_named_with_its_build_command_and_the_other_family_runs(models, chosen, sixteen,
                                                                                    tmp_path, monkeypatch):
    folder = tmp_path / "genfast-var-mini"
    gone = BitsModel("VAR", "var", folder, f"genfast train-var --out {folder}")
    monkeypatch.setattr(models, "bits_pipelines", [gone, chosen[1]])
    tab = BitsTab(models, Jobs())
    gallery, table, n = run(tab)
    assert [caption for _, caption in gallery] == ["DiT 16-bit", "DiT int4"]
    assert (shrink(gallery[0][0]) == sixteen["DiT"]).all()
    assert n["missing"] == [{"name": "VAR", "family": "var", "folder": str(gone.folder), "command": gone.command}]
    assert gone.command in table and "Not built yet" in table
    assert "Found: DiT." in tab.status() and gone.command in tab.status()


def test_no_folder_at_all_is_a_clear_error(models, tmp_path, monkeypatch):
    gone = [BitsModel(name, family, tmp_path / family, f"genfast train-{family} --out {tmp_path / family}")
            for name, family in (("VAR", "var"), ("DiT", "dit"))]
    monkeypatch.setattr(models, "bits_pipelines", gone)
    with pytest.raises(gr.Error, match="No model of either family is built yet") as err:
        run(BitsTab(models, Jobs()))
    assert all(m.command in str(err.value) for m in gone)


def test_the_default_models_are_the_embedded_var_and_dit(monkeypatch, tmp_path):
    from genfast import models as genfast_models
    from genfast.cli import build_parser

    monkeypatch.setattr(genfast_models, "ASSETS", tmp_path)
    defaults = default_models()
    assert [(m.name, m.family, m.folder) for m in defaults] == [
        ("VAR", "var", tmp_path / "genfast-var-mini"), ("DiT", "dit", tmp_path / genfast_models.DIT_CLASS)]
    for model, func in zip(defaults, ("cmd_train_var", "cmd_train_class"), strict=True):
        assert model.command == genfast_models.rebuild_command(model.folder.name)
        args = build_parser().parse_args(shlex.split(model.command)[1:])  # argparse exits on an unknown option
        assert args.func.__name__ == func and Path(args.out) == model.folder  # it writes where the tab looks


def test_cancel_stops_the_run_and_the_next_run_goes_through(tab, chosen, sixteen):
    def progress(value=None, desc=None, **kw):  # the Cancel button, pressed at the quantized VAR's second scale
        if desc == "VAR int4" and value and value[0] == 2:
            tab.cancel()

    def hooks():  # the kept denoisers' hooks (a quantized one has genfast's own)
        return [(list(d._forward_pre_hooks.values()), list(d._forward_hooks.values()))
                for d in (tab.load(m, f).pipe.transformer for m in chosen for f in ("fp16", "int4"))]

    before = hooks()
    with pytest.raises(gr.Error, match="Cancelled"):
        run(tab, progress=progress)
    assert hooks() == before  # the shared denoisers keep no hook of the cancelled job
    gallery, _, _ = run(tab)
    assert (shrink(gallery[2][0]) == sixteen["DiT"]).all()


@pytest.mark.parametrize("over, message", [
    (dict(label="green cat"), "Class must be one of the 24 class names"),
    (dict(label=None), "Class must be one of"),
    (dict(seed=-1), "Seed must be a whole number"),
    (dict(seed=1.5), "Seed must be"),
    (dict(bits=5), "Bits must be one of 16, 8, 6, 4, 3, 2"),
    (dict(bits=True), "Bits must be one of"),
    (dict(bits="four"), "Bits must be one of"),
    (dict(kind="float"), "Kind must be one of 'int', 'fp'"),
    (dict(kind=None), "Kind must be one of"),
])
def test_bad_input_is_a_gr_error_naming_the_field(tab, over, message):
    with pytest.raises(gr.Error, match=message):
        run(tab, **over)
