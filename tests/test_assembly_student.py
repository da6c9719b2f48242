"""Assembly plans, the student UNet BK-SDM's way, and its save/load round trips."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tiny_pipelines import _unet, build, inputs

from genfast.assembly.analyze import Analysis, Unit
from genfast.assembly.condconv import MECondConv
from genfast.assembly.plan import AssemblyPlan, auto_plan, param_count, plan_preset, stage_map
from genfast.assembly.student import (
    AssembledUNet2DConditionModel,
    assemble,
    build_student,
    load_student,
    save_assembled,
)
from genfast.cli import CLIError
from genfast.cli_assemble import add_assemble_parser

# SD-1.5's UNet, written out by hand (diffusers' defaults fill the rest)
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# SDXL's UNet (base 1.0)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
            transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
# BK-SDM's published U-Net sizes for SD-1.4/1.5 (arXiv 2305.15798), in billions, rounded to 0.01B
BK_SDM = {"bk-base": 0.58, "bk-small": 0.49, "bk-tiny": 0.33}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, 16, 16, generator=g)
    text = torch.randn(batch, 5, c.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700][:batch]), text


def _teacher(**changes):
    torch.manual_seed(0)
    unet = _unet()
    # without diffusers' private keys: "_use_default_values" would put back the defaults of changed keys
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    return UNet2DConditionModel.from_config({**config, **changes}).eval() if changes else unet


# --- plans --------------------------------------------------------------------------------------------
def test_plan_validation_names_the_field():
    for kwargs, field in [(dict(layers_per_block=(0, 1)), "layers_per_block"), (dict(drop_stages=-1), "drop_stages"),
                          (dict(condconv_experts=99), "condconv_experts"), (dict(condconv_inherit="x"), "condconv_inherit"),
                          (dict(gri_pooled=8), "gri_pooled"), (dict(condconv_inherit="exact"), "condconv_inherit"),
                          (dict(mid_block="no"), "mid_block"), (dict(transformer_layers_per_block=3), "transformer")]:
        with pytest.raises(ValueError, match=field):
            AssemblyPlan(**kwargs)
    plan = AssemblyPlan(layers_per_block=[1, 2], mid_block=False, condconv_experts=2, condconv_inherit="exact")
    assert plan.layers_per_block == (1, 2)
    assert AssemblyPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ValueError, match="unknown"):
        AssemblyPlan.from_dict({"layers": 1})


def test_plan_must_fit_and_change_the_teacher():
    teacher = _teacher(layers_per_block=2)
    with pytest.raises(ValueError, match="changes nothing"):
        AssemblyPlan(layers_per_block=(2, 2, 2)).student_config(teacher.config)
    with pytest.raises(ValueError, match="changes nothing"):
        build_student(teacher, AssemblyPlan(layers_per_block=(2, 2, 2)))
    with pytest.raises(ValueError, match=r"layers_per_block\[1\] must be in 1..2"):
        AssemblyPlan(layers_per_block=(1, 3, 1)).student_config(teacher.config)
    with pytest.raises(ValueError, match="one value per student down stage"):
        AssemblyPlan(layers_per_block=(1, 1)).student_config(teacher.config)
    with pytest.raises(ValueError, match="drop_stages must be in 0..2"):
        AssemblyPlan(drop_stages=3).student_config(teacher.config)
    # genfast-mini's shape: one layer per stage already -> bk-base says so and names bk-small
    with pytest.raises(ValueError, match="bk-small"):
        plan_preset("bk-base", _teacher().config)
    with pytest.raises(ValueError, match="preset must be one of"):
        plan_preset("bk-huge", _teacher().config)


def test_student_config_drops_the_innermost_stage():
    cfg = AssemblyPlan(layers_per_block=(1, 1, 1), mid_block=False, drop_stages=1).student_config(
        {**SD15, "attention_head_dim": [5, 10, 20, 20]})
    assert cfg["block_out_channels"] == [320, 640, 1280]
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert cfg["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert cfg["attention_head_dim"] == [5, 10, 20]
    assert cfg["mid_block_type"] is None and cfg["layers_per_block"] == 1
    assert stage_map(SD15, cfg) == stage_map(SD15, plan_preset("bk-tiny", SD15)) == {
        "down": {0: 0, 1: 1, 2: 2}, "up": {0: 1, 1: 2, 2: 3}}


def test_presets_on_sd15_match_bk_sdm_parameter_counts():
    teacher = param_count(SD15)
    assert abs(teacher / 1e6 - 859.5) < 0.1
    for name, published in BK_SDM.items():
        count = param_count(plan_preset(name, SD15).student_config(SD15))
        # 2% of the published size, plus half its last digit (it is rounded to 0.01B)
        assert abs(count / 1e9 - published) <= 0.02 * published + 0.005, (name, count)
    # BK-SDM-Tiny's own config (Nota-NetsPresso/BK-SDM src/unet_config/bk_tiny): the same layout
    tiny = plan_preset("bk-tiny", SD15).student_config(SD15)
    assert (tiny["block_out_channels"], tiny["down_block_types"], tiny["up_block_types"], tiny["layers_per_block"],
            tiny["mid_block_type"]) == ([320, 640, 1280], ["CrossAttnDownBlock2D"] * 3, ["CrossAttnUpBlock2D"] * 3,
                                        1, None)


def test_sdxl_shaped_student_keeps_the_first_transformer_blocks():
    pipe = build("sdxl")
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    pipe.unet = UNet2DConditionModel.from_config({**config, "transformer_layers_per_block": [1, 3, 1]}).eval()
    plan = plan_preset("bk-tiny", pipe.unet.config)
    assert plan.drop_stages == 0 and plan.transformer_layers_per_block == (1, 2, 1)
    student_pipe = assemble(pipe, plan=plan)
    student, report = student_pipe.unet, student_pipe.unet.genfast_report
    assert "down_blocks.1.attentions.0" in report["truncated"] and not report["fresh"]
    assert report["copied"]["add_embedding"] == "add_embedding"
    torch.testing.assert_close(student.down_blocks[1].attentions[0].transformer_blocks[1].ff.net[2].weight,
                               pipe.unet.down_blocks[1].attentions[0].transformer_blocks[1].ff.net[2].weight,
                               atol=0, rtol=0)
    assert student_pipe(**inputs("sdxl", steps=2)).images.shape == (1, 32, 32, 3)


def test_presets_on_sdxl_give_valid_smaller_students():
    counts = [param_count(SDXL)] + [param_count(plan_preset(n, SDXL).student_config(SDXL)) for n in BK_SDM]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4
    tiny = plan_preset("bk-tiny", SDXL)
    assert tiny.drop_stages == 0 and tiny.transformer_layers_per_block == (1, 2, 5)  # KOALA-style


# --- the student -----------------------------------------------------------------------------------
def test_bk_small_student_equals_teacher_with_mid_block_bypassed():
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, report = build_student(teacher, plan_preset("bk-small", teacher.config))
    assert type(student) is UNet2DConditionModel and student.mid_block is None
    assert report["removed"] == ["mid_block"] and not report["fresh"]
    hook = teacher.mid_block.register_forward_hook(lambda m, args, kwargs, out: args[0] if args
                                                   else kwargs["hidden_states"], with_kwargs=True)
    with torch.no_grad():
        expected = teacher(*_inputs(teacher)).sample
        got = student(*_inputs(teacher)).sample
    hook.remove()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher is untouched
    assert not any(s.data_ptr() == t.data_ptr() for s in student.parameters() for t in teacher.parameters())


def test_student_without_a_stages_attention_equals_teacher_with_it_bypassed():
    teacher = _teacher()
    plan = AssemblyPlan(down_attention=(True, False, True), up_attention=(True, True, False))
    student, report = build_student(teacher, plan)
    assert student.config.down_block_types[1] == "DownBlock2D" and student.config.up_block_types[2] == "UpBlock2D"
    assert not report["fresh"] and "down_blocks.1.attentions.0" in report["removed"]
    bypassed = [a for a in (*teacher.down_blocks[1].attentions, *teacher.up_blocks[2].attentions)]
    hooks = [a.register_forward_hook(lambda m, args, kwargs, out: (args[0] if args else kwargs["hidden_states"],),
                                     with_kwargs=True) for a in bypassed]
    with torch.no_grad():
        expected = teacher(*_inputs(teacher)).sample
        got = student(*_inputs(teacher)).sample
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"down_attention\[2\].*DownBlock2D"):
        AssemblyPlan(down_attention=(True, True, False)).student_config(teacher.config)
    with pytest.raises(ValueError, match="down_attention must be"):
        AssemblyPlan(down_attention=(1, 0, 1))


def test_bk_base_mapping_keeps_first_and_last_up_layers():
    teacher = _teacher(layers_per_block=2)
    student, report = build_student(teacher, plan_preset("bk-base", teacher.config))
    assert report["copied"]["up_blocks.1.attentions.1"] == "up_blocks.1.attentions.2"
    assert report["copied"]["up_blocks.1.resnets.0"] == "up_blocks.1.resnets.0"
    assert report["copied"]["down_blocks.0.resnets.0"] == "down_blocks.0.resnets.0"
    assert "down_blocks.0.resnets.1" in report["removed"] and "up_blocks.2.resnets.1" in report["removed"]
    assert not report["fresh"]
    torch.testing.assert_close(student.up_blocks[1].attentions[1].proj_out.weight,
                               teacher.up_blocks[1].attentions[2].proj_out.weight, atol=0, rtol=0)
    assert student.config.layers_per_block == 1 and len(student.up_blocks[0].resnets) == 2


def test_bk_tiny_student_follows_the_stage_map_and_reports_fresh_modules():
    # channels (32, 64, 96): dropping the innermost stage changes the first up stage's input channels
    teacher = _teacher(block_out_channels=(32, 64, 96))
    student, report = build_student(teacher, plan_preset("bk-tiny", teacher.config))
    assert len(student.down_blocks) == 2 and student.down_blocks[-1].downsamplers is None
    assert report["copied"]["up_blocks.1.attentions.0"] == "up_blocks.2.attentions.0"
    assert "up_blocks.0.resnets.0" in report["fresh"]  # 96+64 -> 64+64 input channels
    assert report["copied"]["up_blocks.0.resnets.1"] == "up_blocks.1.resnets.1"
    with torch.no_grad():
        assert student(*_inputs(student)).sample.shape == (2, 4, 16, 16)


# --- ME-CondConv experts and GRI ---------------------------------------------------------------------
def _perturb_new_parameters(unet):
    """Move what training would move (ME-CondConv gates, GRI biases), so a round trip is checked on them."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("gates") or ".processor." in name:
                p.add_(torch.randn_like(p) * 0.1)


