"""GRI attention: the math pinned against full attention, the processor, install/remove on a pipeline."""

import copy

import pytest
import tiny_pipelines as tp
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import genfast
import genfast.methods.gri_attention
from genfast.api import handles_on
from genfast.assembly.gri import GRIAttnProcessor, gri_attention, install_gri, uninstall_gri


def _qkv(batch, heads, tokens, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=gen) for _ in range(3)]


def _cellwise(batch, channels, grid, pooled, seed=0):
    """(B, C, H, W) constant over each of the pooled x pooled cells (H, W divisible by pooled)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, pooled, pooled, generator=gen)
    return F.interpolate(coarse, size=grid, mode="nearest")


@pytest.mark.parametrize("grid,window", [((16, 16), 16), ((12, 20), 24), ((5, 7), 9)])
def test_window_covering_the_map_is_full_attention(grid, window, one_thread):
    q, k, v = _qkv(2, 3, grid[0] * grid[1], 8)
    for pooled in (1, 3, 4):  # the summary then stands for nothing outside the window
        torch.testing.assert_close(gri_attention(q, k, v, grid, window, pooled), F.scaled_dot_product_attention(q, k, v),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid,window,pooled", [((16, 16), 8, 4), ((16, 16), 6, 4), ((12, 20), 5, 4), ((8, 12), 3, 2)])
def test_cellwise_constant_keys_make_the_summary_exact(grid, window, pooled, one_thread):
    """Where keys/values are constant over each pooled cell, a pooled token IS each of the tokens it stands
    for: with the right weighting (its count outside the window) GRI equals full attention, for any window,
    aligned with the cells or not, padded or not."""
    tokens = grid[0] * grid[1]
    q = _qkv(2, 2, tokens, 4)[0]
    k, v = (_cellwise(2, 2 * 4, grid, pooled, seed=s).view(2, 2, 4, tokens).transpose(2, 3) for s in (1, 2))
    got = gri_attention(q, k, v, grid, window, pooled)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    random_k, random_v = _qkv(2, 2, tokens, 4, seed=3)[:2]
    far = gri_attention(q, random_k, random_v, grid, window, pooled)
    assert not torch.allclose(far, F.scaled_dot_product_attention(q, random_k, random_v), atol=1e-3), \
        "with arbitrary keys the summary is an approximation"


def _attention(**extra):
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8, **extra).eval()


@pytest.mark.parametrize("kind", ["tokens", "image"])
def test_processor_projections_match_diffusers(kind, one_thread):
    """The whole processor (projections, group norm, residual, rescale, 3D or 4D input) equals
    AttnProcessor2_0 where GRI is exact (cell-wise constant input), and is AttnProcessor2_0 on small maps."""
    if kind == "image":  # a VAE-style attention: 4D input, group norm, residual, rescaling
        attn = _attention(norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0, bias=True)
    else:
        attn = _attention()
    grid, pooled = (12, 16), 4
    x = _cellwise(2, 16, grid, pooled)
    if kind == "tokens":
        x = x.flatten(2).transpose(1, 2)
    gri = GRIAttnProcessor(window=5, pooled=pooled)
    gri.grid.hw = grid
    with torch.no_grad():
        full = AttnProcessor2_0()(attn, x)
        torch.testing.assert_close(gri(attn, x), full, rtol=1e-5, atol=1e-5)
        small = (x[..., :4, :4] if kind == "image" else x[:, :16]).contiguous()  # 16 tokens <= 5^2 + 4^2: full attention
        gri.grid.hw = (4, 4)
        assert torch.equal(gri(attn, small), AttnProcessor2_0()(attn, small))


def test_cross_attention_is_left_alone(one_thread):
    attn = _attention(cross_attention_dim=12)
    x, context = torch.randn(2, 256, 16), torch.randn(2, 7, 12)
    gri = GRIAttnProcessor(window=2, pooled=2)
    with torch.no_grad():
        assert torch.equal(gri(attn, x, context), AttnProcessor2_0()(attn, x, context))


def _unet_inputs(grid=(16, 16)):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, *grid, generator=gen), torch.tensor(10), torch.randn(2, 5, 16, generator=gen))


def test_accelerate_runs_in_a_pipeline_and_remove_restores_bit_exact(one_thread):
    pipe = tp.build("sd")
    unet = pipe.unet

    def run():  # a 16x24 latent: each level's grid found from the aspect ratio
        return pipe(**dict(tp.inputs("sd", steps=2), height=32, width=48, output_type="pt")).images

    before_procs = unet.attn_processors
    before_hooks = dict(unet._forward_pre_hooks)
    baseline = run()
    handle = genfast.accelerate(pipe, "gri_attention", window=5, pooled=2)
    assert "gri_attention" in handles_on(unet)
    with pytest.raises(RuntimeError, match="already"):
        genfast.accelerate(pipe, "gri_attention", window=5, pooled=2)
    seen = []
    for proc in unet.attn_processors.values():
        if isinstance(proc, GRIAttnProcessor):
            proc.register_forward_pre_hook(lambda m, args: seen.append(args[1].shape[1]))
    accelerated = run()
    assert torch.isfinite(accelerated).all()
    assert not torch.equal(accelerated, baseline)
    assert 16 * 24 in seen and 8 * 12 in seen  # both GRI levels ran (4x6 = 24 <= 5^2 + 2^2 stays full)
    handle.remove()
    assert unet.attn_processors == before_procs  # the same processor objects
    assert dict(unet._forward_pre_hooks) == before_hooks and not unet._forward_pre_hooks_with_kwargs
    assert "gri_attention" not in handles_on(unet)
    assert torch.equal(run(), baseline)


def test_trainable_bias_starts_training_free_and_gets_gradients(one_thread):
    unet = tp._unet()
    sample, t, context = _unet_inputs((16, 20))
    before = unet.attn_processors
    previous = install_gri(unet, window=4, pooled=2)
    assert previous == before  # what set_attn_processor takes back
    with torch.no_grad():
        free = unet(sample, t, context).sample
    uninstall_gri(unet, previous)
    install_gri(unet, window=4, pooled=2, trainable=True)
    biases = {k: v for k, v in unet.state_dict().items() if k.endswith("attn1.processor.global_bias")}
    assert len(biases) == 7 and all(torch.equal(b, torch.zeros(2)) for b in biases.values())
    out = unet(sample, t, context).sample
    torch.testing.assert_close(out, free, rtol=1e-5, atol=1e-6)
    (out * torch.randn_like(out)).sum().backward()
    level0 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor  # 320 tokens: GRI
    assert level0.global_bias.grad is not None and (level0.global_bias.grad != 0).all()


def test_a_copied_denoiser_tracks_its_own_grid(one_thread):
    unet = tp._unet()
    install_gri(unet, window=4, pooled=2)
    twin = copy.deepcopy(unet)
    with torch.no_grad():
        twin(*_unet_inputs((16, 24)))
        unet(*_unet_inputs((16, 16)))
    proc = next(p for p in twin.attn_processors.values() if isinstance(p, GRIAttnProcessor))
    assert proc.grid.hw == (16, 24)


def test_errors_name_the_problem():
    for bad in (dict(window=0), dict(pooled=-1), dict(window="8"), dict(window=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            genfast.accelerate(tp.build("sd"), "gri_attention", **bad)
    with pytest.raises(ValueError, match="unknown option"):
        genfast.accelerate(tp.build("sd"), "gri_attention", trainable=True)
    with pytest.raises(ValueError, match="heads"):
        GRIAttnProcessor(4, 2, trainable=True)
    with pytest.raises(ValueError, match="no self-attention"):
        install_gri(torch.nn.Linear(2, 2), 4, 2)
    unet = tp._unet()
    unet.set_attn_processor(GRIAttnProcessor(4, 2))  # not one of diffusers' plain processors
    with pytest.raises(TypeError, match="GRIAttnProcessor"):
        install_gri(unet, 4, 2)
    gri = GRIAttnProcessor(2, 1)
    gri.grid.hw = (16, 16)
    with pytest.raises(RuntimeError, match="power-of-2"):
        gri.grid.grid_for(50)
    with pytest.raises(RuntimeError, match="install_gri"):
        GRIAttnProcessor(2, 1).grid.grid_for(50)
    with pytest.warns(UserWarning, match="changes nothing"):
        genfast.accelerate(tp.build("sd"), "gri_attention", window=16, pooled=2).remove()
