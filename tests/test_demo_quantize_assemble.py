"""The demo's Quantize and Assemble tabs, their handlers called as functions on genfast-mini: what they
show equals what genfast gives outside the demo, the worker comes back as it was (also after a job
cancelled mid-way), the reported sizes are what the formats imply, and bad input gets a gr.Error."""

import fnmatch
import math
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import genfast
from genfast.api import handles_on
from genfast.demo.assemble_tab import AssembleTab, default_student
from genfast.demo.common import DemoModels, Jobs, enlarge, to_tensor
from genfast.demo.quantize_tab import QuantizeTab
from genfast.eval.faithfulness import faithfulness
from genfast.methods.multi_unet import student_steps
from genfast.models import MINI_ASSEMBLED, asset_path
from genfast.quant.config import DEFAULT_SKIP
from genfast.quant.saving import folder_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, SEED, STEPS, GUIDANCE = "a red circle on a blue background", 3, 4, 5.0
STUDENT = str(asset_path(MINI_ASSEMBLED))


@pytest.fixture(scope="module")
def models():
    return DemoModels(workers=1)  # one worker: it is models.base, whose UNet the tests watch


@pytest.fixture(scope="module")
def jobs():
    return Jobs()


@pytest.fixture(scope="module")
def quantize_tab(models, jobs):
    return QuantizeTab(models, jobs)


@pytest.fixture(scope="module")
def assemble_tab(models, jobs):
    return AssembleTab(models, jobs)


@pytest.fixture(scope="module")
def plain():
    """genfast-mini loaded outside the demo."""
    pipe = genfast.load_mini()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, seed=SEED):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(seed)).images[0]


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_restored(unet, before):
    """Bit-identical weights, no genfast handle and no parametrization or hook left on the UNet."""
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert handles_on(unet) == {}
    assert not any(hasattr(m, "parametrizations") for m in unet.modules())
    registry = getattr(unet, "_diffusers_hook", None)
    assert registry is None or not registry.hooks


def quantize_run(tab, weights="int4", granularity="group:64", activations="none", **over):
    args = dict(prompt=PROMPT, seed=SEED, steps=STEPS, guidance=GUIDANCE, weights=weights, granularity=granularity,
                activations=activations)
    args.update(over)
    return tab.run(**args)


def assemble_run(tab, switch_at=0.5, student=STUDENT, **over):
    args = dict(prompt=PROMPT, seed=SEED, steps=STEPS, guidance=GUIDANCE, switch_at=switch_at, student=student)
    args.update(over)
    return tab.run(**args)


def cancelling_at(jobs, tab, target):
    """A progress callback that presses Cancel when the call named `desc` makes its first step."""

    def progress(value=None, desc=None, **kw):
        if desc == target and value is not None:
            jobs.cancel(None, tab)

    return progress


# ---------------------------------------------------------------- quantize


def test_quantized_image_and_psnr_are_genfast_quantize_s(quantize_tab, models, plain):
    before = snapshot(models.base.unet)
    (float_shown, quant_shown), table, n = quantize_run(quantize_tab, "int4", "group:64")
    assert_restored(models.base.unet, before)

    reference = image(plain)
    with genfast.quantize(plain, genfast.QuantConfig(weights="int4", granularity="group:64")):
        quantized = image(plain)
    assert same(float_shown, enlarge(reference)) and same(quant_shown, enlarge(quantized))
    expect = faithfulness(to_tensor(quantized)[None], to_tensor(reference)[None])
    assert n["psnr"] == pytest.approx(expect["psnr"]) and n["ssim"] == pytest.approx(expect["ssim"])
    assert f"{n['psnr']:.1f} dB" in table


def expected_packed_bytes(unet, bits, group):
    """Codes of `bits` bits (rows zero-padded to whole groups) bit-packed, plus one fp32 scale per row (group
    None) or per group, for every Linear / Conv2d the default skip list leaves; and the weights they hold."""
    total = weights = 0
    for name, m in unet.named_modules():
        if not isinstance(m, torch.nn.Linear | torch.nn.Conv2d) or any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_SKIP):
            continue
        rows, cols = m.weight.shape[0], m.weight[0].numel()
        width = cols if group is None else math.ceil(cols / group) * group
        codes = rows * width if bits == 8 else math.ceil(rows * width / 8) * bits
        scales = rows if group is None else rows * width // group
        total += codes + 4 * scales
        weights += rows * cols
    return total, weights


@pytest.mark.parametrize("weights, granularity, bits, group", [("int8", "channel", 8, None),
                                                              ("int4", "group:64", 4, 64)])
def test_bytes_per_weight_are_the_format_s_bits_plus_scales(quantize_tab, plain, weights, granularity, bits, group):
    _, _, n = quantize_run(quantize_tab, weights, granularity)
    packed, count = expected_packed_bytes(plain.unet, bits, group)
    q = n["quantized"]
    assert (q["packed_bytes"], q["quantized_weights"]) == (packed, count)
    assert q["bytes_per_weight"] == pytest.approx(packed / count)
    assert q["bits_per_weight"] == pytest.approx(8 * packed / count)
    assert n["code_bits"] == bits