def test_condconv_student_starts_equal_and_takes_removed_kernels():
    teacher = _teacher(layers_per_block=2)
    plain, _ = build_student(teacher, plan_preset("bk-small", teacher.config))
    plan = dataclasses.replace(plan_preset("bk-small", teacher.config), condconv_experts=3)
    student, report = build_student(teacher, plan)
    assert isinstance(student.down_blocks[0].resnets[0].conv1, MECondConv)
    with torch.no_grad():
        torch.testing.assert_close(student(*_inputs(teacher)).sample, plain(*_inputs(teacher)).sample, atol=0, rtol=0)
    # same stage, same conv name first, then the same stage's other conv, then the removed mid block's
    picks = report["experts"]["down_blocks.0.resnets.0.conv1"]
    assert [p[0] for p in picks[:2]] == ["down_blocks.0.resnets.1.conv1", "down_blocks.0.resnets.1.conv2"]
    assert picks[2][0].startswith("mid_block.resnets.") and picks[2][1] == "fit"  # 32 -> 16 channels: cropped
    experts = student.down_blocks[0].resnets[0].conv1.experts
    torch.testing.assert_close(experts[0], teacher.down_blocks[0].resnets[1].conv1.weight, atol=0, rtol=0)
    mid = teacher.get_submodule(picks[2][0]).weight
    torch.testing.assert_close(experts[2], mid[:16, :16], atol=0, rtol=0)
    # the up stage's last layer came from the teacher's last; the removed middle one seeds its experts
    assert report["experts"]["up_blocks.1.resnets.1.conv2"][0] == ["up_blocks.1.resnets.1.conv2", "exact"]
    exact, _ = build_student(teacher, dataclasses.replace(plan, condconv_inherit="exact"))
    assert all(how == "exact" for picks in exact.genfast_report["experts"].values() for _, how in picks)


