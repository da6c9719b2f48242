"""`genfast train-var`: the tokenizer and VAR transformer trainers, their exact resume, the command, and the
quantizer's default float layers of a VARModel."""

import argparse
import dataclasses
import json

import pytest
import torch

import genfast
from genfast.generators import MultiScaleVQModel, VARModel, VARPipeline
from genfast.training.checkpoint import state_hash
from genfast.training.var_train import VARRecipe, build_var, token_pool, train_var, train_var_generator
from genfast.training.vq_train import (
    VQRecipe,
    images_at,
    load_tokenizer,
    restart_dead_codes,
    tokenizer_quality,
    train_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = dict(sample_size=64, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4, vocab_size=16,
           patch_nums=(1, 2, 4, 8), share_quant_resi=2, mid_block_add_attention=False)
NET = dict(width=16, depth=2, num_heads=2)
QUIET = dict(progress=False, log=lambda *_: None)


def tiny_tokenizer(seed=0):
    torch.manual_seed(seed)
    return MultiScaleVQModel(**TOK)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny end-to-end run: (pipeline folder, work folder)."""
    root = tmp_path_factory.mktemp("var")
    out = train_var_generator(NET, root / "pipe", root / "work", VARRecipe.tiny(), VQRecipe.tiny(),
                              tokenizer_config=TOK, **QUIET)
    return out, root / "work"


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize(("cls", "options", "field"), [
    (VQRecipe, dict(steps=0), "steps"), (VQRecipe, dict(lr=0), "lr"), (VQRecipe, dict(recon_loss="l2"), "recon_loss"),
    (VQRecipe, dict(vq_weight=0), "vq_weight"), (VQRecipe, dict(restart_every=-1), "restart_every"),
    (VQRecipe, dict(data_init=1), "data_init"), (VQRecipe, dict(ema_power=0.75), "ema_power"),
    (VQRecipe, dict(heldout_images=0), "heldout_images"), (VQRecipe, dict(mixed_precision="fp8"), "mixed_precision"),
    (VARRecipe, dict(batch_size=1.5), "batch_size"), (VARRecipe, dict(label_dropout=1.0), "label_dropout"),
    (VARRecipe, dict(label_smoothing=1.0), "label_smoothing"), (VARRecipe, dict(ema_decay=None), "ema_power"),
    (VARRecipe, dict(eval_images=8), "eval_images"), (VARRecipe, dict(pool_size=0), "pool_size"),
])
def test_bad_recipe_values_name_the_field(cls, options, field):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field}"):
        cls(**options)


def test_the_transformer_budget_is_train_class_s():
    from genfast.training.class_cond import ClassCondRecipe

    var, dit = VARRecipe(), ClassCondRecipe()
    for field in ("steps", "batch_size", "warmup", "label_dropout", "ema_decay", "ema_power", "pool_size"):
        assert getattr(var, field) == getattr(dit, field), field


# ---------------------------------------------------------------- end to end

def test_a_tiny_run_writes_a_pipeline_that_loads_and_samples(trained):
    out, work = trained
    pipe = VARPipeline.from_pretrained(out)
    tokenizer, info = load_tokenizer(work / "tokenizer")
    _same_weights(pipe.vqvae, tokenizer)  # the pipeline carries the trained tokenizer
    assert load_tokenizer(out)[0].config.vocab_size == TOK["vocab_size"]  # a pipeline folder works as --tokenizer
    images = pipe(pipe.get_label_ids(["red circle", "blue star"]), guidance_scale=3.0, top_k=4, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    record = json.loads((out / "training.json").read_text())
    quality = record["tokenizer"]["quality"]
    assert quality == info["quality"] == tokenizer_quality(tokenizer, quality["images"])  # recomputable
    assert 0 < quality["codebook_usage"] <= 1 and quality["images"] == VQRecipe.tiny().heldout_images
    assert record["recipe"]["steps"] == VARRecipe.tiny().steps and record["model"] == "VARModel"
    # a rerun finds both stages finished: nothing is trained again, the same weights are written
    before = VARPipeline.from_pretrained(out)
    again = train_var_generator(NET, out, work, VARRecipe.tiny(), VQRecipe.tiny(), tokenizer_config=TOK, **QUIET)
    _same_weights(VARPipeline.from_pretrained(again).transformer, before.transformer)


def test_tokenizer_resume_gives_the_same_weights(tmp_path, stop_after):
    recipe = VQRecipe.tiny(steps=4)  # restart_every=2: a dead-code restart at step 2, right after the stop
    straight, _ = train_tokenizer(tiny_tokenizer(), tmp_path / "a", recipe, **QUIET)
    stop_after(2)
    _, finished = train_tokenizer(tiny_tokenizer(), tmp_path / "b", dataclasses.replace(recipe, max_minutes=1),
                                  **QUIET)
    assert not finished and (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-0000002"
    logs = []
    resumed, finished = train_tokenizer(tiny_tokenizer(seed=5), tmp_path / "b", recipe, progress=False,
                                        log=logs.append)
    assert finished and logs == ["[train-var tokenizer] resumed at step 2 of 4"]
    _same_weights(straight, resumed)


def test_transformer_resume_gives_the_same_weights_and_keeps_the_tokenizer_frozen(tmp_path, stop_after):
    tokenizer = tiny_tokenizer()
    frozen = state_hash(tokenizer)
    recipe = VARRecipe.tiny(steps=4)
    straight, _ = train_var(build_var(NET, tokenizer), tokenizer, tmp_path / "a", recipe, **QUIET)
    stop_after(2)
    _, finished = train_var(build_var(NET, tokenizer), tokenizer, tmp_path / "b",
                            dataclasses.replace(recipe, max_minutes=1), **QUIET)
    assert not finished
    resumed, finished = train_var(build_var(NET, tokenizer, seed=3), tokenizer, tmp_path / "b", recipe, **QUIET)
    assert finished
    _same_weights(straight, resumed)
    lines = [[json.loads(x)["loss"] for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
             for d in "ab"]
    assert lines[0] == lines[1] and len(lines[0]) == 4
    # the tokenizer was neither trained nor left trainable, and a changed tokenizer cannot resume a run
    assert state_hash(tokenizer) == frozen and not any(p.requires_grad for p in tokenizer.parameters())
    with torch.no_grad():
        tokenizer.embedding.weight.add_(1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        train_var(build_var(NET, tokenizer), tokenizer, tmp_path / "b", dataclasses.replace(recipe, steps=6), **QUIET)


def test_token_pool_is_the_tokenizers_tokens_and_is_keyed_by_its_weights(tmp_path):
    tokenizer = tiny_tokenizer().eval()
    recipe = VARRecipe.tiny(pool_size=5)
    pool = token_pool(tokenizer, recipe, tmp_path)
    from genfast.data.classes import ClassShapesDataset

    ds = ClassShapesDataset(5, recipe.seed)
    direct = tokenizer.encode_to_scales(torch.stack([ds[i][0] for i in range(5)]))
    assert torch.equal(pool.long(), torch.cat([t.flatten(1) for t in direct], dim=1))
    with torch.no_grad():
        tokenizer.embedding.weight.mul_(-1)  # other codes: the cached pool must not be read back
    assert torch.equal(token_pool(tokenizer, recipe, tmp_path), token_pool(tokenizer, recipe, tmp_path / "fresh"))


def test_dead_codes_move_onto_batch_latents_and_used_codes_stay():
    tokenizer = tiny_tokenizer().eval()
    images = images_at(VQRecipe.tiny(), 0)
    with torch.no_grad():
        tokenizer.embedding.weight[8:] = 1e6  # rows 8.. are never the nearest: dead
        used_before = tokenizer.embedding.weight[:8].clone()
        tokens = tokenizer.encode_to_scales(images)
        used = torch.unique(torch.cat([t.flatten() for t in tokens]))
    moved = restart_dead_codes(tokenizer, images, torch.Generator().manual_seed(0))
    assert moved == 16 - len(used)
    weight = tokenizer.embedding.weight
    assert torch.equal(weight[used], used_before[used])
    assert (weight.abs() < 1e3).all()  # every dead row now holds a latent row
    with torch.no_grad():
        after = torch.unique(torch.cat([t.flatten() for t in tokenizer.encode_to_scales(images)]))
    assert len(after) > len(used)


def test_a_tokenizer_for_other_images_is_refused(tmp_path):
    small = MultiScaleVQModel(**{**TOK, "sample_size": 32, "patch_nums": (1, 2, 4)})
    with pytest.raises(ValueError, match="sample_size=64"):
        train_tokenizer(small, tmp_path, VQRecipe.tiny(), **QUIET)


def test_evaluation_logs_class_accuracy_every_n_steps(tmp_path):
    tokenizer = tiny_tokenizer()
    recipe = VARRecipe.tiny(steps=2, eval_every=2, eval_images=4)
    logs = []
    train_var(build_var(NET, tokenizer), tokenizer, tmp_path, recipe, progress=False, log=logs.append)
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert "class_accuracy" not in lines[0] and 0 <= lines[1]["class_accuracy"] <= 1
    assert logs == [f"[train-var] step 2: class accuracy {lines[1]['class_accuracy']}"]


# ---------------------------------------------------------------- the command

def _parser():
    from genfast.cli_var import add_train_var_parser

    parser = argparse.ArgumentParser(prog="genfast")
    add_train_var_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_train_var_command_reuses_a_tokenizer_and_writes_a_half_pipeline(trained, tmp_path, capsys):
    _, work = trained
    args = _parser().parse_args(["train-var", "--size", "0.5M", "--tokenizer", str(work / "tokenizer"), "--steps", "2",
                                 "--batch-size", "2", "--pool-size", "4", "--no-ema", "--quiet", "--half",
                                 "--out", str(tmp_path / "p")])
    assert args.func(args) == 0
    assert "wrote the VARPipeline" in capsys.readouterr().out
    from safetensors.torch import load_file

    stored = {part: load_file(tmp_path / "p" / part / "diffusion_pytorch_model.safetensors")
              for part in ("transformer", "vqvae")}
    assert {t.dtype for part in stored.values() for t in part.values()} == {torch.float16}
    pipe = VARPipeline.from_pretrained(tmp_path / "p")  # diffusers reads fp16 weights back as fp32
    assert pipe.transformer.config.width == 64
    reused, _ = load_tokenizer(work / "tokenizer")
    for k, v in reused.state_dict().items():  # the reused tokenizer, rounded to fp16
        assert torch.equal(pipe.vqvae.state_dict()[k], v.half().float()), k
    images = pipe([3], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert not (tmp_path / "p.work" / "tokenizer.work").exists()  # no tokenizer was trained
    record = json.loads((tmp_path / "p" / "training.json").read_text())
    assert record["tokenizer"]["source"] == str(work / "tokenizer") and record["size"] == "0.5M"


def test_train_var_command_refuses_options_without_effect(tmp_path):
    args = _parser().parse_args(["train-var", "--size", "2M", "--tokenizer", "x", "--tokenizer-lr", "1e-3",
                                 "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="--tokenizer-lr has no effect with --tokenizer"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parser().parse_args(["train-var", "--size", "2M", "--tokenizer", "x", "--tokenizer-steps", "5", "--out", "p"])
    args = _parser().parse_args(["train-var", "--size", "2M", "--eval-images", "8", "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="eval_images"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parser().parse_args(["train-var", "--size", "3M", "--out", "p"])
    with pytest.raises(ValueError, match="no effect when a trained tokenizer is reused"):
        train_var_generator("2M", tmp_path / "p", tmp_path / "w", tokenizer_recipe=VQRecipe(), tokenizer="x", **QUIET)


# ---------------------------------------------------------------- quantization

def test_quantize_keeps_the_token_and_logit_layers_of_a_var_in_float():
    from genfast.quant.layers import is_quantized

    model = VARModel(**{**NET, "vocab_size": 16, "codebook_dim": 4, "patch_nums": (1, 2, 4, 8)})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    handle = genfast.quantize(model, weights="int8", kernel="dequantize")
    try:
        in_float = {n for n, m in layers.items() if not is_quantized(m)}
        assert in_float == {"word_embed", "head", "head_adaLN.1"}
        assert set(handle.layers) == set(layers) - in_float
    finally:
        handle.remove()
