"""The class-conditional side: class shapes data, DiTPipeline around any denoiser, the shared trainer."""

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline

from genfast.data import classes
from genfast.data.classes import (
    NUM_CLASSES,
    ClassShapesDataset,
    class_id,
    class_names,
    class_of,
    eval_class_labels,
    render_class_batch,
)
from genfast.data.shapes import SHAPE_COLORS, SHAPES, to_tensor
from genfast.eval.prompt_accuracy import HELDOUT_SEED
from genfast.pipelines.class_conditional import (
    NULL_CLASS_ID,
    ClassDiT,
    class_accuracy,
    count_parameters,
    dit_config,
    keep_labels,
    label_ids,
    make_pipeline,
    map_null_labels,
    mini_vae,
)
from genfast.training.class_cond import (
    ClassCondRecipe,
    build_denoiser,
    check_denoiser,
    save_class_pipeline,
    train_class_conditional,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluator():
    from genfast.models import load_evaluator

    return load_evaluator()


@pytest.fixture(scope="module")
def vae():
    return mini_vae()


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    return ClassDiT(**dit_config(20_000))


# ---------------------------------------------------------------- data

def test_class_ids_round_trip():
    names = class_names()
    assert len(names) == len(set(names)) == NUM_CLASSES == len(SHAPES) * len(SHAPE_COLORS)
    for cid, name in enumerate(names):
        colour, shape = name.split()
        assert class_id(shape, colour) == cid
        assert class_of(cid) == (shape, colour)
    assert class_id("circle", "red") == 0 and class_id(SHAPES[1], "red") == len(SHAPE_COLORS)
    assert classes.HELDOUT_SEED == HELDOUT_SEED
    with pytest.raises(ValueError, match="unknown shape 'hexagon'.*circle"):
        class_id("hexagon", "red")
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        class_id("circle", "pink")
    with pytest.raises(ValueError, match=f"0..{NUM_CLASSES - 1}"):
        class_of(NUM_CLASSES)


def test_dataset_is_balanced_deterministic_and_never_hides_the_shape():
    ds = ClassShapesDataset(2 * NUM_CLASSES, seed=HELDOUT_SEED)
    assert [ds[i][1] for i in range(len(ds))] == eval_class_labels(len(ds))
    assert torch.equal(ds[5][0], ClassShapesDataset(10, seed=HELDOUT_SEED)[5][0])
    assert not torch.equal(ds[5][0], ClassShapesDataset(10, seed=0)[5][0])  # the seed splits train / held out
    for i in range(len(ds)):
        _, cid, scene = ds.sample(i)
        assert (scene.shapes[0].shape, scene.shapes[0].color) == class_of(cid)
        assert scene.background != scene.shapes[0].color
    with pytest.raises(ValueError, match="length"):
        ClassShapesDataset(0)


def test_evaluator_reads_the_class_of_the_data_set(evaluator):
    # measured: 2048 of 2048 images (seeds 0 and 1) classified right on both heads
    images, labels = render_class_batch(64, seed=HELDOUT_SEED)
    acc = class_accuracy(to_tensor(images), labels, evaluator)
    assert acc["class"] >= 0.95, acc
    wrong_colour = (labels // len(SHAPE_COLORS)) * len(SHAPE_COLORS) + (labels + 1) % len(SHAPE_COLORS)
    acc = class_accuracy(to_tensor(images), wrong_colour, evaluator)
    assert acc["shape"] >= 0.95 and acc["color"] <= 0.05 and acc["class"] <= 0.05, acc
    with pytest.raises(ValueError, match="one class id per image"):
        class_accuracy(to_tensor(images), labels[:3], evaluator)


# ---------------------------------------------------------------- the DiT baseline and the pipeline

def test_null_class_ids_follow_the_contract():
    k = NUM_CLASSES
    assert map_null_labels(torch.tensor([0, k - 1, k, NULL_CLASS_ID]), k).tolist() == [0, k - 1, k, k]
    for bad in (-1, k + 1, 999, 1001):
        with pytest.raises(ValueError, match=f"0..{k - 1}.*{NULL_CLASS_ID}"):
            map_null_labels(torch.tensor([3, bad]), k)
    model = tiny_dit().train()
    with torch.no_grad():
        for block in model.transformer_blocks:  # adaLN-Zero starts at 0: make the label matter
            torch.nn.init.normal_(block.norm1.linear.weight, std=0.5)
        x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
        null = model(x, t, torch.tensor([NULL_CLASS_ID, NULL_CLASS_ID])).sample
        assert torch.equal(null, model(x, t, torch.tensor([k, k])).sample)
        assert not torch.equal(null, model(x, t, torch.tensor([0, 0])).sample)
        # in train mode too the output is a function of the labels: diffusers' per-block dropout is off
        assert torch.equal(model(x, t, torch.tensor([3, 4])).sample, model(x, t, torch.tensor([3, 4])).sample)
        assert torch.equal(model(x, torch.tensor(500), torch.tensor([3, 4])).sample,
                           model(x, t, torch.tensor([3, 4])).sample)


@pytest.mark.parametrize("target", [200_000, 2_000_000])
def test_dit_config_meets_its_parameter_target(target):
    config = dit_config(target)
    with torch.device("meta"):
        model = ClassDiT(**config)
    assert abs(count_parameters(model) - target) <= 0.05 * target
    assert (config["sample_size"], config["in_channels"], config["out_channels"]) == (16, 4, 8)
    # K + 1 label rows per block: the classes and the null row, nothing unused
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == NUM_CLASSES + 1
    with pytest.raises(ValueError, match="params_target"):
        dit_config(10)
    pinned = dit_config(target, layers=3)
    with torch.device("meta"):
        count = count_parameters(ClassDiT(**pinned))
    assert pinned["num_layers"] == 3 and abs(count - target) <= 0.15 * target  # width steps of 16: coarser


def test_check_denoiser_refuses_a_model_that_does_not_fit():
    assert check_denoiser(tiny_dit()) == 8
    wrong = ClassDiT(**{**dit_config(20_000), "sample_size": 8})
    with pytest.raises(ValueError, match="sample_size=16"):
        check_denoiser(wrong)
    few = ClassDiT(**{**dit_config(20_000), "num_embeds_ada_norm": 4})  # fewer label rows than classes
    with pytest.raises(ValueError, match="0..3"):
        check_denoiser(few)
    with pytest.raises(TypeError, match="config lacks"):
        check_denoiser(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- training

def test_recipe_refuses_bad_and_ineffective_values():
    for options, field in [(dict(steps=0), "steps"), (dict(batch_size=1.5), "batch_size"), (dict(lr=0), "lr"),
                           (dict(label_dropout=1.0), "label_dropout"), (dict(min_snr_gamma=0), "min_snr_gamma"),
                           (dict(ema_decay=1.0), "ema_decay"), (dict(ema_decay=None), "ema_power"),
                           (dict(pool_size=0), "pool_size"), (dict(mixed_precision="fp8"), "mixed_precision"),
                           (dict(eval_images=8), "eval_images"), (dict(weight_decay=-1), "weight_decay")]:
        with pytest.raises(ValueError, match=f"ClassCondRecipe.{field}"):
            ClassCondRecipe(**options)


def test_tiny_dit_trains_saves_and_samples_by_label_name(tmp_path, vae):
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = ClassCondRecipe.tiny()
    model, finished = train_class_conditional(model, tmp_path / "work", recipe, vae=vae, progress=False,
                                              log=lambda *_: None)
    assert finished and not model.training
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # it was trained
    out = save_class_pipeline(model, tmp_path / "pipe", recipe, vae=vae)

    pipe = DiTPipeline.from_pretrained(out, local_files_only=True)
    assert isinstance(pipe.transformer, ClassDiT)
    for k, v in model.state_dict().items():
        assert torch.equal(v, pipe.transformer.state_dict()[k]), k
    ids = pipe.get_label_ids(["red circle", "blue star"])
    assert ids == [class_id("circle", "red"), class_id("star", "blue")] == label_ids(pipe, ["red circle", "blue star"])
    assert label_ids(pipe, "red circle") == [0]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(ids, guidance_scale=4.0, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    # DiTPipeline does not record the labels it was built with: keep_labels puts them back for a re-save
    keep_labels(pipe).save_pretrained(tmp_path / "again")
    assert DiTPipeline.from_pretrained(tmp_path / "again", local_files_only=True).labels == pipe.labels
    info = json.loads((out / "training.json").read_text())
    assert info["parameters"] == count_parameters(model) and info["recipe"]["steps"] == recipe.steps


def test_latent_pool_is_read_back_only_under_the_same_data_and_vae(tmp_path, vae):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from genfast.training.class_cond import latent_pool

    recipe = ClassCondRecipe.tiny(pool_size=4)
    first = latent_pool(vae, recipe, tmp_path)
    path = tmp_path / "latent_pool.safetensors"
    with safe_open(str(path), "pt") as f:
        key = f.metadata()["key"]
    save_file({"latents": torch.zeros_like(first)}, str(path), metadata={"key": key})  # a marker under the key
    assert torch.equal(latent_pool(vae, recipe, tmp_path), torch.zeros_like(first))  # read back, not re-encoded
    other = dataclasses.replace(recipe, seed=1)  # other data: encoded again, and stored under its own key
    assert torch.equal(latent_pool(vae, other, tmp_path / "fresh"), latent_pool(vae, other, tmp_path))
    assert not torch.equal(latent_pool(vae, other, tmp_path), torch.zeros_like(first))
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["latent_pool.safetensors"]  # no temp file left


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, vae, stop_after):
    recipe = ClassCondRecipe.tiny(steps=4)
    straight, _ = train_class_conditional(tiny_dit(), tmp_path / "a", recipe, vae=vae, progress=False,
                                          log=lambda *_: None)
    stop_after(2)
    _, finished = train_class_conditional(tiny_dit(), tmp_path / "b", dataclasses.replace(recipe, max_minutes=1),
                                          vae=vae, progress=False, log=lambda *_: None)
    assert not finished
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-0000002"
    logs = []
    resumed, finished = train_class_conditional(tiny_dit(seed=1), tmp_path / "b", recipe, vae=vae, progress=False,
                                                log=logs.append)
    assert finished and logs == ["[train-class] resumed at step 2 of 4"]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    lines = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [json.loads(x)["loss"] for x in
                                          (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    with pytest.raises(ValueError, match="batch_size"):  # a resumed run must have the same inputs
        train_class_conditional(tiny_dit(), tmp_path / "b", dataclasses.replace(recipe, batch_size=2), vae=vae,
                                progress=False, log=lambda *_: None)


# ---------------------------------------------------------------- the command

def _parser():
    from genfast.cli_class import add_train_class_parser

    parser = argparse.ArgumentParser(prog="genfast")
    add_train_class_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_train_class_command_writes_a_pipeline(tmp_path, capsys):
    config = tmp_path / "dit.json"
    tiny_dit().save_config(tmp_path)  # a config.json, as save_pretrained writes it
    (tmp_path / "config.json").rename(config)
    args = _parser().parse_args(["train-class", "--model", str(config), "--steps", "2", "--batch-size", "2",
                                 "--pool-size", "4", "--no-ema", "--quiet", "--half", "--out", str(tmp_path / "p")])
    assert args.func(args) == 0
    assert "wrote the DiTPipeline" in capsys.readouterr().out
    pipe = DiTPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    assert pipe.transformer.config.num_layers == tiny_dit().config.num_layers
    assert (tmp_path / "p.work" / "checkpoints").is_dir()


def test_train_class_command_refuses_options_without_effect(tmp_path):
    with pytest.raises(ValueError, match="params_target"):
        build_denoiser("lamamba-mini", params_target=1_000_000)
    with pytest.raises(ValueError, match="layers"):
        build_denoiser("lamamba-mini", layers=4)
    with pytest.raises(ValueError, match="unknown model 'transformer'"):
        build_denoiser("transformer")
    args = _parser().parse_args(["train-class", "--model", "dit", "--eval-images", "8", "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="eval_images"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parser().parse_args(["train-class", "--model", "dit", "--plain-loss", "--min-snr-gamma", "5",
                              "--out", "x"])


def test_lamamba_mini_builds_to_the_contract():
    model = build_denoiser("lamamba-mini")
    assert check_denoiser(model) == 8
    pipe = make_pipeline(model.eval())
    assert pipe.get_label_ids(["green square"]) == [class_id("square", "green")]


def test_a_quantized_class_pipeline_keeps_its_labels(tmp_path, vae):
    """A DiTPipeline folder written by save_quantized loads with its class names (load_pipeline records them,
    so the folder it saves has them too)."""
    import genfast
    from genfast.quant.saving import load_pipeline

    pipe = make_pipeline(tiny_dit(), vae)
    genfast.quantize(pipe, weights="int8")
    genfast.save_quantized(pipe, tmp_path / "q")
    loaded = load_pipeline(tmp_path / "q")
    assert loaded.labels == pipe.labels
    genfast.save_quantized(loaded, tmp_path / "q2")
    assert load_pipeline(tmp_path / "q2").labels == pipe.labels


def test_heldout_class_images_are_each_classes_next_heldout_render():
    """Image i is the k-th held-out item of its class (k: earlier images of that class in the list): the balanced
    list reads items 0..n-1, and a repeated list gives a second set of the same classes, disjoint from the first."""
    from genfast.data.classes import heldout_class_images

    ds = ClassShapesDataset(3 * NUM_CLASSES, seed=HELDOUT_SEED)
    got = heldout_class_images([23, 0, 23, 0, 23])
    assert got.dtype == torch.uint8 and got.shape == (5, 3, 64, 64)
    assert all(np.array_equal(g.permute(1, 2, 0).numpy(), ds.sample(j)[0]) for g, j in zip(got, (23, 0, 47, 24, 71)))
    labels = eval_class_labels(NUM_CLASSES + 2)
    both = heldout_class_images(labels + labels)
    assert all(np.array_equal(both[i].permute(1, 2, 0).numpy(), ds.sample(i)[0]) for i in range(len(labels)))
    firsts, seconds = both[:len(labels)], both[len(labels):]
    assert not any(torch.equal(a, b) for a in firsts for b in seconds)
    with pytest.raises(ValueError, match=f"0..{NUM_CLASSES - 1}"):
        heldout_class_images([0, NUM_CLASSES])
    with pytest.raises(ValueError, match="at least one class id"):
        heldout_class_images([])
