"""genfast.assembly.analyze and `genfast analyze` on tiny SD- and SDXL-shaped pipelines."""

import argparse

import pytest
import torch
from tiny_pipelines import build, inputs

from genfast.assembly.analyze import Analysis, NotAUNetPipelineError, analyze
from genfast.cli_analyze import add_analyze_parser, cmd_analyze

PROMPTS = ["a red circle", "a blue square", "a green star"]
PLANTED = "down_blocks.1.attentions.0"


def _run(pipe, **kw):
    kw = dict(num_inference_steps=4, timesteps=2, seed=0, progress=False, batch_size=2) | kw
    return analyze(pipe, PROMPTS, **kw)


def _unet_output(unet):
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16, generator=g),
                                      "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text, **extra).sample


def _no_hooks_left(unet):
    for name, m in unet.named_modules():
        assert not hasattr(m, "_diffusers_hook"), name
        assert "forward" not in m.__dict__, name
        assert not (m._forward_hooks or m._forward_pre_hooks), name


@pytest.fixture(scope="module")
def sd(one_thread):
    pipe = build("sd")
    unet = pipe.unet
    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    before_out = _unet_output(unet)
    analysis = _run(pipe)
    return pipe, analysis, before_state, before_out


@pytest.fixture(scope="module")
def planted(one_thread):
    """An attention whose proj_out is zero adds nothing to its residual: bypassing it changes nothing."""
    pipe = build("sd")
    proj = pipe.unet.get_submodule(PLANTED).proj_out
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.zero_()
    return _run(pipe)


def test_unet_bit_identical_after(sd):
    pipe, _, before_state, before_out = sd
    after = pipe.unet.state_dict()
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    assert torch.equal(_unet_output(pipe.unet), before_out)
    _no_hooks_left(pipe.unet)
    assert not pipe.unet.training


def test_units_and_captures(sd):
    _, a, _, _ = sd
    names = {u.name for u in a.units}
    for name, kind in [("down_blocks.0.resnets.0", "resnet"), ("down_blocks.0.attentions.0", "attention"),
                       ("down_blocks.0.layers.0", "layer"), ("mid_block", "block"), ("down_blocks.2", "stage"),
                       ("up_blocks.2.layers.1", "layer"), ("up_blocks.0.resnets.1", "resnet")]:
        assert a.unit(name).kind == kind
    assert "down_blocks.2.layers.0" not in names  # a DownBlock2D has no attention to pair with
    assert a.steps == [0, 3] and len(a.timesteps) == 2 and a.timesteps[0] > a.timesteps[1]
    assert a.meta["captures"] == 2 * 2  # 3 prompts in batches of 2 -> 2 calls x 2 steps
    for u in a.units:
        if u.kind == "stage":
            assert u.output_change is None and u.per_timestep is None
        else:
            assert len(u.per_timestep) == 2
            assert u.output_change == pytest.approx(sum(u.per_timestep) / 2)  # equal captures per step
    with pytest.raises(KeyError, match="no unit"):
        a.unit("down_blocks.9")


def test_planted_unit_ranks_first(planted):
    first = planted.ranked()[0]
    assert first.name == PLANTED
    assert first.output_change <= 1e-6
    assert all(v <= 1e-6 for v in first.per_timestep)
    normal = planted.unit("down_blocks.1.resnets.0")
    assert normal.output_change > 1e-3
    # bypassing the planted pair is exactly bypassing its resnet
    assert planted.unit("down_blocks.1.layers.0").output_change == pytest.approx(normal.output_change, rel=1e-5)
    ranked = [u.output_change for u in planted.ranked()]
    assert ranked == sorted(ranked)


def test_param_shares_add_up(sd):
    pipe, a, _, _ = sd
    unet = pipe.unet
    total = sum(p.numel() for p in unet.parameters())
    disjoint = [u for u in a.units if u.kind in ("resnet", "attention")]
    prefixes = tuple(u.name + "." for u in disjoint)
    rest = sum(p.numel() for n, p in unet.named_parameters() if not n.startswith(prefixes))
    assert sum(u.params for u in disjoint) + rest == total
    assert sum(u.param_share for u in disjoint) + rest / total == pytest.approx(1.0)
    for u in a.units:
        if u.kind != "layer":
            assert u.params == sum(p.numel() for p in unet.get_submodule(u.name).parameters())
        else:
            j = u.name.rsplit(".", 1)[1]
            stage = u.name.rsplit(".", 2)[0]
            parts = [a.unit(f"{stage}.resnets.{j}"), a.unit(f"{stage}.attentions.{j}")]
            assert u.params == sum(p.params for p in parts)
            assert u.latency_share == pytest.approx(sum(p.latency_share for p in parts))


def test_latency_nesting(sd):
    """Nested modules are timed inside their parents' intervals (structure, not speed)."""
    _, a, _, _ = sd
    for u in a.units:
        assert 0.0 <= u.latency_share <= 1.0
        if u.kind in ("resnet", "attention", "layer") and not u.name.startswith("mid_block"):
            stage = a.unit(".".join(u.name.split(".")[:2]))
            assert u.latency_share <= stage.latency_share
    assert sum(a.unit(f"{s}_blocks.{i}").latency_share for s in ("down", "up") for i in range(3)) \
        + a.unit("mid_block").latency_share <= 1.0