def test_assembled_student_round_trips_through_a_plain_diffusers_pipeline(tmp_path):
    pipe = build("sd")
    pipe.unet = _teacher(layers_per_block=2)
    plan = AssemblyPlan(layers_per_block=(1, 1, 1), mid_block=False, condconv_experts=2, gri_window=4, gri_pooled=2)
    student_pipe = assemble(pipe, plan=plan)
    _perturb_new_parameters(student_pipe.unet)
    assert isinstance(student_pipe.unet, AssembledUNet2DConditionModel)
    save_assembled(student_pipe, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["unet"] == ["genfast.assembly.student", "AssembledUNet2DConditionModel"]
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert isinstance(loaded.unet, AssembledUNet2DConditionModel) and loaded.unet.genfast_plan == plan
    again = load_student(tmp_path / "out")
    assert again.genfast_stage_map == {"down": {0: 0, 1: 1, 2: 2}, "up": {0: 0, 1: 1, 2: 2}}
    with torch.no_grad():
        expected = student_pipe.unet(*_inputs(pipe.unet)).sample
        torch.testing.assert_close(loaded.unet(*_inputs(pipe.unet)).sample, expected, atol=0, rtol=0)
        torch.testing.assert_close(again(*_inputs(pipe.unet)).sample, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="device_map"):
        AssembledUNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet", device_map="auto")


def test_plain_student_pipeline_saves_and_loads_in_diffusers(tmp_path):
    pipe = build("sd")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    student_pipe = assemble(pipe, preset="bk-tiny")
    assert type(student_pipe) is type(pipe) and student_pipe.unet is not pipe.unet
    assert all(student_pipe.components[k] is v for k, v in pipe.components.items() if k != "unet")
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())
    save_assembled(student_pipe, tmp_path / "tiny")
    assert json.loads((tmp_path / "tiny" / "model_index.json").read_text())["unet"] == ["diffusers",
                                                                                         "UNet2DConditionModel"]
    info = json.loads((tmp_path / "tiny" / "unet" / "genfast_assembly.json").read_text())
    assert AssemblyPlan.from_dict(info["plan"]) == student_pipe.unet.genfast_plan and info["report"]["removed"]
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    assert type(loaded.unet) is UNet2DConditionModel
    out = [p(**inputs("sd", steps=2)).images for p in (student_pipe, loaded)]
    np.testing.assert_array_equal(out[0], out[1])
    again = load_student(tmp_path / "tiny")
    assert again.genfast_plan == student_pipe.unet.genfast_plan
    assert again.genfast_stage_map == student_pipe.unet.genfast_stage_map == {"down": {0: 0, 1: 1}, "up": {0: 1, 1: 2}}


