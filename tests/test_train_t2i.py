"""genfast train-t2i: genfast-mini's denoiser recipe for any UNet2DConditionModel-compatible denoiser."""

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler

from genfast.training.mini import DENOISER_EMA_DECAY, DENOISER_WEIGHT_DECAY, MAX_GRAD_NORM, MiniRecipe
from genfast.training.t2i import (
    T2IRecipe,
    build_t2i_unet,
    check_t2i_unet,
    lr_at,
    save_t2i_pipeline,
    train_t2i,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# genfast-mini's latents (16x16x4) and text width (128), two stages: trains in a fraction of a second a step
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128, attention_head_dim=4,
                 norm_num_groups=8)


@pytest.fixture(scope="module")
def base():
    from genfast.models import load_mini

    pipe = load_mini()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(seed=0, **changes):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **changes})


def clone_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, module):
    b = module.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def read_log(work):
    return [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- recipe


def test_defaults_are_genfast_minis_denoiser_recipe():
    r, mini = T2IRecipe(), MiniRecipe()
    assert (r.steps, r.batch_size, r.lr, r.warmup, r.p_uncond, r.min_snr_gamma, r.ema_power, r.pool_size, r.seed,
            r.eval_every, r.checkpoint_every) == (
        mini.unet_steps, mini.unet_batch, mini.unet_lr, mini.unet_warmup, mini.p_uncond, mini.min_snr_gamma,
        mini.ema_power, mini.pool_size, mini.seed, mini.eval_every, mini.ckpt_every)
    assert (r.ema_decay, r.weight_decay, r.max_grad_norm) == (DENOISER_EMA_DECAY, DENOISER_WEIGHT_DECAY,
                                                              MAX_GRAD_NORM)
    # the learning rate, set per step, is the one train-mini's scheduler object stepped through
    recipe = T2IRecipe(steps=30, warmup=5)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=recipe.warmup, num_training_steps=recipe.steps)
    for step in range(recipe.steps):
        assert lr_at(recipe, step) == opt.param_groups[0]["lr"], step
        opt.step()
        sched.step()


def test_recipe_refuses_bad_and_ineffective_values():
    for options, field in [(dict(steps=0), "steps"), (dict(batch_size=1.5), "batch_size"), (dict(lr=0), "lr"),
                           (dict(p_uncond=1.0), "p_uncond"), (dict(min_snr_gamma=0), "min_snr_gamma"),
                           (dict(ema_decay=1.0), "ema_decay"), (dict(ema_decay=None), "ema_power"),
                           (dict(pool_size=0), "pool_size"), (dict(mixed_precision="fp8"), "mixed_precision"),
                           (dict(eval_every=0, eval_images=8), "eval_images"), (dict(weight_decay=-1), "weight_decay")]:
        with pytest.raises(ValueError, match=f"T2IRecipe.{field}"):
            T2IRecipe(**options)


# ---------------------------------------------------------------- models


def test_model_specs_build_and_bad_ones_are_refused(tmp_path, base):
    from genfast.models import MINI, asset_path

    unet = build_t2i_unet("unet")
    mini = UNet2DConditionModel.load_config(asset_path(MINI) / "unet")  # the baseline is genfast-mini's UNet
    assert type(unet) is UNet2DConditionModel
    assert all(unet.config[k] == (tuple(v) if isinstance(v, list) else v) for k, v in mini.items() if k[0] != "_")
    check_t2i_unet(unet, base.vae, base.text_encoder)
    tiny_unet().save_config(tmp_path)
    built = build_t2i_unet(str(tmp_path / "config.json"), seed=3)
    assert tuple(built.config.block_out_channels) == (16, 32)
    assert_same_state(clone_state(tiny_unet(seed=3)), built)  # the seed decides the initial weights

    with pytest.raises(ValueError, match="unknown model 'transformer'"):
        build_t2i_unet("transformer")
    with pytest.raises(ValueError, match="does not exist"):
        build_t2i_unet(str(tmp_path / "missing.json"))
    (tmp_path / "dit.json").write_text(json.dumps({"_class_name": "ClassDiT", "num_layers": 2}))
    with pytest.raises(ValueError, match="_class_name 'ClassDiT' is not a text-to-image denoiser"):
        build_t2i_unet(str(tmp_path / "dit.json"))
    with pytest.raises(ValueError, match=r"cross_attention_dim=64 \(needs 128\)"):
        check_t2i_unet(tiny_unet(cross_attention_dim=64), base.vae, base.text_encoder)
    with pytest.raises(ValueError, match=r"sample_size=32 \(needs 16\)"):
        check_t2i_unet(tiny_unet(sample_size=32), base.vae, base.text_encoder)


