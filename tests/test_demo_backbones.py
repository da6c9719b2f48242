"""The demo's Backbones tab, its handler called as a function on tiny random-weight DiTPipeline folders (a
ClassDiT, a LaMambaDiffModel and an AsCANModel, saved in fp16 as `genfast train-class --half` writes them):
each image is the pipeline's own for that label and seed, the FLOPs are count_flops's, missing folders are
named with the command that builds them, Cancel stops a run (also one sharing a model with another
session's, which goes on), two sessions on one model each get their own image, and bad input gets a gr.Error."""

import shlex
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from demo_helpers import shrink

from genfast.backbones import AsCANModel, LaMambaDiffModel, build_on_meta, count_flops, count_params, lamamba_config
from genfast.demo.backbones_tab import Backbone, BackbonesTab, default_backbones
from genfast.demo.common import DemoModels, Jobs
from genfast.pipelines.class_conditional import ClassDiT, dit_config, label_ids

pytestmark = pytest.mark.usefixtures("one_thread")

LABEL, SEED, STEPS = "blue star", 7, 3
NAMES = ("DiT", "LaMamba-Diff", "AsCAN")


def _tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "DiT":
        model = ClassDiT(**dit_config(20_000))
    elif name == "LaMamba-Diff":
        model = LaMambaDiffModel(sample_size=16, in_channels=4, out_channels=8, num_classes=24, dims=[8, 16, 16, 16],
                                 depths=[1, 1, 1, 1], bottleneck_depth=1, num_heads=2, window_size=4)
    else:
        model = AsCANModel(block_out_channels=[8, 16, 16], down_layouts=["C", "CT", "T"], mid_layout="T",
                           num_attention_heads=2, norm_num_groups=4, num_classes=24)
    with torch.no_grad():  # wake the zero-initialised modulation, so label and noise reach the image
        for key, p in model.named_parameters():
            if "adaLN" in key:
                p.normal_(std=0.1)
    return model.eval()


def tiny_backbones(root: Path, names=NAMES) -> list[Backbone]:
    """Tiny DiTPipeline folders under `root`, written as `genfast train-class --half` writes its output."""
    from genfast.pipelines.class_conditional import mini_vae
    from genfast.training.class_cond import save_class_pipeline

    vae = mini_vae()
    out = []
    for name in names:
        folder = root / name
        save_class_pipeline(_tiny(name), folder, vae=vae, half=True)
        out.append(Backbone(name, folder, f"genfast train-class --model dit --out {folder} --half"))
    return out