def test_assemble_arguments_and_dtype():
    pipe = build("sd")
    for kwargs, match in [(dict(), "give one of"), (dict(preset="bk-small", plan=AssemblyPlan(mid_block=False)),
                                                     "exactly one"),
                          (dict(preset="auto"), "needs target_latency"),
                          (dict(preset="bk-small", target_latency=0.5), "no effect"),
                          (dict(plan=AssemblyPlan(mid_block=False), target_latency=0.5), "no effect")]:
        with pytest.raises(ValueError, match=match):
            assemble(pipe, **kwargs)
    pipe.unet.to(torch.bfloat16)
    student = assemble(pipe, plan={"mid_block": False}).unet
    assert next(student.parameters()).dtype == torch.bfloat16


# --- auto ----------------------------------------------------------------------------------------------
def _analysis(**changes):
    """A hand-made analysis of _teacher(layers_per_block=2): (latency share, output change) per unit."""
    table = {"mid_block": (0.10, 0.05), "down_blocks.0": (0.10, None), "down_blocks.1": (0.10, None),
             "down_blocks.2": (0.10, None), "up_blocks.0": (0.15, None), "up_blocks.1": (0.15, None),
             "up_blocks.2": (0.15, None)}
    for j in range(3):
        if j < 2:
            table[f"down_blocks.0.layers.{j}"] = (0.05, 0.01)
            table[f"down_blocks.1.layers.{j}"] = (0.05, 0.2)
            table[f"down_blocks.2.resnets.{j}"] = (0.04, 0.3)
        table[f"up_blocks.0.resnets.{j}"] = (0.05, 0.3)
        table[f"up_blocks.1.layers.{j}"] = (0.05, 0.2)
        table[f"up_blocks.2.layers.{j}"] = (0.05, 0.01)
        for stage in (("down_blocks.0", "down_blocks.1") if j < 2 else ()) + ("up_blocks.1", "up_blocks.2"):
            table[f"{stage}.attentions.{j}"] = (0.01, 0.5)  # costly to remove: never chosen below
    table.update(changes)
    units = [Unit(name, "x", 0, 0.0, share, change, None) for name, (share, change) in table.items()]
    return Analysis(units=units, timesteps=[999], prompts=["p"])