def test_ascan_specs_build_the_text_model_only():
    from genfast.backbones import AsCANUNet2DConditionModel, ascan_config

    unet = build_t2i_unet("ascan-t2i-mini")
    assert type(unet) is AsCANUNet2DConditionModel
    assert {k: unet.config[k] for k in ascan_config("t2i-mini")} == ascan_config("t2i-mini")
    with pytest.raises(ValueError, match="class-conditional AsCAN config.*train-class --model ascan-mini"):
        build_t2i_unet("ascan-mini")
    with pytest.raises(ValueError, match="unknown AsCAN size 'huge'"):
        build_t2i_unet("ascan-huge")


def test_cross_attention_dim_applies_to_every_spec_or_is_refused(tmp_path):
    text = torch.zeros(1, 3, 64)
    for spec in ("unet", "ascan-t2i-mini"):
        model = build_t2i_unet(spec, cross_attention_dim=64)
        assert model.config.cross_attention_dim == 64
        assert model(torch.zeros(1, 4, 16, 16), torch.tensor([10]), text).sample.shape == (1, 4, 16, 16)
        # the spec's own width (genfast-mini's 128) when unset, with the same initial weights
        assert_same_state(clone_state(build_t2i_unet(spec, seed=1)), build_t2i_unet(spec, seed=1,
                                                                                     cross_attention_dim=128))
    # a config.json: the width fills in where the file leaves it out, and must agree where it sets one
    config = {"_class_name": "AsCANUNet2DConditionModel", "block_out_channels": [16, 32],
              "down_layouts": ["C", "CT"], "mid_layout": "T", "num_attention_heads": 2, "norm_num_groups": 8}
    (tmp_path / "ascan.json").write_text(json.dumps(config))
    assert build_t2i_unet(str(tmp_path / "ascan.json"), cross_attention_dim=64).config.cross_attention_dim == 64
    tiny_unet().save_config(tmp_path)  # sets 128
    assert build_t2i_unet(str(tmp_path / "config.json"), cross_attention_dim=128).config.cross_attention_dim == 128
    with pytest.raises(ValueError, match=r"sets cross_attention_dim=128, but cross_attention_dim=64 was asked for"):
        build_t2i_unet(str(tmp_path / "config.json"), cross_attention_dim=64)
    with pytest.raises(ValueError, match="cross_attention_dim must be a positive int"):
        build_t2i_unet("ascan-t2i-mini", cross_attention_dim=0)


# ---------------------------------------------------------------- training


def test_tiny_run_trains_only_the_unet_and_writes_a_pipeline_that_loads(tmp_path, base):
    unet = tiny_unet()
    before = clone_state(unet)
    encoder, vae = clone_state(base.text_encoder), clone_state(base.vae)
    recipe = T2IRecipe.tiny(eval_every=3, eval_images=2)
    unet, finished = train_t2i(unet, tmp_path / "work", recipe, base=base, progress=False, log=lambda *_: None)
    assert finished and not unet.training
    assert any(not torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # it was trained
    assert_same_state(encoder, base.text_encoder)  # the text encoder is frozen
    assert_same_state(vae, base.vae)
    assert not base.text_encoder.training and all(p.requires_grad for p in base.text_encoder.parameters())
    log = read_log(tmp_path / "work")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"shape_accuracy", "color_accuracy"} <= set(log[-1])  # the in-training evaluation

    out = tmp_path / "pipe"
    out.mkdir()
    (out / "README.md").write_text("hand-written card")
    save_t2i_pipeline(unet, out, recipe, base=base, extra={"model_spec": "tiny"})
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert (out / "README.md").read_text() == "hand-written card"
    assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    assert_same_state(clone_state(unet), pipe.unet)
    assert_same_state(encoder, pipe.text_encoder)
    assert pipe.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    assert pipe.scheduler.config.prediction_type == base.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle", "a blue star"], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    info = json.loads((out / "training.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in unet.parameters())
    assert info["recipe"]["steps"] == recipe.steps and info["model_spec"] == "tiny"


