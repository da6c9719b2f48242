"""The demo's Accelerate and Compare tabs, called as plain functions."""

import threading

import gradio as gr
import pytest
import torch
from demo_helpers import assert_own_image, direct, shrink

from genfast.demo.accelerate_tab import AccelerateTab
from genfast.demo.common import DemoModels, Jobs
from genfast.demo.compare_tab import CompareTab

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def models():
    return DemoModels(workers=2)


def _unet_state(models):
    with models.worker() as a, models.worker() as b:
        return [{k: v.clone() for k, v in p.unet.state_dict().items()} for p in (a, b)], [a, b]


def _assert_workers_clean(models, before):
    after, pipes = _unet_state(models)
    for b, a, pipe in zip(before, after, pipes, strict=True):
        assert b.keys() == a.keys() and all(torch.equal(b[k], a[k]) for k in b)
        assert not pipe.unet.__dict__.get("_genfast_handles")  # no method left on it
        assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks


def test_accelerate_images_and_numbers_match_genfast_outside_the_demo(models, mini_reference):
    tab = AccelerateTab(models, Jobs())
    base, fast, slider, table, numbers = tab.run(PROMPT, 3, 12, 5.0, "feature_inheritance:interval=3")
    assert (shrink(base) == direct(mini_reference, PROMPT, 3, 12, 5.0)).all()
    fi = direct(mini_reference, PROMPT, 3, 12, 5.0, [("feature_inheritance", {"interval": 3})])
    assert (shrink(fast) == fi).all()
    assert slider[0] is base and slider[1] is fast
    # uniform interval 3 over 12 calls: steps 0, 3, 6, 9 run in full
    assert numbers["accelerated"]["calls"] == 12 and numbers["accelerated"]["full_calls"] == 4
    assert numbers["baseline"]["full_calls"] == numbers["baseline"]["calls"] == 12
    from genfast.eval.faithfulness import faithfulness

    as_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    expected = faithfulness(as_t(fi), as_t(direct(mini_reference, PROMPT, 3, 12, 5.0)))
    assert numbers["psnr"] == pytest.approx(expected["psnr"], abs=1e-4)
    assert numbers["ssim"] == pytest.approx(expected["ssim"], abs=1e-4)
    assert numbers["speedup"] == pytest.approx(numbers["baseline"]["latency_s"] / numbers["accelerated"]["latency_s"])
    assert "PSNR" in table and "full / all" in table


def test_accelerate_runs_a_chain_and_leaves_the_worker_as_it_was(models, mini_reference):
    before, _ = _unet_state(models)
    tab = AccelerateTab(models, Jobs())
    _, fast, _, _, numbers = tab.run(PROMPT, 1, 6, 5.0, "quantize:weights=int8+feature_inheritance:interval=2")
    assert numbers["recipe"] == "quantize(weights=int8) + feature_inheritance(interval=2)"
    assert (shrink(fast) == direct(mini_reference, PROMPT, 1, 6, 5.0, [("quantize", {"weights": "int8"}),
                                                                  ("feature_inheritance", {"interval": 2})])).all()
    _assert_workers_clean(models, before)


@pytest.mark.parametrize("args, message", [
    (("", 0, 25, 5.0, "feature_inheritance"), "Type a prompt"),
    (("   ", 0, 25, 5.0, "feature_inheritance"), "Type a prompt"),
    ((PROMPT, 0, 0, 5.0, "feature_inheritance"), "Steps must be a whole number from 1 to 100"),
    ((PROMPT, 0, 101, 5.0, "feature_inheritance"), "Steps must be a whole number from 1 to 100"),
    ((PROMPT, 0, 2.5, 5.0, "feature_inheritance"), "Steps must be a whole number"),
    ((PROMPT, -1, 25, 5.0, "feature_inheritance"), "Seed must be a whole number"),
    ((PROMPT, 0, 25, -1.0, "feature_inheritance"), "Guidance must be a number from 0 to 20"),
    ((PROMPT, 0, 25, 5.0, ""), "Choose a method"),
    ((PROMPT, 0, 25, 5.0, "warp_drive"), "unknown method 'warp_drive'"),
    ((PROMPT, 0, 25, 5.0, "feature_inheritance:interval=0"), "interval"),
    ((PROMPT, 0, 25, 5.0, "feature_inheritance:interval=2,3"), "sweep of 2 variants"),
])
def test_accelerate_bad_input_is_a_clear_error(models, args, message):
    with pytest.raises(gr.Error) as err:
        AccelerateTab(models, Jobs()).run(*args)
    assert message in err.value.message


def test_cancel_stops_the_job_within_a_step_and_frees_a_clean_worker(models):
    before, _ = _unet_state(models)
    tab = AccelerateTab(models, Jobs())
    steps_seen = []

    def progress(value=None, desc=None):  # the Cancel button, pressed once the accelerated call has begun
        steps_seen.append(desc)
        if desc == "accelerated":
            tab.cancel()

    with pytest.raises(gr.Error, match="Cancelled"):
        tab.run(PROMPT, 0, 50, 5.0, "feature_inheritance", progress=progress)
    assert steps_seen.count("accelerated") == 1  # stopped at the step after the press
    _assert_workers_clean(models, before)


