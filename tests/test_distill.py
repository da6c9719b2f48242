"""genfast.training.distill and `genfast distill` on a tiny SD-shaped teacher (two layers per stage)."""

import argparse
import copy
import dataclasses
import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tiny_pipelines import _text_encoder, _vae, tokenizer
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from genfast.assembly.plan import AssemblyPlan
from genfast.assembly.student import assemble, build_student, save_assembled
from genfast.cli_distill import add_distill_parser
from genfast.data.shapes import render_batch
from genfast.models import load_pipeline
from genfast.training.distill import (
    DistillConfig,
    distill,
    hybrid_unet,
    incubation_units,
    read_log,
    run_distill,
)

BK_SMALL = AssemblyPlan(layers_per_block=(1, 1, 1), mid_block=False)
BK_TINY = AssemblyPlan(layers_per_block=(1, 1), mid_block=False, drop_stages=1)
TINY = dict(batch_size=2, pool_size=4, sas_batch=2, warmup=0)  # every run here: a few samples


def _teacher(prediction="epsilon"):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        norm_num_groups=8, attention_head_dim=2, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    tok = tokenizer()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              prediction_type=prediction, rescale_betas_zero_snr=prediction == "v_prediction")
    return StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(tok), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def teacher(one_thread):
    return _teacher()


@pytest.fixture(scope="module")
def v_teacher(one_thread):
    return _teacher("v_prediction")


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_identical_student_has_zero_distillation_terms(teacher, tmp_path):
    before = _state(teacher.unet)
    student = copy.deepcopy(teacher.unet)  # the same network: everything but the task term is 0
    distill(teacher, student, tmp_path, DistillConfig(steps=1, **TINY), progress=False, log=lambda *_: None)
    record = read_log(tmp_path)[0]
    assert record["kd_out"] == record["kd_feat"] == record["sas"] == 0.0
    assert record["task"] > 0
    # every down block, the mid block (both have one) and every up block are paired
    names = [f"down_blocks.{i}" for i in range(3)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(3)]
    assert sorted(record["feat_layers"]) == sorted(names)
    assert set(record["feat_layers"].values()) == set(record["feat_layers_mse"].values()) == {0.0}
    # the teacher is left as it was: weights, mode, trainable flags
    assert all(torch.equal(v, teacher.unet.state_dict()[k]) for k, v in before.items())
    assert not teacher.unet.training
    assert all(p.requires_grad for p in teacher.unet.parameters())


def test_hybrid_of_an_identical_student_is_the_teacher(teacher):
    unet = teacher.unet
    blocks = list(unet.down_blocks) + list(unet.up_blocks) + [unet.mid_block]
    student = copy.deepcopy(unet)
    smap = {"down": {i: i for i in range(3)}, "up": {i: i for i in range(3)}}
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = unet(x, t, cond).sample
        for unit in incubation_units(3):
            hybrid = hybrid_unet(unet, student, unit, smap)
            assert torch.equal(hybrid(x, t, cond).sample, ref)
    assert list(unet.down_blocks) + list(unet.up_blocks) + [unet.mid_block] == blocks  # teacher's own blocks


@pytest.mark.parametrize("weights", [dict(task=0, kd_feat=0, sas=0), dict(kd_out=0, kd_feat=0, sas=0.5)])
def test_a_zero_weight_removes_its_term(teacher, tmp_path, weights):
    student, _ = build_student(teacher.unet, BK_SMALL)
    options = {k: v for k, v in TINY.items() if not (k == "sas_batch" and weights.get("sas") == 0)}
    distill(teacher, student, tmp_path, DistillConfig(steps=1, **options, **weights), progress=False)
    record = read_log(tmp_path)[0]
    present = [n for n in ("task", "kd_out", "kd_feat", "sas") if weights.get(n, 1.0)]
    assert [n for n in ("task", "kd_out", "kd_feat", "sas") if n in record] == present
    assert record["loss"] == pytest.approx(sum(weights.get(n, 1.0) * record[n] for n in present), rel=1e-6)


@pytest.mark.parametrize("options, field", [
    (dict(sas=0, sas_encoder="evaluator"), "sas_encoder"),
    (dict(sas=0, sas_batch=4), "sas_batch"),
    (dict(kd_feat=0, feature_norm=False), "feature_norm"),
    (dict(task=0, min_snr_gamma=1.0), "min_snr_gamma"),
    (dict(task=0, kd_out=0, kd_feat=0, sas=0), "every loss weight"),
    (dict(task=0, kd_out=0, incubation_steps=4), "incubation_steps"),
    (dict(batch_size=4, sas_batch=8), "sas_batch"),
    (dict(steps=0), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(ema=1.0), "ema"),
    (dict(resolution=32), "resolution"),
    (dict(data="no/such/folder"), "data"),
    (dict(sas_encoder="no/such/folder"), "sas_encoder"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
])
def test_config_refuses_bad_and_ineffective_options(options, field):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**options)