def test_resume_gives_the_same_weights_and_evaluation_does_not_move_them(tmp_path, base, stop_after):
    recipe = T2IRecipe.tiny(steps=4)
    # the uninterrupted run also evaluates: a resumed run without evaluation must still match it
    straight, _ = train_t2i(tiny_unet(), tmp_path / "a", dataclasses.replace(recipe, eval_every=2, eval_images=2),
                            base=base, progress=False, log=lambda *_: None)
    stop_after(2)
    _, finished = train_t2i(tiny_unet(), tmp_path / "b", dataclasses.replace(recipe, max_minutes=1), base=base,
                            progress=False, log=lambda *_: None)
    assert not finished
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-0000002"
    logs = []
    resumed, finished = train_t2i(tiny_unet(seed=1), tmp_path / "b", recipe, base=base, progress=False,
                                  log=logs.append)
    assert finished and logs == ["[train-t2i] resumed at step 2 of 4"]
    assert_same_state(clone_state(straight), resumed)
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]
    with pytest.raises(ValueError, match="batch_size"):  # a resumed run must have the same inputs
        train_t2i(tiny_unet(), tmp_path / "b", dataclasses.replace(recipe, batch_size=2), base=base,
                  progress=False, log=lambda *_: None)


# ---------------------------------------------------------------- the command


def test_an_ascan_pipeline_loads_after_import_genfast_alone(tmp_path, base):
    """diffusers finds a genfast denoiser by the module model_index.json records, among modules already imported:
    a fresh process that imports only genfast (and diffusers) must load the folder."""
    import os
    import subprocess
    import sys

    from genfast.backbones import AsCANUNet2DConditionModel

    torch.manual_seed(0)
    tiny = AsCANUNet2DConditionModel(block_out_channels=(16, 32), down_layouts=("C", "CT"), mid_layout="T",
                                     num_attention_heads=2, norm_num_groups=8)
    tiny.save_config(tmp_path)
    unet = build_t2i_unet(str(tmp_path / "config.json"))
    out = save_t2i_pipeline(unet, tmp_path / "pipe", base=base)
    assert json.loads((out / "model_index.json").read_text())["unet"][0].startswith("genfast.")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "ref.safetensors"))
    code = (f"import genfast, torch\n"
            f"from diffusers import StableDiffusionPipeline\n"
            f"from safetensors.torch import load_file\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({str(out)!r}, local_files_only=True)\n"
            f"ref, got = load_file({str(tmp_path / 'ref.safetensors')!r}), pipe.unet.state_dict()\n"
            f"print(type(pipe.unet).__name__, ref.keys() == got.keys() and all(torch.equal(v, got[k]) "
            f"for k, v in ref.items()))\n")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["AsCANUNet2DConditionModel", "True"]


def _parser():
    from genfast.cli_t2i import add_train_t2i_parser

    parser = argparse.ArgumentParser(prog="genfast")
    add_train_t2i_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_train_t2i_command_writes_a_half_precision_pipeline(tmp_path, capsys):
    tiny_unet().save_config(tmp_path)
    args = _parser().parse_args(["train-t2i", "--model", str(tmp_path / "config.json"), "--steps", "2",
                                 "--batch-size", "2", "--pool-size", "4", "--eval-every", "0", "--no-ema", "--quiet",
                                 "--half", "--out", str(tmp_path / "p")])
    assert args.func(args) == 0
    assert "wrote the StableDiffusionPipeline" in capsys.readouterr().out
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert tuple(pipe.unet.config.block_out_channels) == (16, 32)
    assert (tmp_path / "p.work" / "checkpoints").is_dir()


def test_train_t2i_command_refuses_bad_options(tmp_path):
    args = _parser().parse_args(["train-t2i", "--model", "unet", "--eval-every", "0", "--eval-images", "8",
                                 "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="eval_images has no effect"):
        args.func(args)
    for bad in (["--ema", "0.99", "--no-ema"], ["--steps", "0"], ["--lr", "0"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["train-t2i", "--model", "unet", "--out", "x", *bad])
