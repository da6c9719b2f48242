"""`genfast compare`: variant recipes (method, chain, pipeline folder), the cost meter, the report,
work done once per run, clear errors, and accelerate launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import genfast
from genfast import api
from genfast.cli import main
from genfast.eval import cost as cost_module
from genfast.eval import fid as fid_module
from genfast.eval import report as report_module
from genfast.eval.compare import _to_uint8, apply_recipe, default_prompts, remove_recipe
from genfast.eval.cost import measure_cost
from genfast.eval.variants import (
    Step,
    Variant,
    parse_method_spec,
    parse_value,
    parse_variants,
    pipeline_variant,
)
from genfast.methods.feature_inheritance import FeatureInheritanceConfig, uniform_schedule
from genfast.models import MINI, asset_path
from genfast.pipelines import denoiser_of

# ---------------------------------------------------------------- --method specs


def test_method_spec_expands_every_combination_with_typed_values():
    variants = parse_method_spec("feature_inheritance:schedule=uniform,calibrated:interval=3,5")
    assert [v.steps[0].options for v in variants] == [
        {"schedule": "uniform", "interval": 3}, {"schedule": "uniform", "interval": 5},
        {"schedule": "calibrated", "interval": 3}, {"schedule": "calibrated", "interval": 5},
    ]
    assert {v.kind for v in variants} == {"method"}
    assert variants[0].name == "feature_inheritance(schedule=uniform, interval=3)"
    assert variants[0].slug == "feature_inheritance-schedule-uniform-interval-3"
    assert parse_method_spec("feature_inheritance") == [Variant((Step("feature_inheritance"),))]
    assert parse_value("attn1+attn2") == ("attn1", "attn2")
    assert [parse_value(t) for t in ("2", "0.5", "true", "None", "layer")] == [2, 0.5, True, None, "layer"]


def test_chain_spec_splits_at_method_names_and_expands_sweeps_as_the_product():
    chains = parse_method_spec("quantize:weights=int8,int4+feature_inheritance:interval=2,5")
    assert [[(s.method, s.options) for s in v.steps] for v in chains] == [
        [("quantize", {"weights": w}), ("feature_inheritance", {"interval": k})]
        for w in ("int8", "int4") for k in (2, 5)
    ]
    assert {v.kind for v in chains} == {"chain"}
    assert chains[0].name == "quantize(weights=int8) + feature_inheritance(interval=2)"
    # a "+" not followed by a method name joins a tuple value, in a chain as on its own
    (chain,) = parse_method_spec("quantize+feature_inheritance:branch_units=attn1+attn2")
    assert [s.method for s in chain.steps] == ["quantize", "feature_inheritance"]
    assert chain.steps[1].options == {"branch_units": ("attn1", "attn2")}
    # an option value holding ":" (group granularity), swept
    grouped = parse_method_spec("quantize:granularity=group:8,group:16+feature_inheritance")
    assert [v.steps[0].options["granularity"] for v in grouped] == ["group:8", "group:16"]


@pytest.mark.parametrize(("spec", "message"), [
    ("deepcache", "unknown method 'deepcache'; known methods: feature_inheritance, gri_attention, multi_unet, quantize"),
    ("feature_inheritance:intervl=2", "unknown option(s) 'intervl'"),
    ("feature_inheritance:interval=0", "interval must be an integer >= 1"),
    ("feature_inheritance:interval", "is not key=value"),
    ("feature_inheritance:interval=2:interval=3", "twice"),
    (":interval=2", "names no method"),
    ("quantize:weights=int9", "weights must be one of"),
    ("quantize+deepcache:interval=2", "unknown method 'deepcache'"),
    ("quantize:weights=int8+deepcache", "a '+' starts the next method only before a registered method"),
    ("quantize+feature_inheritance+quantize:weights=int4", "applies quantize twice in one chain"),
])
def test_bad_method_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError) as err:
        parse_method_spec(spec)
    assert message in str(err.value)


def test_variants_doing_the_same_work_are_refused_naming_both(tmp_path):
    default = FeatureInheritanceConfig().interval
    with pytest.raises(ValueError) as err:
        parse_variants(["feature_inheritance", f"feature_inheritance:interval={default}"])
    assert f"feature_inheritance and feature_inheritance(interval={default}) do the same work" in str(err.value)
    with pytest.raises(ValueError, match="asked for twice"):
        parse_variants(["feature_inheritance:interval=2,3", "feature_inheritance:interval=3"])
    with pytest.raises(ValueError, match="do the same work"):  # a chain swept into a row that exists
        parse_variants(["quantize:weights=int8+feature_inheritance:interval=2",
                        "quantize+feature_inheritance:interval=2,4"])
    shutil.copytree(asset_path(MINI), tmp_path / "mini")
    with pytest.raises(ValueError, match="the same folder"):
        parse_variants([], [tmp_path / "mini", f"{tmp_path}/mini/"])
    # different work, all kinds: accepted, in the order given
    variants = parse_variants(["feature_inheritance:interval=2", "quantize+feature_inheritance:interval=2"],
                              [tmp_path / "mini"])
    assert [v.kind for v in variants] == ["method", "chain", "pipeline"]


def test_pipeline_variant_must_be_a_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline_variant(tmp_path)
    assert pipeline_variant(asset_path(MINI)) == Variant(folder=str(asset_path(MINI)))


# ---------------------------------------------------------------- recipes on a pipeline


@pytest.fixture(scope="module")
def tiny_sd():
    from tiny_pipelines import build

    pipe = build("sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_call(pipe, steps=6):
    return lambda: pipe(["a red circle", "a blue star"], num_inference_steps=steps, guidance_scale=5.0,
                        output_type="pt", generator=[torch.Generator().manual_seed(i) for i in range(2)]).images


@dataclass
class ProbeConfig:
    fail: bool = False


PROBE_SEEN: list = []  # what each probe preparation saw


class _ProbeHandle(api.Handle):
    def prepare(self, **call_kwargs):
        # what is on the denoiser when this method prepares, and whether it got a pipeline call's arguments
        PROBE_SEEN.append((sorted(api.handles_on(denoiser_of(self.target))), sorted(call_kwargs)))
        if self.config.fail:
            raise RuntimeError("probe preparation failed")


@pytest.fixture
def probe_method():
    """A test-only method that changes nothing and records its preparation."""

    @api.register_method("probe", ProbeConfig, "test-only: records prepare()")
    def apply(pipe, config):
        return _ProbeHandle(pipe, "probe", config, lambda: None, modules=[denoiser_of(pipe)])

    PROBE_SEEN.clear()
    yield
    del api._METHODS["probe"]


def test_chain_prepares_after_the_whole_chain_is_on_and_comes_off_in_reverse(tiny_sd, probe_method):
    call = _tiny_call(tiny_sd)
    untouched = call()
    (chain,) = parse_method_spec("probe+quantize:weights=int4")
    kwargs = {"prompt": ["a red circle"], "num_inference_steps": 2}
    handles = apply_recipe(tiny_sd, chain, kwargs)
    assert [h.method for h in handles] == ["probe", "quantize"]
    assert PROBE_SEEN == [(["probe", "quantize"], ["num_inference_steps", "prompt"])]
    changed = call()
    remove_recipe(handles)
    assert all(h.removed for h in handles) and api.handles_on(denoiser_of(tiny_sd)) == {}
    assert not torch.equal(changed, untouched) and torch.equal(call(), untouched)


def test_a_failed_preparation_still_removes_the_chain(tiny_sd, probe_method):
    call = _tiny_call(tiny_sd)
    untouched = call()
    (chain,) = parse_method_spec("quantize:weights=int4+probe:fail=true")
    with pytest.raises(RuntimeError, match="probe preparation failed"):
        apply_recipe(tiny_sd, chain, {"prompt": ["a red circle"]})
    assert api.handles_on(denoiser_of(tiny_sd)) == {}
    assert torch.equal(call(), untouched)  # the quantized weights were put back


# ---------------------------------------------------------------- cost


def test_cost_counts_denoiser_calls_and_full_steps(tiny_sd):
    call = _tiny_call(tiny_sd, steps=10)
    base, base_out = measure_cost(tiny_sd, call, runs=2)
    assert base.runs == 2 and len(base.call_s_all) == len(base.loop_s_all) == 2
    assert base.denoiser_calls == base.full_denoiser_calls == 10  # CFG batches both halves into one call
    with genfast.accelerate(tiny_sd, "feature_inheritance", interval=3) as fi, \
            genfast.quantize(tiny_sd, weights="int8") as q:
        # the counter is found on whichever handle of a chain keeps one
        fast, fast_out = measure_cost(tiny_sd, call, runs=1, handles=[q, fi])
    assert fast.denoiser_calls == 10 and fast.full_denoiser_calls == sum(uniform_schedule(10, 3))
    assert base_out.shape == fast_out.shape and not torch.equal(base_out, fast_out)
    with pytest.raises(ValueError, match="runs"):
        measure_cost(tiny_sd, call, runs=0)


def test_peak_memory_is_taken_in_an_untimed_call_of_its_own(tiny_sd, monkeypatch):
    active = threading.Event()
    calls = []

    class Recording(cost_module._PeakMemory):
        def __enter__(self):
            active.set()
            return super().__enter__()

        def __exit__(self, *exc):
            super().__exit__(*exc)
            active.clear()

    monkeypatch.setattr(cost_module, "_PeakMemory", Recording)
    pipe_call = _tiny_call(tiny_sd, steps=2)

    def call():
        calls.append(active.is_set())
        return len(calls), pipe_call()

    cost, (index, _) = measure_cost(tiny_sd, call, runs=3)
    assert calls == [False, False, False, True]  # three timed calls unwatched, then one watched
    assert index == 3  # the output is a timed call's
    assert cost.peak_memory_kind == "sampled RSS increase" and cost.peak_memory_mb is not None


# ---------------------------------------------------------------- the whole command

SMALL = ["--num-images", "4", "--batch-size", "2", "--steps", "6", "--runs", "1"]
ALL_FULL = "feature_inheritance:schedule=list:full_steps=0+1+2+3+4+5"  # reuses nothing: equals the baseline
CHAIN = "quantize:weights=int8+feature_inheritance:interval=2"


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory):
    """One run with a method row, a chain row, a pipeline-folder row (a byte copy of genfast-mini) and a
    method row that reuses nothing; counts what was built and computed while it ran."""
    root = tmp_path_factory.mktemp("compare")
    folder = shutil.copytree(asset_path(MINI), root / "mini-copy")
    out = root / "out"
    counts = {"extractors": 0, "evaluators": 0, "features": []}
    patch = pytest.MonkeyPatch()

    class CountedExtractor(fid_module.MiniFeatureExtractor):
        def __init__(self, *args, **kwargs):
            counts["extractors"] += 1
            super().__init__(*args, **kwargs)

    import genfast.models

    load_evaluator = genfast.models.load_evaluator

    def counted_load_evaluator(*args, **kwargs):
        counts["evaluators"] += 1
        return load_evaluator(*args, **kwargs)

    get_folder_features = fid_module.cfid.get_folder_features

    def counted_features(fdir, *args, **kwargs):
        counts["features"].append(os.path.basename(fdir))
        return get_folder_features(fdir, *args, **kwargs)

    drawn = {}

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            drawn[name] = args
            return fn(*args, **kwargs)

        return wrapped

    patch.setattr(fid_module, "MiniFeatureExtractor", CountedExtractor)
    patch.setattr(genfast.models, "load_evaluator", counted_load_evaluator)
    patch.setattr(fid_module.cfid, "get_folder_features", counted_features)
    patch.setattr(report_module, "save_comparison_grid", recording("grid", report_module.save_comparison_grid))
    patch.setattr(report_module, "save_pareto", recording("pareto", report_module.save_pareto))
    try:
        code = main(["compare", *SMALL, "--method", "feature_inheritance:interval=2", "--method", CHAIN,
                     "--pipeline-variant", str(folder), "--method", ALL_FULL, "--out", str(out)])
    finally:
        patch.undo()
    assert code == 0
    return out, json.loads((out / "report.json").read_text()), counts, drawn, folder


def _fid(row, reference):
    return next((f["value"] for f in row["fid"] if f["reference"] == reference), None)


def _pngs(folder):
    return [np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))]


def test_one_report_holds_every_kind_of_variant(mixed_report):
    out, report, _, drawn, folder = mixed_report
    names = ["baseline", "feature_inheritance(interval=2)", "quantize(weights=int8) + feature_inheritance(interval=2)",
             "feature_inheritance(schedule=list, full_steps=0+1+2+3+4+5)", f"pipeline({folder})"]
    # method specs first, then folders, each in the order given
    assert [r["name"] for r in report["variants"]] == names
    assert [r["kind"] for r in report["variants"]] == ["baseline", "method", "chain", "method", "pipeline"]
    assert report["variants"][2]["recipe"] == [{"method": "quantize", "options": {"weights": "int8"}},
                                               {"method": "feature_inheritance", "options": {"interval": 2}}]
    assert report["variants"][4]["pipeline"] == str(folder) and report["variants"][4]["recipe"] == []
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in names)
    assert list(drawn["grid"][0]) == names  # one grid row per variant, labelled with its name
    # every variant is a point on both panels (PSNR, FID to the real images), under a label of its own
    for panel, with_baseline in zip(drawn["pareto"][0], (False, True)):
        labels = [label for label, _, _ in panel["points"]]
        assert len(labels) == len(set(labels)) == 4 + with_baseline
        assert names[2] in labels and names[4] in labels and ("baseline" in labels) == with_baseline
    for v in ("baseline", "feature_inheritance-interval-2", "real"):
        assert len(list((out / "images" / v).glob("*.png"))) == 4


def test_the_baseline_is_perfectly_faithful_to_itself(mixed_report):
    _, report, _, _, _ = mixed_report
    base = report["variants"][0]
    # PSNR is capped at 100 dB; SSIM is computed in float32, whose rounding leaves ~1e-6 on equal images
    assert base["faithfulness"]["psnr"] == 100.0 and base["faithfulness"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert base["latency"]["denoiser_calls"] == base["latency"]["full_denoiser_calls"] == 6
    assert [f["reference"] for f in base["fid"]] == ["real"]  # no FID of the baseline against itself


def test_a_byte_copy_of_the_baseline_folder_gives_the_baselines_images(mixed_report):
    out, report, _, _, folder = mixed_report
    base, copy = report["variants"][0], report["variants"][4]
    slug = Variant(folder=str(folder)).slug
    assert all(np.array_equal(a, b) for a, b in zip(_pngs(out / "images" / "baseline"), _pngs(out / "images" / slug)))
    assert copy["faithfulness"]["psnr"] == 100.0
    # same images, same features: its FID to real equals the baseline's exactly; to the baseline it is
    # 0 up to the matrix square root of a rank-3 covariance (4 images), which leaves ~1e-3
    assert _fid(copy, "real") == _fid(base, "real")
    assert abs(_fid(copy, "baseline")) < 1e-2


def test_reusing_nothing_reproduces_the_baseline_and_skipping_does_not(mixed_report):
    _, report, _, _, _ = mixed_report
    fast, full = report["variants"][1], report["variants"][3]
    assert full["faithfulness"]["psnr"] == 100.0 and full["latency"]["full_denoiser_calls"] == 6
    assert abs(_fid(full, "baseline")) < 1e-2
    assert fast["latency"]["full_denoiser_calls"] == sum(uniform_schedule(6, 2))
    assert fast["faithfulness"]["psnr"] < 60 and _fid(fast, "baseline") > 1.0


def test_a_chain_row_equals_applying_the_methods_by_hand(mixed_report):
    out, report, _, _, _ = mixed_report
    pipe = genfast.load_mini()
    pipe.set_progress_bar_config(disable=True)
    prompts = default_prompts(4)
    images = []
    with genfast.quantize(pipe, genfast.QuantConfig(weights="int8")), \
            genfast.accelerate(pipe, "feature_inheritance", interval=2):
        for batch in ([0, 1], [2, 3]):  # the run's batches: --batch-size 2, image i has seed i
            images.append(pipe([prompts[i] for i in batch], num_inference_steps=6, guidance_scale=5.0,
                               generator=[torch.Generator().manual_seed(i) for i in batch], output_type="pt").images)
    by_hand = _to_uint8(torch.cat(images)).permute(0, 2, 3, 1).numpy()
    slug = "quantize-weights-int8-feature_inheritance-interval-2"
    saved = _pngs(out / "images" / slug)
    assert len(saved) == 4 and all(np.array_equal(a, b) for a, b in zip(by_hand, saved))
    chain = report["variants"][2]
    assert chain["latency"]["full_denoiser_calls"] == sum(uniform_schedule(6, 2))
    assert chain["faithfulness"]["psnr"] < 100.0  # quantized: not the baseline


def test_the_feature_network_and_reference_features_are_built_once_per_run(mixed_report):
    out, report, counts, _, _ = mixed_report
    assert counts["extractors"] == 1
    assert counts["evaluators"] == 1  # mini-features is the evaluator's embedding: one network for both
    # every image folder's features exactly once (baseline, real images, each variant), though the
    # baseline's and the real images' features enter 4 and 5 FIDs
    assert sorted(counts["features"]) == sorted(os.listdir(out / "images"))
    assert {"baseline", "real"} <= set(counts["features"])
    assert sum(len(r["fid"]) for r in report["variants"]) == 2 * len(report["variants"]) - 1


def test_a_pipeline_variant_must_make_images_like_the_baselines(tmp_path, capsys):
    from tiny_pipelines import build

    build("sd").save_pretrained(tmp_path / "sd")  # 32x32 images; genfast-mini makes 64x64
    code = main(["compare", "--num-images", "2", "--batch-size", "2", "--steps", "2", "--runs", "1",
                 "--pipeline", str(tmp_path / "sd"), "--pipeline-variant", str(asset_path(MINI)),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "makes images of shape (3, 64, 64), the baseline (3, 32, 32)" in err
    assert not (tmp_path / "out" / "report.json").exists()


def _run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--pipeline", "no/such/folder"], "no diffusers pipeline at no/such/folder"),
    (["--pipeline-variant", "no/such/folder"], "--pipeline-variant no/such/folder: no diffusers pipeline there"),
    (["--method", "deepcache"], "unknown method 'deepcache'"),
    (["--method", "feature_inheritance:speed=9"], "unknown option(s) 'speed'"),
    (["--method", "quantize+feature_inheritance+quantize"], "applies quantize twice"),
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


def test_prompts_file_is_cycled_and_a_calibrated_method_prepares(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue star\n")
    out = tmp_path / "out"
    assert main(["compare", *SMALL, "--prompts", str(prompts), "--method",
                 "feature_inheritance:schedule=calibrated:interval=3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == "2 prompt(s) from a file, cycled to 4"
    # prepared (calibrated) on the first batch before anything is generated or timed: every timed call
    # runs the calibrated schedule, as many full calls as interval 3 gives at 6 steps
    assert report["variants"][1]["latency"]["full_denoiser_calls"] == sum(uniform_schedule(6, 3))
    assert not (out / "images" / "real").exists()  # no real images for prompts of the user's
    assert all(f["reference"] == "baseline" for f in report["variants"][1]["fid"])


def test_any_local_pipeline_folder(tmp_path):
    from tiny_pipelines import build

    build("sd").save_pretrained(tmp_path / "sd")
    out = tmp_path / "out"
    assert main(["compare", *SMALL, "--pipeline", str(tmp_path / "sd"), "--method", "feature_inheritance:interval=2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline_class"] == "StableDiffusionPipeline" and report["prompt_accuracy"] is None
    assert [r["prompt_accuracy"] for r in report["variants"]] == [None, None]  # the evaluator judges shapes only
    assert report["variants"][1]["latency"]["full_denoiser_calls"] == sum(uniform_schedule(6, 2))
    assert (out / "grid.png").is_file() and (out / "pareto.png").is_file()


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
    args = ["-m", "genfast", "compare", *SMALL, "--method", "feature_inheritance:interval=2",
            "--pipeline-variant", str(asset_path(MINI))]
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
    for v in ("baseline", "feature_inheritance-interval-2", Variant(folder=str(asset_path(MINI))).slug):
        files = sorted((tmp_path / "1" / "images" / v).glob("*.png"))
        assert len(files) == 4
        for f in files:
            assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "2" / "images" / v / f.name)))
