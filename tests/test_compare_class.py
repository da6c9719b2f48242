"""`genfast compare` on class-conditional pipelines (DiTPipeline): class labels in place of prompts, real
renders of the same classes, class accuracy, feature inheritance and quantization rows, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import wake_gates

from genfast.cli import main
from genfast.data.classes import HELDOUT_SEED, NUM_CLASSES, ClassShapesDataset, class_names, eval_class_labels
from genfast.eval.compare import (
    CompareSettings,
    _ClassGenerator,
    _to_uint8,
    _variant_pipeline,
    class_label_ids,
    default_class_labels,
    run_compare,
)
from genfast.eval.variants import parse_variants, pipeline_variant
from genfast.methods.feature_inheritance import uniform_schedule
from genfast.models import MINI, asset_path
from genfast.pipelines.class_conditional import ClassDiT, class_accuracy, dit_config, make_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

N, STEPS = 6, 6  # 6 steps: feature inheritance reuses nothing below 5
FI, QUANT = "feature_inheritance:interval=2", "quantize:weights=int8"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_thread):
    """A tiny ClassDiT (random weights) in a DiTPipeline folder, as genfast train-class writes one."""
    torch.manual_seed(0)
    model = ClassDiT(**dit_config(20_000)).eval()
    wake_gates(model, "norm1.linear")
    path = tmp_path_factory.mktemp("class") / "dit"
    make_pipeline(model).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """One run: method rows, a chain row, and two pipeline folders: a byte copy of the baseline's, and the
    folder `genfast quantize --weights int8` writes (saved without the class names: the baseline's ids apply)."""
    copy = shutil.copytree(folder, folder.parent / "dit-copy")
    quantized = folder.parent / "dit-int8"
    assert main(["quantize", str(folder), "--weights", "int8", "--out", str(quantized)]) == 0
    out = tmp_path_factory.mktemp("out")
    settings = CompareSettings(pipeline=str(folder), num_images=N, steps=STEPS, batch_size=4, runs=1,
                               feature_space="mini-features", out=str(out))
    report = run_compare(settings, parse_variants([FI, QUANT, f"{QUANT}+{FI}"], [copy, quantized]))
    return out, report, copy, quantized


def _pngs(folder):
    return [np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))]


def _fid(row, reference):
    return next((f["value"] for f in row["fid"] if f["reference"] == reference), None)


def test_report_has_class_accuracy_fids_and_every_variant(run):
    out, report, copy, quantized = run
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["baseline", "feature_inheritance(interval=2)", "quantize(weights=int8)",
                          "quantize(weights=int8) + feature_inheritance(interval=2)", f"pipeline({copy})",
                          f"pipeline({quantized})"]
    assert report["pipeline_class"] == "DiTPipeline"
    assert report["prompts"] == f"{N} held-out class labels (every class in turn)"
    assert report["class_accuracy"] and "prompt_accuracy" not in report
    for row in rows.values():
        assert "prompt_accuracy" not in row and set(row["class_accuracy"]) == {"class", "shape", "color"}
        acc = row["class_accuracy"]
        assert all(0 <= v <= 1 for v in acc.values()) and acc["class"] <= min(acc["shape"], acc["color"])
        expected = ["real"] if row["kind"] == "baseline" else ["baseline", "real"]
        assert [f["reference"] for f in row["fid"]] == expected
        assert all(np.isfinite(f["value"]) for f in row["fid"])
    md = (out / "report.md").read_text()
    assert "| class acc | shape acc | color acc |" in md and "class accuracy:" in md
    assert "prompt accuracy" not in md
    assert all(f"| {name} |" in md for name in rows)
    assert (out / "grid.png").is_file() and (out / "pareto.png").is_file()


def test_feature_inheritance_skips_blocks_and_quantize_changes_the_images(run):
    _, report, _, _ = run
    base, fi, q, chain, _, _ = report["variants"]
    assert base["latency"]["full_denoiser_calls"] == base["latency"]["denoiser_calls"] == STEPS
    for row in (fi, chain):
        assert row["latency"]["full_denoiser_calls"] == sum(uniform_schedule(STEPS, 2)) < STEPS
        assert row["faithfulness"]["psnr"] < 100 and _fid(row, "baseline") > 0
    assert q["latency"]["full_denoiser_calls"] == STEPS and q["faithfulness"]["psnr"] < 100