def test_sdxl_added_conditioning(one_thread):
    pipe = build("sdxl")
    before = _unet_output(pipe.unet)
    a = _run(pipe, timesteps=1)
    assert a.steps == [0]
    assert {u.kind for u in a.units} == {"resnet", "attention", "layer", "block", "stage"}
    assert all(u.output_change > 0 for u in a.ranked())
    assert torch.equal(_unet_output(pipe.unet), before)
    _no_hooks_left(pipe.unet)


def test_save_load_round_trip(sd, tmp_path):
    _, a, _, _ = sd
    a.save(tmp_path / "an")
    for name in ("analysis.json", "analysis.md", "heatmap.png"):
        assert (tmp_path / "an" / name).stat().st_size > 0
    back = Analysis.load(tmp_path / "an")
    assert back == a
    assert Analysis.load(tmp_path / "an" / "analysis.json") == a
    md = (tmp_path / "an" / "analysis.md").read_text()
    assert "| rank | unit | kind | params | params share | latency share | output change |" in md
    assert f"| 1 | {a.ranked()[0].name} |" in md
    with pytest.raises(FileNotFoundError, match="analysis.json"):
        Analysis.load(tmp_path)


def test_errors(sd):
    pipe = sd[0]
    with pytest.raises(ValueError, match="prompts is empty"):
        analyze(pipe, [], progress=False)
    with pytest.raises(ValueError, match="timesteps must be"):
        analyze(pipe, PROMPTS, num_inference_steps=4, timesteps=5, progress=False)
    with pytest.raises(ValueError, match="timesteps must be"):
        analyze(pipe, PROMPTS, num_inference_steps=4, timesteps=0, progress=False)
    with pytest.raises(ValueError, match="call_kwargs may not set"):
        analyze(pipe, PROMPTS, num_inference_steps=4, timesteps=2, progress=False,
                call_kwargs={"generator": None})
    with pytest.raises(NotAUNetPipelineError, match="UNet2DConditionModel.*DiTPipeline"):
        analyze(build("dit"), PROMPTS, num_inference_steps=4, timesteps=2, progress=False)
    _no_hooks_left(pipe.unet)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="genfast")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["analyze", *argv])


def test_cli_writes_the_three_files(one_thread, tmp_path, capsys):
    folder = tmp_path / "pipe"
    build("sd").save_pretrained(folder)
    out = tmp_path / "out"
    args = _parse([str(folder), "--prompt", "a red circle", "--num-prompts", "2", "--steps", "3",
                   "--timesteps", "2", "--out", str(out)])
    assert cmd_analyze(args) == 0
    for name in ("analysis.json", "analysis.md", "heatmap.png"):
        assert (out / name).is_file()
    a = Analysis.load(out)
    assert a.prompts == ["a red circle"] * 2 and a.steps == [0, 2]
    assert "wrote" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    with pytest.raises(ValueError, match="timesteps must be"):
        cmd_analyze(_parse(["--steps", "3", "--timesteps", "4", "--out", str(tmp_path / "o")]))
    with pytest.raises(SystemExit):
        _parse(["--timesteps", "0"])
    empty = tmp_path / "p.txt"
    empty.write_text("\n")
    from genfast.cli import CLIError

    with pytest.raises(CLIError, match="no prompts"):
        cmd_analyze(_parse(["--prompts-file", str(empty), "--out", str(tmp_path / "o")]))


def test_planted_resnet_uses_its_conv_shortcut(one_thread):
    """A resnet whose residual branch is zero is exactly its shortcut: here conv_shortcut (64 -> 32 channels)."""
    pipe = build("sd")
    resnet = pipe.unet.get_submodule("up_blocks.1.resnets.0")
    assert resnet.conv_shortcut is not None
    with torch.no_grad():
        resnet.conv2.weight.zero_()
        resnet.conv2.bias.zero_()
    a = _run(pipe)
    assert a.ranked()[0].name == "up_blocks.1.resnets.0"
    assert a.ranked()[0].output_change <= 1e-6


@pytest.mark.parametrize("kind", ["img2img", "controlnet", "inpaint"])
def test_other_sd_pipelines(one_thread, kind):
    """Image-conditioned pipelines: their extra call arguments pass through; img2img runs fewer steps."""
    pipe = build(kind)
    extra = {k: v for k, v in inputs(kind, batch=2).items()
             if k not in ("prompt", "num_inference_steps", "guidance_scale", "generator", "output_type")}
    before = _unet_output(pipe.unet) if kind != "inpaint" else None
    a = analyze(pipe, PROMPTS[:2], num_inference_steps=4, timesteps=2, progress=False, call_kwargs=extra)
    assert len(a.ranked()) == 25 and all(u.output_change > 0 for u in a.ranked())
    assert a.steps == ([0, 2] if kind == "img2img" else [0, 3])  # strength 0.75 of 4 steps: 3 run
    if before is not None:
        assert torch.equal(_unet_output(pipe.unet), before)
    _no_hooks_left(pipe.unet)
    if kind == "img2img":
        with pytest.raises(ValueError, match="runs only 3 denoising steps"):
            analyze(pipe, PROMPTS[:2], num_inference_steps=4, timesteps=4, progress=False, call_kwargs=extra)
        _no_hooks_left(pipe.unet)
