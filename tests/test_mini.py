"""The embedded genfast-mini and its evaluator, as a user loads them: offline, from assets/."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from genfast.data.shapes import HEADS, grammar_words, render_batch, to_tensor
from genfast.eval.prompt_accuracy import HELDOUT_SEED, eval_prompts, prompt_accuracy
from genfast.models import ASSETS, asset_path, load_evaluator, load_mini

MINI = ASSETS / "genfast-mini"


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(MINI, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


def test_assets_are_small_safetensors():
    files = [f for f in MINI.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 10**6
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert (MINI / "README.md").is_file()


def test_plain_diffusers_load_is_standard_sd_and_float32(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert pipe.vae.config.latent_channels == 4
    assert len(pipe.vae.config.block_out_channels) - 1 == 2  # factor 4
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}


def test_generates_deterministically_and_handles_odd_prompts(pipe):
    def run(prompt, seed=0):
        return pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images

    a, b = run(["a red circle", "a blue star"]), run(["a red circle", "a blue star"])
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(run("a red circle", seed=1), a[:1])
    for odd in ("", "a zebra made of glass", "A RED CIRCLE!!"):
        assert torch.isfinite(run(odd)).all()


def test_embedded_tokenizer_knows_the_grammar(pipe):
    tok = pipe.tokenizer
    for word in grammar_words():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    assert tok.unk_token_id in tok("a zebra").input_ids


def test_evaluator_reads_held_out_real_images(evaluator):
    imgs, _, labels = render_batch(512, HELDOUT_SEED, start=5 * 10**5)
    preds = evaluator.predict(to_tensor(imgs))
    for i, head in enumerate(HEADS):
        accuracy = (preds[head].numpy() == labels[:, i]).mean()
        assert accuracy >= (0.97 if head in ("shape", "color") else 0.9), (head, accuracy)
    feats = evaluator.embed(to_tensor(imgs[:4]))
    assert feats.shape == (4, evaluator.config.feature_dim)


def test_generated_images_follow_the_prompt(pipe, evaluator):
    # a small sample of what bench/mini_quality.py measures on 1024 images; bounds sit well
    # below the bench's figures so only a broken model or pipeline fails them
    prompts = eval_prompts(48)
    images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    acc = prompt_accuracy(images * 2 - 1, prompts, evaluator)
    assert acc["shape"] >= 0.5 and acc["color"] >= 0.6, acc


def test_missing_asset_names_the_path_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr("genfast.models.ASSETS", Path(tmp_path))
    with pytest.raises(FileNotFoundError, match="train-mini"):
        asset_path("genfast-mini")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_mini()