def test_images_are_the_labels_classes_with_their_seeds(run, folder):
    """The baseline's images equal the pipeline called by hand on the ids of the held-out labels (image i:
    class i % 24, seed i); a byte copy of the folder gives the same images."""
    out, report, copy, quantized = run
    from genfast.quant.saving import load_pipeline

    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    ids = eval_class_labels(N)
    assert class_label_ids(pipe, default_class_labels(pipe, N)) == ids
    by_hand = torch.cat([pipe(class_labels=ids[a:a + 4], guidance_scale=5.0, num_inference_steps=STEPS,
                              generator=[torch.Generator().manual_seed(i) for i in range(a, min(a + 4, N))],
                              output_type="pt").images for a in (0, 4)])
    by_hand = _to_uint8(by_hand)
    saved = _pngs(out / "images" / "baseline")
    assert len(saved) == N and all(np.array_equal(a, b) for a, b in zip(by_hand.permute(0, 2, 3, 1).numpy(), saved))
    slug = pipeline_variant(copy).slug
    assert all(np.array_equal(a, b) for a, b in zip(saved, _pngs(out / "images" / slug)))
    # the quantized folder makes the quantize row's images
    quantized_images = _pngs(out / "images" / pipeline_variant(quantized).slug)
    assert len(quantized_images) == N
    assert all(np.array_equal(a, b) for a, b in zip(quantized_images, _pngs(out / "images" / "quantize-weights-int8")))
    # class accuracy is the evaluator's on those images and those ids
    from genfast.models import load_evaluator

    assert report["variants"][0]["class_accuracy"] == class_accuracy(by_hand.float() / 255 * 2 - 1, ids,
                                                                      load_evaluator())


def test_real_images_are_held_out_renders_of_the_same_classes(run):
    out, _, _, _ = run
    ds = ClassShapesDataset(N, seed=HELDOUT_SEED)
    real = _pngs(out / "images" / "real")
    assert len(real) == N and all(np.array_equal(real[i], ds.sample(i)[0]) for i in range(N))


def test_a_labels_file_names_classes_and_unknown_labels_are_one_clear_line(folder, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("purple star\nred circle\n")
    common = ["compare", "--pipeline", str(folder), "--num-images", "2", "--batch-size", "2", "--steps", "2",
              "--runs", "1", "--feature-space", "mini-features", "--method", QUANT]
    out = tmp_path / "out"
    assert main([*common, "--prompts", str(labels), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == "2 class label(s) from a file, cycled to 2"
    ds = ClassShapesDataset(NUM_CLASSES, seed=HELDOUT_SEED)  # real: renders of purple star (23), red circle (0)
    assert all(np.array_equal(a, ds.sample(j)[0]) for a, j in zip(_pngs(out / "images" / "real"), (23, 0)))
    labels.write_text("red circle\na red circle\nhexagon\n")
    assert main([*common, "--prompts", str(labels), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the loader's progress bar
    assert line.startswith("genfast compare: error: unknown class label(s) 'a red circle', 'hexagon':")
    assert "'red circle'" in line and f"({NUM_CLASSES} in all)" in line and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_label_names_map_to_the_pipelines_ids(folder):
    from genfast.quant.saving import load_pipeline

    pipe = load_pipeline(folder)
    names = class_names()
    assert class_label_ids(pipe, ["red circle", "purple star", names[7]]) == [0, NUM_CLASSES - 1, 7]
    with pytest.raises(ValueError, match="unknown class label\\(s\\) 'Red Circle'"):
        class_label_ids(pipe, ["Red Circle"])
    pipe.labels = {}  # a DiTPipeline saved without keep_labels
    with pytest.raises(ValueError, match="DiTPipeline has no label names.*keep_labels"):
        default_class_labels(pipe, 2)


def test_a_step_callback_is_refused_on_a_class_pipeline(folder, tmp_path):
    settings = CompareSettings(pipeline=str(folder), num_images=2, steps=2, runs=1, out=str(tmp_path / "out"),
                               feature_space="mini-features", step_callback=lambda pipe, i, t, kw: kw)
    with pytest.raises(ValueError, match="step_callback: DiTPipeline takes no callback_on_step_end"):
        run_compare(settings, parse_variants([QUANT]))
    assert not (tmp_path / "out").exists()


def test_a_text_to_image_variant_of_a_class_baseline_is_refused(folder):
    from genfast.quant.saving import load_pipeline

    settings = CompareSettings(pipeline=str(folder), num_images=2, steps=2)
    base = _ClassGenerator(load_pipeline(folder), ["red circle", "blue star"], settings)
    with pytest.raises(ValueError, match="the variant is a StableDiffusionPipeline, the baseline a class-conditional"):
        _variant_pipeline(pipeline_variant(asset_path(MINI)), base, settings, "cpu")


def test_a_lamamba_pipeline_compares_with_block_level_feature_inheritance(tmp_path):
    """LaMamba-Diff in a DiTPipeline (what genfast train-class writes): `genfast compare`'s defaults apply."""
    from genfast.backbones import LaMambaDiffModel, lamamba_config

    torch.manual_seed(0)
    model = LaMambaDiffModel(**lamamba_config("mini")).eval()
    wake_gates(model)
    make_pipeline(model).save_pretrained(tmp_path / "lamamba")
    out = tmp_path / "out"
    assert main(["compare", "--pipeline", str(tmp_path / "lamamba"), "--num-images", "2", "--batch-size", "2",
                 "--steps", str(STEPS), "--runs", "1", "--feature-space", "mini-features",
                 "--method", f"{QUANT}+feature_inheritance", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    _, chain = report["variants"]
    assert report["pipeline_class"] == "DiTPipeline" and set(chain["class_accuracy"]) == {"class", "shape", "color"}
    assert chain["latency"]["full_denoiser_calls"] == sum(uniform_schedule(STEPS, 3)) < STEPS
    assert chain["faithfulness"]["psnr"] < 100 and [f["reference"] for f in chain["fid"]] == ["baseline", "real"]
