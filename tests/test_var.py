"""The language-style generator: multi-scale residual VQ tokenizer, VAR transformer, sampling, pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_pipelines import tiny_tokenizer

from genfast.backbones.configs import count_params
from genfast.generators import (
    MultiScaleVQModel,
    VARModel,
    VARPipeline,
    filter_logits,
    generate,
    guidance_scales,
    guided_logits,
    var_config,
)

TOK = dict(sample_size=16, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4, vocab_size=16,
           patch_nums=(1, 2, 4, 8), share_quant_resi=2)
NET = dict(vocab_size=16, codebook_dim=4, patch_nums=(1, 2, 4, 8), num_classes=24, width=16, depth=2, num_heads=2)


def _randomize(model, seed, std=0.3):
    """Random weights everywhere (adaLN-Zero would make every block the identity and hide the mask)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(**TOK)


@pytest.fixture(scope="module")
def model():
    return _randomize(VARModel(**NET), 1)


def _images(n=3, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _random_tokens(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 16, (b, p, p), generator=g) for p in NET["patch_nums"]]


# ---- tokenizer ----

def test_quantized_latent_is_the_sum_of_scale_embeddings(tokenizer):
    with torch.no_grad():
        f = tokenizer.encode(_images())
        tokens, f_hat = tokenizer.quantize_latents(f)
        assert [tuple(t.shape) for t in tokens] == [(3, p, p) for p in TOK["patch_nums"]]
        assert torch.equal(tokenizer.scales_to_latent(tokens), f_hat)
        assert torch.equal(tokenizer.scales_to_latent(tokens, cumulative=True)[-1], f_hat)
        assert torch.equal(tokenizer.decode_from_scales(tokens), tokenizer.decode_latents(f_hat))
        assert [torch.equal(a, b) for a, b in zip(tokenizer.encode_to_scales(_images()), tokens)] == [True] * 4


def test_single_scale_is_nearest_neighbour_vq():
    vq = tiny_tokenizer(**{**TOK, "patch_nums": (8,), "quant_resi": 0.0})
    with torch.no_grad():
        f = vq.encode(_images())
        tokens, f_hat = vq.quantize_latents(f)
    flat = f.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, vq.embedding.weight).argmin(1).view(3, 8, 8)
    assert torch.equal(tokens[0], nearest)
    assert torch.equal(f_hat, vq.embedding.weight[nearest].permute(0, 3, 1, 2))


def test_teacher_forcing_input_of_a_scale_depends_only_on_earlier_scales(tokenizer):
    tokens = _random_tokens()
    with torch.no_grad():
        base = tokenizer.teacher_forcing_inputs(tokens)
        ends = [sum(p * p for p in TOK["patch_nums"][1:k + 1]) for k in range(4)]  # end of scale k's inputs
        for k in range(1, 4):
            changed = [t if i < k else (t + 1) % 16 for i, t in enumerate(tokens)]
            other = tokenizer.teacher_forcing_inputs(changed)
            assert torch.equal(other[:, :ends[k]], base[:, :ends[k]])  # scales 1..k unchanged
            if k < 3:
                assert not torch.equal(other[:, ends[k]:], base[:, ends[k]:])
        # the next-scale input is the running latent, area-resized: at the last scale, sum of all but the last h_k
        partial = tokenizer.scales_to_latent(tokens, cumulative=True)
        assert torch.allclose(base[:, ends[2]:], F.interpolate(partial[2], size=(8, 8), mode="area")
                              .flatten(2).transpose(1, 2))


def test_tokenizer_training_pass_reconstructs_from_the_quantized_latent(tokenizer):
    x = _images(2)
    out = tokenizer(x)
    tokens, f_hat = tokenizer.quantize_latents(tokenizer.encode(x))
    assert torch.allclose(out.sample, tokenizer.decode_latents(f_hat), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, tokens))
    out.sample.mean().add(out.vq_loss).backward()  # gradients reach the encoder (straight-through) and codebook
    assert tokenizer.encoder.conv_in.weight.grad is not None and tokenizer.embedding.weight.grad is not None
    tokenizer.zero_grad(set_to_none=True)


# ---- transformer ----