def test_incubation_trains_only_its_unit(teacher, tmp_path, stop_after):
    stop_after(1)  # each call runs one step
    student, _ = build_student(teacher.unet, BK_TINY)
    teacher_before = _state(teacher.unet)
    config = DistillConfig(steps=1, incubation_steps=2, max_minutes=1, **TINY)
    # stage0: the outer pair (student down 0 + up 1, in place of teacher down 0 + up 2); inner1: the rest
    for unit, prefixes in (("stage0", ("down_blocks.0.", "up_blocks.1.")), ("inner1", ("down_blocks.1.",
                                                                                        "up_blocks.0."))):
        before = dict(student.named_parameters())
        before = {n: p.detach().clone() for n, p in before.items()}
        _, finished = run_distill(teacher, student, tmp_path, config, progress=False, log=lambda *_: None)
        assert not finished
        assert read_log(tmp_path)[-1]["unit"] == unit
        changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
        unit_params = {n for n in before if n.startswith(prefixes)}
        assert changed and changed <= unit_params
    assert all(torch.equal(v, teacher.unet.state_dict()[k]) for k, v in teacher_before.items())


def test_resume_is_exact(v_teacher, tmp_path, stop_after):
    start, _ = build_student(v_teacher.unet, BK_SMALL)
    config = DistillConfig(steps=2, incubation_steps=3, ema=0.9, **TINY)  # 3 units: 3 + 2 steps
    straight = distill(v_teacher, copy.deepcopy(start), tmp_path / "a", config, progress=False)

    stop_after(2)
    stopped = copy.deepcopy(start)
    _, finished = run_distill(v_teacher, stopped, tmp_path / "b", dataclasses.replace(config, max_minutes=1),
                              progress=False, log=lambda *_: None)
    assert not finished and len(read_log(tmp_path / "b")) == 2
    resumed = distill(v_teacher, stopped, tmp_path / "b", config, progress=False)
    assert [r["loss"] for r in read_log(tmp_path / "b")] == [r["loss"] for r in read_log(tmp_path / "a")]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_data_folder_without_captions_is_a_clear_error(teacher, tmp_path):
    images, captions, _ = render_batch(2, seed=0)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text(captions[0])
    student, _ = build_student(teacher.unet, BK_SMALL)
    config = DistillConfig(steps=1, data=str(tmp_path), batch_size=2, sas=0)
    with pytest.raises(ValueError, match=r"1 of 2 images have no caption file \(1\.txt\)"):
        distill(teacher, student, tmp_path / "work", config, progress=False)


def test_cli_writes_a_pipeline_that_loads(teacher, tmp_path, capsys):
    teacher.save_pretrained(tmp_path / "teacher")
    save_assembled(assemble(teacher, plan=BK_TINY), tmp_path / "student")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=8)).save_pretrained(tmp_path / "clip")
    data = tmp_path / "data"
    data.mkdir()
    images, captions, _ = render_batch(3, seed=1)
    for i, (image, text) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(image).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(text)

    parser = argparse.ArgumentParser()
    add_distill_parser(parser.add_subparsers())
    out = tmp_path / "distilled"
    args = parser.parse_args([
        "distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"), "--out", str(out),
        "--steps", "1", "--incubation-steps", "2", "--batch-size", "2", "--sas-encoder", str(tmp_path / "clip"),
        "--sas-batch", "2", "--data", str(data), "--no-feature-norm", "--quiet"])
    assert args.func(args) == 0
    assert str(out) in capsys.readouterr().out

    pipe = load_pipeline(out)
    assert pipe.unet.config.mid_block_type is None and len(pipe.unet.down_blocks) == 2
    info = json.loads((out / "distill.json").read_text())
    assert info["config"]["sas_encoder"] == str(tmp_path / "clip") and info["config"]["feature_norm"] is False
    assert sorted(info["final_losses"]) == ["kd_feat", "kd_out", "loss", "sas", "step", "task"]
    initial = load_pipeline(tmp_path / "student").unet.state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in pipe.unet.state_dict().items())  # it was trained
    image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_cli_assembles_from_a_plan_when_no_student_is_given(teacher, tmp_path):
    teacher.save_pretrained(tmp_path / "teacher")
    parser = argparse.ArgumentParser()
    add_distill_parser(parser.add_subparsers())
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--steps", "1", "--batch-size", "2",
              "--sas-weight", "0", "--pool-size", "4", "--quiet"]
    plan = json.dumps(BK_TINY.to_dict())
    args = parser.parse_args([*common, "--plan", plan, "--out", str(tmp_path / "a")])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "a" / "unet" / "genfast_assembly.json").read_text())
    assert saved["plan"] == BK_TINY.to_dict()
    # the plan file a distilled folder holds rebuilds the same architecture
    args = parser.parse_args([*common, "--plan", str(tmp_path / "a" / "unet" / "genfast_assembly.json"),
                              "--out", str(tmp_path / "b")])
    assert args.func(args) == 0
    a, b = (load_pipeline(tmp_path / name).unet.config for name in "ab")
    assert {k: v for k, v in a.items() if not k.startswith("_")} == {k: v for k, v in b.items() if not k.startswith("_")}
    with pytest.raises(SystemExit):  # --student and --plan together
        parser.parse_args([*common, "--plan", plan, "--student", str(tmp_path), "--out", str(tmp_path / "c")])
