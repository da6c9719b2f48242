"""`genfast compare`: method specs, the cost meter, the report, clear errors, and accelerate launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import genfast
from genfast.cli import main
from genfast.eval.cost import measure_cost
from genfast.eval.variants import Variant, parse_method_spec, parse_method_specs, parse_value

# ---------------------------------------------------------------- --method specs


def test_method_spec_expands_every_combination_with_typed_values():
    variants = parse_method_spec("feature_inheritance:schedule=uniform,calibrated:interval=3,5")
    assert [v.options for v in variants] == [
        {"schedule": "uniform", "interval": 3}, {"schedule": "uniform", "interval": 5},
        {"schedule": "calibrated", "interval": 3}, {"schedule": "calibrated", "interval": 5},
    ]
    assert variants[0].name == "feature_inheritance(schedule=uniform, interval=3)"
    assert variants[0].slug == "feature_inheritance-schedule-uniform-interval-3"
    assert parse_method_spec("feature_inheritance") == [Variant("feature_inheritance", {})]
    assert parse_value("attn1+attn2") == ("attn1", "attn2")
    assert [parse_value(t) for t in ("2", "0.5", "true", "None", "layer")] == [2, 0.5, True, None, "layer"]


@pytest.mark.parametrize(("spec", "message"), [
    ("deepcache", "unknown method 'deepcache'; known methods: feature_inheritance"),
    ("feature_inheritance:intervl=2", "unknown option(s) 'intervl'"),
    ("feature_inheritance:interval=0", "interval must be an integer >= 1"),
    ("feature_inheritance:interval", "is not key=value"),
    ("feature_inheritance:interval=2:interval=3", "twice"),
    (":interval=2", "names no method"),
])
def test_bad_method_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError) as err:
        parse_method_spec(spec)
    assert message in str(err.value)


def test_the_same_variant_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        parse_method_specs(["feature_inheritance:interval=2,3", "feature_inheritance:interval=3"])


# ---------------------------------------------------------------- cost


@pytest.fixture(scope="module")
def mini_pipe():
    pipe = genfast.load_mini()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_cost_counts_denoiser_calls_and_full_steps(mini_pipe):
    def call():
        return mini_pipe("a red circle", num_inference_steps=10, guidance_scale=5.0, output_type="pt",
                         generator=torch.Generator().manual_seed(0)).images

    base, base_out = measure_cost(mini_pipe, call, runs=2)
    assert base.runs == 2 and len(base.call_s_all) == 2
    assert base.denoiser_calls == base.full_denoiser_calls == 10  # CFG batches both halves into one call
    assert 0 < base.loop_s < base.call_s
    with genfast.accelerate(mini_pipe, "feature_inheritance", interval=3) as handle:
        fast, fast_out = measure_cost(mini_pipe, call, runs=1, handle=handle)
    assert fast.denoiser_calls == 10 and fast.full_denoiser_calls == 4  # steps 0, 3, 6, 9
    assert base_out.shape == fast_out.shape and not torch.equal(base_out, fast_out)
    with pytest.raises(ValueError, match="runs"):
        measure_cost(mini_pipe, call, runs=0)


# ---------------------------------------------------------------- the whole command

ALL_FULL = "feature_inheritance:schedule=list:full_steps=0+1+2+3+4+5"  # reuses nothing: equals the baseline
SMALL = ["--num-images", "4", "--batch-size", "2", "--steps", "6", "--runs", "1"]


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    code = main(["compare", *SMALL, "--method", "feature_inheritance:interval=2", "--method", ALL_FULL,
                 "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_has_every_figure_per_variant(small_report):
    _, report = small_report
    assert [r["name"] for r in report["variants"]] == [
        "baseline", "feature_inheritance(interval=2)",
        "feature_inheritance(schedule=list, full_steps=0+1+2+3+4+5)"]
    assert report["feature_space"] == "mini-features" and report["num_images"] == 4
    for row in report["variants"]:
        assert row["speedup"] > 0 and row["latency"]["call_s"] > 0 and row["latency"]["denoiser_calls"] == 6
        assert {f["name"] for f in row["fid"]} <= {"FID[mini-features]"} and row["fid"]
        assert set(row["faithfulness"]) == {"psnr", "ssim", "lpips"}
        assert set(row["prompt_accuracy"]) >= {"shape", "color"}
    base, fast, full = report["variants"]
    assert base["faithfulness"]["psnr"] == 100.0 and base["faithfulness"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert [f["reference"] for f in base["fid"]] == ["real"]
    assert fast["latency"]["full_denoiser_calls"] == 3 and fast["faithfulness"]["psnr"] < 60
    # reusing nothing must reproduce the baseline's images exactly, so its FID to them is ~0
    assert full["faithfulness"]["psnr"] == 100.0 and full["latency"]["full_denoiser_calls"] == 6
    # (4 images: a rank-3 covariance, so the matrix square root leaves ~1e-3 of numerical noise)
    fid_to_base = {r["name"]: next(f["value"] for f in r["fid"] if f["reference"] == "baseline")
                   for r in (fast, full)}
    assert abs(fid_to_base[full["name"]]) < 1e-2 and fid_to_base[fast["name"]] > 1.0
    if not report["lpips"]["available"]:  # this machine has no AlexNet weights: no number, a reason instead
        assert base["faithfulness"]["lpips"] is None and "alexnet" in report["lpips"]["note"]


def test_report_files(small_report):
    out, _ = small_report
    md = (out / "report.md").read_text()
    assert "| feature_inheritance(interval=2) |" in md and "FID[mini-features] vs real" in md
    assert "genfast compare --num-images 4" in md
    for name in ("grid.png", "pareto.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    for v in ("baseline", "feature_inheritance-interval-2", "real"):
        assert len(list((out / "images" / v).glob("*.png"))) == 4
    saved = np.asarray(Image.open(out / "images" / "baseline" / "00000.png"))
    assert saved.shape == (64, 64, 3)


def _run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--pipeline", "no/such/folder"], "no diffusers pipeline at no/such/folder"),
    (["--method", "deepcache"], "unknown method 'deepcache'"),
    (["--method", "feature_inheritance:speed=9"], "unknown option(s) 'speed'"),
    (["--feature-space", "inception", "--inception-weights", "/nowhere/inception-2015-12-05.pt"],
     "/nowhere/inception-2015-12-05.pt does not exist"),
])
def test_bad_input_is_one_clear_line(args, message, capsys, tmp_path):
    code, err = _run_cli(["compare", *SMALL, "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("genfast compare: error:")
    assert not (tmp_path / "out").exists()  # nothing was written


def test_empty_prompts_file_and_zero_images(capsys, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    code, err = _run_cli(["compare", "--prompts", str(empty), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "has no prompts" in err
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--num-images", "0"])
    assert exc.value.code == 2 and "--num-images must be > 0, got 0" in capsys.readouterr().err


def test_prompts_file_is_cycled(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue star\n")
    out = tmp_path / "out"
    assert main(["compare", *SMALL, "--prompts", str(prompts), "--method",
                 "feature_inheritance:schedule=calibrated:interval=3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == "2 prompt(s) from a file, cycled to 4"
    # calibrated on the first batch before anything is generated or timed: 2 full calls of 6 in every timed run
    assert report["variants"][1]["latency"]["full_denoiser_calls"] == 2
    assert not (out / "images" / "real").exists()  # no real images for prompts of the user's
    assert all(f["reference"] == "baseline" for f in report["variants"][1]["fid"])


# ---------------------------------------------------------------- accelerate launch


def _numbers(report: dict) -> dict:
    """Every figure of a report except timings and memory, flattened to {path: value}."""

    def flat(prefix, value):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(f"{prefix}.{key}", item).items()}
        if isinstance(value, list):
            return {k: v for i, item in enumerate(value) for k, v in flat(f"{prefix}[{i}]", item).items()}
        return {prefix: value}

    return flat("", [{"name": r["name"], "fid": r["fid"], "faithfulness": r["faithfulness"],
                      "prompt_accuracy": r["prompt_accuracy"], "calls": r["latency"]["denoiser_calls"],
                      "full": r["latency"]["full_denoiser_calls"]} for r in report["variants"]])


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed beside this Python")
def test_accelerate_launch_gives_the_same_report(tmp_path):
    args = ["-m", "genfast", "compare", *SMALL, "--method", "feature_inheritance:interval=2", "--method", ALL_FULL]
    # one CPU thread per process in both runs: torch's float rounding depends on the thread count
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA genfast runs it as multi-CPU
    runs = {1: [sys.executable, *args],
            2: [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *args]}
    reports = {}
    for n, cmd in runs.items():
        proc = subprocess.run([*cmd, "--out", str(tmp_path / str(n))], capture_output=True, text=True, env=env,
                              timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[n] = json.loads((tmp_path / str(n) / "report.json").read_text())
        assert reports[n]["processes"] == n
    one, two = _numbers(reports[1]), _numbers(reports[2])
    assert one.keys() == two.keys()
    numeric = [k for k, v in one.items() if isinstance(v, float)]
    assert {k: v for k, v in two.items() if k not in numeric} == {k: v for k, v in one.items() if k not in numeric}
    assert [two[k] for k in numeric] == pytest.approx([one[k] for k in numeric], rel=1e-6, abs=1e-6)
    for v in ("baseline", "feature_inheritance-interval-2"):
        files = sorted((tmp_path / "1" / "images" / v).glob("*.png"))
        assert len(files) == 4
        for f in files:
            assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "2" / "images" / v / f.name)))


def test_any_local_pipeline_folder(tmp_path):
    from tiny_pipelines import build

    build("sd").save_pretrained(tmp_path / "sd")
    out = tmp_path / "out"
    assert main(["compare", *SMALL, "--pipeline", str(tmp_path / "sd"), "--method", "feature_inheritance:interval=2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline_class"] == "StableDiffusionPipeline" and report["prompt_accuracy"] is None
    assert [r["prompt_accuracy"] for r in report["variants"]] == [None, None]  # the evaluator judges shapes only
    assert report["variants"][1]["latency"]["full_denoiser_calls"] == 3
    assert (out / "grid.png").is_file() and (out / "pareto.png").is_file()