def test_block_causal_mask(model, tokenizer):
    labels = torch.tensor([0, 7])
    tokens = _random_tokens()
    with torch.no_grad():
        inputs = tokenizer.teacher_forcing_inputs(tokens)
        base = model(labels, inputs).logits
        bounds = model.scale_bounds()
        first = NET["patch_nums"][0] ** 2
        for k, (begin, end) in enumerate(bounds[:-1]):
            noisy = inputs.clone()
            noisy[:, end - first:] += torch.randn_like(noisy[:, end - first:])  # every later scale's inputs
            assert torch.equal(model(labels, noisy).logits[:, :end], base[:, :end])
            changed = [t if i <= k else (t + 3) % 16 for i, t in enumerate(tokens)]
            assert torch.equal(model(labels, tokenizer.teacher_forcing_inputs(changed)).logits[:, :bounds[k + 1][0]],
                               base[:, :bounds[k + 1][0]])
        # and the earlier scales do reach the later ones
        noisy = inputs.clone()
        noisy[:, :4] += 1.0
        assert not torch.allclose(model(labels, noisy).logits[:, -64:], base[:, -64:])
        # a prefix of whole scales gives the same logits as the full sequence
        assert torch.allclose(model(labels, inputs[:, :4]).logits, base[:, :5], atol=1e-6)


def test_null_class_ids(model, tokenizer):
    inputs = tokenizer.teacher_forcing_inputs(_random_tokens())
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([1000, 1000]), inputs).logits, model(torch.tensor([24, 24]), inputs).logits)
    for bad in ([25, 0], [-1, 0], [999, 0]):
        with pytest.raises(ValueError, match="class ids must be in 0..23"):
            model(torch.tensor(bad), inputs)


def test_guidance_one_is_the_conditional_model(model, tokenizer):
    labels, inputs = torch.tensor([3, 9]), tokenizer.teacher_forcing_inputs(_random_tokens())
    with torch.no_grad():
        cond = model(labels, inputs).logits
        uncond = model(torch.tensor([1000, 1000]), inputs).logits
        assert torch.equal(guided_logits(model, labels, inputs, 1.0), cond)
        assert torch.equal(guided_logits(model, labels, inputs, 1.0, "constant"), cond)
        mixed = guided_logits(model, labels, inputs, 3.0)  # linear ramp: g = 1 at scale 0, 3 at the last
        assert torch.allclose(mixed[:, :1], cond[:, :1])
        assert torch.allclose(mixed[:, -64:], uncond[:, -64:] + 3.0 * (cond[:, -64:] - uncond[:, -64:]), atol=1e-5)
    assert guidance_scales(4, 3.0) == [1.0, 1 + 2 / 3, 1 + 4 / 3, 3.0]
    assert guidance_scales(4, 3.0, "constant") == [3.0] * 4


@pytest.mark.parametrize("g", [1.0, 3.0])
def test_top_k_one_is_greedy_decoding(model, tokenizer, g):
    labels = torch.tensor([2, 1000, 17])
    one = generate(model, tokenizer, labels, guidance_scale=g, top_k=1, generator=torch.Generator().manual_seed(0))
    two = generate(model, tokenizer, labels, guidance_scale=g, top_k=1, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(one.tokens, two.tokens))
    assert torch.equal(one.images, two.images)
    # greedy reference: teacher-force the sampled tokens; every token is the argmax of its guided logits
    with torch.no_grad():
        ref = guided_logits(model, labels, tokenizer.teacher_forcing_inputs(one.tokens), g).argmax(-1)
    assert torch.equal(ref, torch.cat([t.flatten(1) for t in one.tokens], dim=1))
    assert one.images.shape == (3, 3, 16, 16) and 0 <= one.images.min() and one.images.max() <= 1