def test_checkpoint_sizes_are_those_of_the_saved_folders(quantize_tab, plain, tmp_path, monkeypatch):
    n = quantize_run(quantize_tab, "int4", "group:64")[2]
    sizes = n["checkpoint_bytes"]
    # the quantized denoiser's folder as save_quantized writes it for the whole pipeline outside the demo
    with genfast.quantize(plain, genfast.QuantConfig(weights="int4", granularity="group:64")):
        out = genfast.save_quantized(plain, tmp_path / "int4")
    assert sizes["quantized"] == folder_bytes(out / "unet")
    # it holds the packed weights plus the float ones left (fp32), and a little config and JSON
    params = sum(p.numel() for p in plain.unet.parameters())
    q = n["quantized"]
    assert 0 < sizes["quantized"] - q["packed_bytes"] - 4 * (params - q["quantized_weights"]) < 100_000
    # the float folders: every parameter in 4 / 2 bytes, plus the header and config.json
    assert 0 < sizes["fp32"] - 4 * params < 100_000
    assert 0 < sizes["fp16"] - 2 * params < 100_000

    # kept per configuration: a second run of it saves nothing
    def refuse(*a, **k):
        raise AssertionError("the checkpoint was saved again")

    monkeypatch.setattr("genfast.demo.quantize_tab.quantized_checkpoint_bytes", refuse)
    monkeypatch.setattr("genfast.demo.quantize_tab.float_checkpoint_bytes", refuse)
    assert quantize_run(quantize_tab, "int4", "group:64")[2]["checkpoint_bytes"] == sizes


def test_block_formats_and_activations_run(quantize_tab, models, plain):
    before = snapshot(models.base.unet)
    _, _, n = quantize_run(quantize_tab, "mxfp4", "default", activations="int8")
    assert_restored(models.base.unet, before)
    assert n["granularity"] == "block:32" and n["activations"] == "int8"
    assert n["quantized"]["calibration_s"] is not None
    # mxfp4: 4-bit codes and one 1-byte E8M0 scale per 32 weights (rows padded to whole blocks)
    packed, count = 0, 0
    for name, m in plain.unet.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and not any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_SKIP):
            rows, width = m.weight.shape[0], math.ceil(m.weight[0].numel() / 32) * 32
            packed += math.ceil(rows * width / 8) * 4 + rows * width // 32
            count += m.weight.numel()
    assert n["quantized"]["packed_bytes"] == packed and n["quantized"]["quantized_weights"] == count


@pytest.mark.parametrize("desc, activations", [("int8", "none"), ("calibrating activations", "int8")])
def test_a_job_cancelled_mid_way_leaves_the_worker_as_it_was(quantize_tab, models, jobs, desc, activations):
    before = snapshot(models.base.unet)
    with pytest.raises(gr.Error, match="Cancelled"):
        quantize_run(quantize_tab, "int8", "channel", activations=activations,
                     progress=cancelling_at(jobs, "quantize", desc))
    assert_restored(models.base.unet, before)


@pytest.mark.parametrize("over, message", [
    (dict(prompt="  "), "Type a prompt"),
    (dict(steps=0), "Steps must be a whole number from 1 to 100"),
    (dict(steps=101), "Steps must be"),
    (dict(seed=-1), "Seed must be"),
    (dict(guidance=21.0), "Guidance must be"),
    (dict(weights="int9"), "Weight format must be one of"),
    (dict(weights="mxfp4", granularity="channel"), "'channel' has no effect on mxfp4: its scales are fixed per 32"),
    (dict(weights="nvfp4", granularity="group:64"), "has no effect on nvfp4"),
    (dict(granularity="group:1"), "granularity must be 'channel', 'tensor' or 'group:N' with N >= 2"),
    (dict(granularity=""), "Granularity must be .default., .channel., .tensor. or .group:N."),
    (dict(activations="int4"), "Activations must be one of none, int8, fp8_e4m3"),
])
def test_bad_quantize_input_is_a_clear_error(quantize_tab, over, message):
    with pytest.raises(gr.Error, match=message.replace("(", r"\(")):
        quantize_run(quantize_tab, **over)


def test_block_formats_lock_the_granularity_dropdown():
    update = QuantizeTab.granularity_for("nvfp4")
    assert update.value == "default" and update.interactive is False
    assert QuantizeTab.granularity_for("int4").interactive is True


# ---------------------------------------------------------------- assemble