def direct_pipeline(folder):
    """The folder loaded plainly with diffusers, outside the demo."""
    from diffusers import DiTPipeline

    import genfast.backbones  # noqa: F401 -- the denoisers' classes, for diffusers to find

    pipe = DiTPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct(pipe, label: str, seed: int, steps: int, guidance: float) -> np.ndarray:
    """HWC uint8 image of a DiTPipeline for one class name and seed."""
    out = pipe(label_ids(pipe, label), guidance_scale=guidance, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="pt").images[0]
    return (out.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    return tiny_backbones(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="module")
def plain(backbones):
    return {b.name: direct_pipeline(b.folder) for b in backbones}


@pytest.fixture(scope="module")
def models(backbones):
    models = DemoModels(workers=1)
    models.class_pipelines = backbones
    return models


@pytest.fixture(scope="module")
def tab(models):
    return BackbonesTab(models, Jobs())


def run(tab, label=LABEL, seed=SEED, steps=STEPS, guidance=4.0, request=None, progress=lambda *a, **k: None):
    return tab.run(label, seed, steps, guidance, request=request, progress=progress)


@pytest.mark.parametrize("guidance, samples", [(4.0, 2), (1.0, 1)])  # DiTPipeline batches the null class if > 1
def test_each_image_is_its_pipeline_s_own_and_the_flops_are_count_flops_s(tab, plain, guidance, samples):
    gallery, table, n = run(tab, guidance=guidance)
    assert [caption.split(":")[0] for _, caption in gallery] == list(NAMES)
    for (image, _), row in zip(gallery, n["models"], strict=True):
        pipe = plain[row["name"]]
        assert (shrink(image) == direct(pipe, LABEL, SEED, STEPS, guidance)).all(), row["name"]
        flops = count_flops(pipe.transformer)
        assert row["gflops_per_forward"] == flops and row["parameters"] == count_params(pipe.transformer)
        assert row["gflops_per_image"] == pytest.approx(flops * samples * STEPS)
        assert row["denoiser_calls"] == STEPS  # one call per step, the null class in the same batch
        assert f"{row['gflops_per_image']:.3g}" in table
    assert n["forwards_per_image"] == samples * STEPS and n["missing"] == []


def test_the_images_differ_by_label_and_by_model(tab):
    red = [np.asarray(image) for image, _ in run(tab, label="red circle")[0]]
    star = [np.asarray(image) for image, _ in run(tab)[0]]
    assert not any(np.array_equal(a, b) for a, b in zip(red, star, strict=True))
    assert not np.array_equal(star[0], star[1]) and not np.array_equal(star[1], star[2])


def test_missing_folders_are_named_with_their_build_command_and_the_others_run(models, backbones, plain, tmp_path,
                                                                               monkeypatch):
    gone = Backbone("AsCAN", tmp_path / "genfast-ascan-class",
                    f"genfast train-class --model ascan-mini --out {tmp_path / 'genfast-ascan-class'} --half")
    monkeypatch.setattr(models, "class_pipelines", [backbones[0], gone])
    tab = BackbonesTab(models, Jobs())
    gallery, table, n = run(tab)
    assert len(gallery) == 1 and (shrink(gallery[0][0]) == direct(plain["DiT"], LABEL, SEED, STEPS, 4.0)).all()
    assert n["missing"] == [{"name": "AsCAN", "folder": str(gone.folder), "command": gone.command}]
    assert gone.command in table and "Not built yet" in table
    assert "Found: DiT." in tab.status() and gone.command in tab.status()


def test_no_folder_at_all_is_a_clear_error(models, tmp_path, monkeypatch):
    gone = [Backbone(name, tmp_path / name, f"genfast train-class --model {name.lower()} --out {tmp_path / name}")
            for name in NAMES]
    monkeypatch.setattr(models, "class_pipelines", gone)
    with pytest.raises(gr.Error, match="No class-conditional backbone is built yet") as err:
        run(BackbonesTab(models, Jobs()))
    assert all(b.command in str(err.value) for b in gone)


def test_the_default_build_commands_are_genfast_train_class_commands(monkeypatch, tmp_path):
    """The tab names each missing folder's rebuild command (genfast.models), which `make train-backbones` runs."""
    from genfast import models as genfast_models
    from genfast.cli import build_parser

    monkeypatch.setattr(genfast_models, "ASSETS", tmp_path)
    defaults = default_backbones()
    assert [b.name for b in defaults] == list(NAMES)
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    for backbone, spec in zip(defaults, ("dit", "lamamba-mini", "ascan-mini"), strict=True):
        args = build_parser().parse_args(shlex.split(backbone.command)[1:])  # argparse exits on an unknown option
        assert args.func.__name__ == "cmd_train_class" and args.model == spec and args.half
        assert Path(args.out) == backbone.folder == tmp_path / f"genfast-{backbone.name.split('-')[0].lower()}-class"
        # the same command as `make train-backbones` runs, but writing where the tab looks (ASSETS)
        in_repo = backbone.command.replace(f"--out {tmp_path}/", "--out assets/")
        assert f"$(VENV)/bin/{in_repo}\n" in makefile
    lamamba_mini = count_params(build_on_meta(LaMambaDiffModel, **lamamba_config("mini")))
    assert build_parser().parse_args(shlex.split(defaults[0].command)[1:]).params == lamamba_mini  # equal sizes


@pytest.mark.parametrize("press_at", [("loading LaMamba-Diff", None), ("LaMamba-Diff", 2)])
def test_cancel_stops_the_run_between_models_and_within_a_model(tab, backbones, plain, press_at):
    def progress(value=None, desc=None, **kw):  # the Cancel button, pressed while loading or at a step
        if (desc, value and value[0]) == press_at:
            tab.cancel()

    with pytest.raises(gr.Error, match="Cancelled"):
        run(tab, progress=progress)
    for backbone in backbones:  # the shared denoisers keep no hook of the cancelled job
        denoiser = tab.load(backbone).pipe.transformer
        assert not denoiser._forward_pre_hooks and not denoiser._forward_hooks
    gallery, _, _ = run(tab, seed=2)  # the next run goes through, its images right
    assert (shrink(gallery[2][0]) == direct(plain["AsCAN"], LABEL, 2, STEPS, 4.0)).all()


def _two_sessions(tab, first: dict, second: dict, on_step):
    """Run two jobs of two sessions at once; on_step(job, step) is called at each denoiser step of each.
    Returns each job's result or exception."""
    results = {}

    def job(key, kwargs):
        request = SimpleNamespace(session_hash=key)

        def progress(value=None, desc=None, **kw):
            if value is not None:
                on_step(key, value[0])

        try:
            results[key] = run(tab, request=request, progress=progress, **kwargs)
        except BaseException as err:  # noqa: BLE001 -- the test reads it
            results[key] = err

    threads = [threading.Thread(target=job, args=(k, kw)) for k, kw in (("a", first), ("b", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.fixture
def dit_only(models, backbones, monkeypatch):
    monkeypatch.setattr(models, "class_pipelines", backbones[:1])
    return BackbonesTab(models, Jobs())


def test_two_sessions_on_one_model_each_get_their_own_image(dit_only, plain):
    # both jobs set their timesteps (2 and 5 steps) before either takes its first step: with one scheduler
    # between them, the first job would step on the second one's timesteps
    both_started = threading.Barrier(2, timeout=60)
    results = _two_sessions(dit_only, dict(seed=1, steps=2), dict(seed=2, steps=5),
                            lambda key, step: both_started.wait() if step == 1 else None)
    for key, seed, steps in (("a", 1, 2), ("b", 2, 5)):
        gallery, _, n = results[key]
        assert n["seed"] == seed and n["models"][0]["denoiser_calls"] == steps
        assert (shrink(gallery[0][0]) == direct(plain["DiT"], LABEL, seed, steps, 4.0)).all(), key


def test_cancel_stops_only_its_own_session_s_job(dit_only, plain):
    # a presses Cancel at its first step and holds there until b has taken its second step, which runs while
    # a's hook (with a's flag set) is still on the shared denoiser
    b_went_on = threading.Event()
    both_started = threading.Barrier(2, timeout=60)

    def on_step(key, step):
        if step == 1:
            both_started.wait()
            if key == "a":
                dit_only.cancel(SimpleNamespace(session_hash="a"))
                assert b_went_on.wait(60)
        elif key == "b" and step == 2:
            b_went_on.set()

    results = _two_sessions(dit_only, dict(seed=1, steps=4), dict(seed=2, steps=4), on_step)
    assert isinstance(results["a"], gr.Error) and "Cancelled" in str(results["a"])
    gallery, _, _ = results["b"]
    assert (shrink(gallery[0][0]) == direct(plain["DiT"], LABEL, 2, 4, 4.0)).all()


@pytest.mark.parametrize("over, message", [
    (dict(label="green cat"), "Class must be one of the 24 class names"),
    (dict(label=None), "Class must be one of"),
    (dict(steps=0), "Steps must be a whole number from 1 to 100"),
    (dict(steps=2.5), "Steps must be"),
    (dict(seed=-1), "Seed must be"),
    (dict(guidance=float("nan")), "Guidance must be a number from 0 to 20"),
    (dict(guidance=25.0), "Guidance must be"),
])
def test_bad_input_is_a_gr_error_naming_the_field(tab, over, message):
    with pytest.raises(gr.Error, match=message):
        run(tab, **over)


def test_the_other_tabs_run_on_an_ascan_text_pipeline(tmp_path):
    """`genfast demo --pipeline` on an AsCAN StableDiffusionPipeline folder: Accelerate skips steps with feature
    inheritance and Quantize packs its weights, each as on genfast-mini."""
    from test_ascan import _sd_pipeline, _text_model

    from genfast.demo.accelerate_tab import AccelerateTab
    from genfast.demo.quantize_tab import QuantizeTab

    _sd_pipeline(_text_model()).save_pretrained(tmp_path / "ascan-t2i")
    models, jobs = DemoModels(pipeline=str(tmp_path / "ascan-t2i"), workers=1), Jobs()
    quiet = lambda *a, **k: None  # the progress tracker Gradio would inject
    n = AccelerateTab(models, jobs).run("a red circle", 0, 6, 5.0, "feature_inheritance:interval=2",
                                        progress=quiet)[-1]
    assert n["accelerated"]["full_calls"] == 3 < n["baseline"]["full_calls"] == 6 and n["psnr"] < 100
    n = QuantizeTab(models, jobs).run("a red circle", 0, 4, 5.0, "int8", "channel", progress=quiet)[-1]
    assert n["quantized"]["quantized_layers"] > 0 and n["quantized"]["bits_per_weight"] < 16 and n["psnr"] < 100