def test_concurrent_jobs_each_get_their_own_worker_and_correct_images(models, mini_reference):
    tab = AccelerateTab(models, Jobs())
    results, errors = {}, []

    def job(seed):
        try:
            results[seed] = tab.run(PROMPT, seed, 8, 5.0, "feature_inheritance:interval=2")
        except Exception as err:  # noqa: BLE001 -- reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=job, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    bases = {s: direct(mini_reference, PROMPT, s, 8, 5.0) for s in results}
    fasts = {s: direct(mini_reference, PROMPT, s, 8, 5.0, [("feature_inheritance", {"interval": 2})]) for s in results}
    for seed, (base, fast, *_) in results.items():
        assert_own_image(shrink(base), seed, bases)
        assert_own_image(shrink(fast), seed, fasts)


def test_compare_tab_writes_the_report_of_genfast_compare(models):
    table, pareto, grid, report = CompareTab(models, Jobs()).run("feature_inheritance:interval=2,3", 2, 6, 5.0)
    names = [row["name"] for row in report["variants"]]
    assert names == ["baseline", "feature_inheritance(interval=2)", "feature_inheritance(interval=3)"]
    assert report["num_images"] == 2 and report["steps"] == 6
    assert all(name in table for name in names)
    assert pareto.endswith("pareto.png") and grid.endswith("grid.png")
    from PIL import Image

    assert Image.open(pareto).size[0] > 0 and Image.open(grid).size[0] > 0


@pytest.mark.parametrize("args, message", [
    (("", 4, 25, 5.0), "at least one method"),
    (("feature_inheritance", 0, 25, 5.0), "Images must be a whole number from 2 to 16"),
    (("feature_inheritance", 4, 200, 5.0), "Steps must be"),
    (("feature_inheritance\nwarp_drive", 4, 25, 5.0), "unknown method 'warp_drive'"),
])
def test_compare_bad_input_is_a_clear_error(models, args, message):
    with pytest.raises(gr.Error) as err:
        CompareTab(models, Jobs()).run(*args)
    assert message in err.value.message


def test_compare_cancel_stops_the_run(models, monkeypatch):
    jobs = Jobs()
    pressed = threading.Event()
    pressed.set()  # Cancel pressed: the first denoising step stops the comparison
    monkeypatch.setattr(jobs, "start", lambda request, tab: pressed)
    with pytest.raises(gr.Error, match="Cancelled"):
        CompareTab(models, jobs).run("feature_inheritance", 2, 6, 5.0)


def test_cancel_reaches_the_calibration_call(models):
    before, _ = _unet_state(models)
    tab = AccelerateTab(models, Jobs())

    def progress(value=None, desc=None):  # Cancel pressed during feature inheritance's calibration call
        if desc == "calibrating":
            tab.cancel()

    with pytest.raises(gr.Error, match="Cancelled"):
        tab.run(PROMPT, 0, 30, 5.0, "feature_inheritance:schedule=calibrated", progress=progress)
    _assert_workers_clean(models, before)


def test_cancel_stops_every_job_of_its_session_and_tab_only(models):
    jobs = Jobs()
    first, second = jobs.start(None, "accelerate"), jobs.start(None, "accelerate")
    other_tab = jobs.start(None, "quantize")
    jobs.cancel(None, "accelerate")
    assert first.is_set() and second.is_set() and not other_tab.is_set()


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory, mini_reference):
    """genfast-mini saved int8-quantized: a --pipeline folder that loads with quantize already on its denoiser."""
    import genfast

    folder = tmp_path_factory.mktemp("q8") / "pipe"
    handle = genfast.quantize(mini_reference, genfast.QuantConfig(weights="int8"))
    try:
        genfast.save_quantized(mini_reference, folder)
    finally:
        handle.remove()
    return str(folder)


def test_workers_of_a_quantized_folder_share_all_but_their_denoiser_and_tokenizer(int8_folder):
    from genfast.api import handles_on

    models = DemoModels(int8_folder, workers=2)
    with models.worker() as a, models.worker() as b:
        assert a.unet is not b.unet and a.scheduler is not b.scheduler
        for name in ("text_encoder", "vae"):
            assert getattr(a, name) is getattr(b, name)
        # a tokenizer is not thread-safe (common.py): each worker has its own, the same vocabulary
        assert a.tokenizer is not b.tokenizer and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
        for pipe in (a, b):  # each copy's record describes its own denoiser and points at no copied pipeline
            record = handles_on(pipe.unet)["quantize"]
            assert record.target in (a, b) and record.model is pipe.unet


def test_a_method_already_on_the_pipeline_is_refused_by_name(int8_folder):
    tab = AccelerateTab(DemoModels(int8_folder, workers=1), Jobs())
    with pytest.raises(gr.Error, match="already has quantize on its denoiser"):
        tab.run(PROMPT, 0, 4, 5.0, "quantize:weights=int4")