def test_sampling_is_reproducible_and_uses_the_generator(model, tokenizer):
    labels = torch.tensor([4, 4])
    a, b, c = (generate(model, tokenizer, labels, guidance_scale=2.0, top_p=0.9,
                        generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.randn(50, 12, generator=torch.Generator().manual_seed(0)) * 2
    for p in (0.3, 0.75, 0.95):
        kept = filter_logits(logits, top_p=p).isfinite()
        for row, keep in zip(logits.softmax(-1), kept):
            order = row.argsort(descending=True)
            need = int((row[order].cumsum(0) >= p).nonzero()[0]) + 1  # fewest most-likely tokens reaching p
            expected = torch.zeros_like(keep)
            expected[order[:need]] = True
            assert torch.equal(keep, expected)
    top3 = filter_logits(logits, top_k=3).isfinite()
    assert torch.equal(top3, torch.zeros_like(top3).scatter(1, logits.topk(3).indices, True))
    assert torch.equal(filter_logits(logits), logits)
    for bad in (dict(top_k=13), dict(top_k=-1), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            filter_logits(logits, **bad)


# ---- saving, configs, errors ----

def test_save_load_round_trip(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "var")
    tokenizer.save_pretrained(tmp_path / "vq")
    model2 = VARModel.from_pretrained(tmp_path / "var").eval()
    tok2 = MultiScaleVQModel.from_pretrained(tmp_path / "vq").eval()
    for a, b in ((model, model2), (tokenizer, tok2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    pipe = VARPipeline(transformer=model, vqvae=tokenizer)
    pipe.save_pretrained(tmp_path / "pipe")
    pipe2 = VARPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe2.labels == pipe.labels and pipe.get_label_ids(["red circle", "purple star"]) == [0, 23]
    kwargs = dict(guidance_scale=2.0, top_k=8, top_p=0.9, output_type="pt")
    one = pipe([0, 5, 23], generator=torch.Generator().manual_seed(3), **kwargs).images
    two = pipe2([0, 5, 23], generator=torch.Generator().manual_seed(3), **kwargs).images
    assert torch.equal(one, two) and one.shape == (3, 3, 16, 16)
    pil = pipe(1, generator=torch.Generator().manual_seed(0), output_type="pil").images
    assert len(pil) == 1 and pil[0].size == (16, 16)


def test_pipeline_refuses_what_it_cannot_do(model, tokenizer):
    pipe = VARPipeline(transformer=model, vqvae=tokenizer)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe([0], num_inference_steps=20)
    with pytest.raises(ValueError, match="class ids"):
        pipe([30], output_type="pt")
    with pytest.raises(ValueError, match="unknown labels"):
        pipe.get_label_ids("teal circle")
    with pytest.raises(ValueError, match="vocab_size"):
        VARPipeline(transformer=VARModel(**{**NET, "vocab_size": 32}), vqvae=tokenizer)


@pytest.mark.parametrize(("cls", "change", "field"), [
    (VARModel, dict(num_heads=3), "num_heads"),
    (VARModel, dict(patch_nums=(1, 4, 2)), "patch_nums"),
    (VARModel, dict(num_classes=1000), "num_classes"),
    (VARModel, dict(vocab_size=1), "vocab_size"),
    (VARModel, dict(depth=0), "depth"),
    (MultiScaleVQModel, dict(patch_nums=(1, 2, 4)), "patch_nums"),
    (MultiScaleVQModel, dict(quant_resi=1.0), "quant_resi"),
    (MultiScaleVQModel, dict(norm_num_groups=3), "norm_num_groups"),
])
def test_bad_configs_name_the_field(cls, change, field):
    with pytest.raises(ValueError, match=field):
        cls(**{**(NET if cls is VARModel else TOK), **change})


def test_bad_sampling_options(model, tokenizer):
    with pytest.raises(ValueError, match="cfg_schedule"):
        generate(model, tokenizer, [0], cfg_schedule="cosine")
    with pytest.raises(ValueError, match="guidance_scale"):
        generate(model, tokenizer, [0], guidance_scale=-1.0)
    with pytest.raises(ValueError, match="prefix length"):
        model(torch.tensor([0]), torch.zeros(1, 3, 4))  # 1 + 3 tokens: not a scale boundary


@pytest.mark.parametrize(("name", "target"), [("0.5M", 0.5e6), ("1M", 1e6), ("2M", 2e6), ("8M", 8e6)])
def test_named_sizes_match_the_issue(name, target):
    with torch.device("meta"):
        n = count_params(VARModel(**var_config(name)))
    assert abs(n - target) / target < 0.1