def test_teacher_student_and_multi_unet_images_are_those_outside_the_demo(assemble_tab, models, plain):
    before = snapshot(models.base.unet)
    teacher_shown, student_shown, multi_shown, table, n = assemble_run(assemble_tab, switch_at=0.5)
    assert_restored(models.base.unet, before)

    teacher = image(plain)
    student = image(StableDiffusionPipeline.from_pretrained(STUDENT, local_files_only=True))
    with genfast.accelerate(plain, "multi_unet", student=STUDENT, switch_at=0.5):
        multi = image(plain)
    assert same(teacher_shown, enlarge(teacher))
    assert same(student_shown, enlarge(student))
    assert same(multi_shown, enlarge(multi))

    ref = to_tensor(teacher)[None]
    for key, img in (("student", student), ("multi_unet", multi)):
        expect = faithfulness(to_tensor(img)[None], ref)
        assert n[key]["psnr"] == pytest.approx(expect["psnr"]) and n[key]["ssim"] == pytest.approx(expect["ssim"])
    student_unet = UNet2DConditionModel.from_pretrained(STUDENT, subfolder="unet", local_files_only=True)
    counts = [sum(p.numel() for p in m.parameters()) for m in (plain.unet, student_unet)]
    assert [n["teacher"]["unet_params"], n["student"]["unet_params"]] == counts
    assert n["param_ratio"] == pytest.approx(counts[1] / counts[0])
    k = student_steps(STEPS, 0.5)
    assert (n["multi_unet"]["student_steps"], n["multi_unet"]["teacher_steps"]) == (k, STEPS - k)
    assert f"{n['student']['psnr']:.1f} dB" in table


def test_a_cancelled_multi_unet_call_leaves_the_teacher_unhooked(assemble_tab, models, jobs):
    before = snapshot(models.base.unet)
    first = assemble_run(assemble_tab, switch_at=0.25)
    with pytest.raises(gr.Error, match="Cancelled"):
        assemble_run(assemble_tab, switch_at=0.25, progress=cancelling_at(jobs, "assemble", "multi-UNet"))
    assert_restored(models.base.unet, before)
    again = assemble_run(assemble_tab, switch_at=0.25)
    assert all(same(a, b) for a, b in zip(first[:3], again[:3]))  # no step count or hook carried over


def test_the_student_is_loaded_once_and_shared(assemble_tab, models):
    from genfast.demo.assemble_tab import load_student

    with models.worker() as pipe:
        assert load_student(models, STUDENT, pipe) is load_student(models, STUDENT + "/", pipe)
        assert handles_on(load_student(models, STUDENT, pipe)) == {}  # multi_unet claims only the teacher


def unloadable(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    return str(folder)


def incompatible(tmp_path):
    folder = tmp_path / "other-text-width"
    UNet2DConditionModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=2,
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64
                         ).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("over, message", [
    (dict(prompt=""), "Type a prompt"),
    (dict(steps=101), "Steps must be"),
    (dict(guidance=-1), "Guidance must be"),
    (dict(switch_at=0), "Switch at 0 gives the student no step"),
    (dict(switch_at=1), "Switch at 1 gives the student every step"),
    (dict(switch_at=1.5), "Switch at must be a number from 0 to 1"),
    (dict(switch_at=0.1), "Switch at 0.1 with 4 steps gives the student none of the steps"),
    (dict(student=""), "Give the student's folder"),
    (dict(student="/no/such/student"), "Student folder '/no/such/student' does not exist"),
    (dict(student=unloadable), "Student folder '.*broken' does not load as a UNet"),
    (dict(student=incompatible),
     "Student folder '.*other-text-width' does not fit the demo's pipeline: .*cross_attention_dim"),
])
def test_bad_assemble_input_is_a_clear_error(assemble_tab, tmp_path, over, message):
    over = {k: v(tmp_path) if callable(v) else v for k, v in over.items()}
    with pytest.raises(gr.Error, match=message):
        assemble_run(assemble_tab, **over)


def test_the_default_student_is_the_embedded_one_on_genfast_mini_only(models):
    assert Path(default_student(models)) == asset_path(MINI_ASSEMBLED)

    class Other:
        is_mini = False

    assert default_student(Other()) == ""


def test_both_tabs_build_with_their_ids_and_api_names(models, jobs):
    with gr.Blocks() as app:
        for tab in (QuantizeTab(models, jobs), AssembleTab(models, jobs)):
            with gr.Tab(tab.TAB):
                tab.build()
    config = app.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"quantize-slider", "quantize-numbers", "quantize-json", "quantize-run", "quantize-cancel",
            "quantize-format", "quantize-granularity", "assemble-student", "assemble-teacher",
            "assemble-student-image", "assemble-multi", "assemble-numbers", "assemble-json", "assemble-run",
            "assemble-cancel", "assemble-switch-at"} <= ids
    apis = {d.get("api_name") for d in config["dependencies"]}
    assert {"quantize", "cancel_quantize", "assemble", "cancel_assemble"} <= apis
    runs = [fn for fn in app.fns.values() if fn.api_name in ("quantize", "assemble")]
    assert len(runs) == 2
    assert all(fn.concurrency_id == "pipelines" and fn.concurrency_limit == models.workers for fn in runs)