def test_auto_plan_removes_the_cheapest_units_first():
    config = _teacher(layers_per_block=2).config
    # layer 1 of stage 0 (change 0.02 for 0.10 of the latency), then the mid block: 0.80
    assert auto_plan(_analysis(), config, 0.85) == AssemblyPlan(layers_per_block=(1, 2, 2), mid_block=False)
    # then stage 1's layer (0.70), then the innermost stage (0.25 of the latency): 0.45
    assert auto_plan(_analysis(), config, 0.5) == AssemblyPlan(layers_per_block=(1, 1), mid_block=False,
                                                               drop_stages=1)
    # attention that costs latency and changes little goes first (the up path keeps its transformers)
    cheap = {f"down_blocks.1.attentions.{j}": (0.06, 0.001) for j in range(2)}
    assert auto_plan(_analysis(**cheap), config, 0.9) == AssemblyPlan(layers_per_block=(2, 2, 2),
                                                                       down_attention=(True, False, True))
    with pytest.raises(ValueError, match="out of reach"):
        auto_plan(_analysis(), config, 0.05)
    with pytest.raises(ValueError, match="another UNet"):
        auto_plan(_analysis(), _teacher(layers_per_block=3).config, 0.5)
    with pytest.raises(ValueError, match="target_latency"):
        auto_plan(_analysis(), config, 1.0)


def test_assemble_auto_analyses_the_pipeline():
    pipe = build("sd")
    student_pipe = assemble(pipe, target_latency=0.9, prompts=["a red circle", "a blue square"])
    # which units go depends on measured latency shares; any choice removes something and runs
    assert student_pipe.unet.genfast_plan.student_config(pipe.unet.config)
    assert student_pipe(**inputs("sd", steps=2)).images.shape == (1, 32, 32, 3)


# --- the command ---------------------------------------------------------------------------------------
def _cli(*argv):
    parser = argparse.ArgumentParser()
    add_assemble_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["assemble", *argv])
    return args.func(args)


def test_cli_assembles_genfast_mini(tmp_path, capsys):
    assert _cli("--preset", "bk-tiny", "--out", str(tmp_path / "tiny")) == 0
    assert "7.95M -> 2.55M" in capsys.readouterr().out  # the sizes genfast-mini's reference notes measured
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True).unet.mid_block is None
    with pytest.raises(ValueError, match="bk-small"):
        _cli("--preset", "bk-base", "--out", str(tmp_path / "base"))
    with pytest.raises(CLIError, match="--target-latency"):
        _cli("--preset", "auto", "--out", str(tmp_path / "auto"))
    with pytest.raises(CLIError, match="--gri-pooled has no effect"):
        _cli("--preset", "bk-small", "--gri-pooled", "2", "--out", str(tmp_path / "x"))
    assert not (tmp_path / "base").exists() and not (tmp_path / "x").exists()
