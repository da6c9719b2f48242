"""LaMamba-Diff backbone: scan backends agree, the model runs in an unmodified DiTPipeline, saves and
loads bit for bit, and the XL configuration has the official parameter and FLOP counts."""

import json

import pytest
import torch

from genfast.backbones import (
    LaMambaDiffModel,
    build_on_meta,
    count_flops,
    count_params,
    lamamba_config,
    linear_scan,
    mamba_ssm_available,
    selective_scan,
)
from genfast.backbones.lamamba import snake_paths

TINY = dict(
    sample_size=8, in_channels=4, out_channels=8, num_classes=5, dims=[8, 16, 16, 16], depths=[2, 1, 1, 1],
    bottleneck_depth=1, num_heads=2, window_size=4,
)
CPU = torch.device("cpu")


def _tiny(**overrides) -> LaMambaDiffModel:
    torch.manual_seed(0)
    model = LaMambaDiffModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # wake the zero-initialised adaLN so every branch reaches the output
        for name, p in model.named_parameters():
            if "adaLN" in name:
                p.normal_(std=0.1)
    return model


def _inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    return x, torch.tensor([999, 500, 3][:batch]), torch.tensor([0, 4, 2][:batch])


def _scan_inputs(length, d_state, seed=0, dtype=torch.float64, groups=4, dim=8, batch=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    u, delta = r(batch, dim, length), r(batch, dim, length)
    A = -torch.rand(dim, d_state, generator=g, dtype=dtype) * 4
    B, C = r(batch, groups, d_state, length), r(batch, groups, d_state, length)
    return [u, delta, A, B, C, r(dim), r(dim)]


# ------------------------------------------------------------------------------------------ scan


@pytest.mark.parametrize("d_state", [1, 16])
@pytest.mark.parametrize("length,chunk", [(1, 8), (7, 8), (64, 8), (100, 8), (257, 8), (300, 3)])
def test_parallel_scan_matches_sequential_outputs_and_gradients(length, chunk, d_state, one_thread):
    inputs = [t.requires_grad_() for t in _scan_inputs(length, d_state)]
    weight = torch.cos(torch.arange(length, dtype=torch.float64))  # a loss that weighs every step
    results = {}
    for backend in ("parallel", "sequential"):
        y = selective_scan(*inputs, delta_softplus=True, backend=backend, chunk=chunk)
        results[backend] = (y, torch.autograd.grad((y * weight).sum(), inputs))
    (y_par, g_par), (y_seq, g_seq) = results["parallel"], results["sequential"]
    torch.testing.assert_close(y_par, y_seq, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "delta_bias"), g_par, g_seq):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_parallel_scan_stays_finite_where_log_space_cumsum_would_overflow(one_thread):
    # per-step decay exp(-200): a chunk's cumulative log-decay reaches -1600, exp(+1600) = inf in float32
    u, delta, A, B, C, D, _ = _scan_inputs(2000, 4, dtype=torch.float32)
    bias = torch.full((8,), 50.0)
    args = (u, delta, A * 0 - 4.0, B, C, D, bias)
    y_par = selective_scan(*args, backend="parallel")
    with torch.no_grad():
        y_seq = selective_scan(*args, backend="sequential")
    assert torch.isfinite(y_par).all()
    torch.testing.assert_close(y_par, y_seq, rtol=1e-5, atol=1e-4)


def test_linear_scan_is_the_recurrence(one_thread):
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, 5, 77, generator=g, dtype=torch.float64)
    b = torch.randn(3, 5, 77, generator=g, dtype=torch.float64)
    h, expected = torch.zeros(3, 5, dtype=torch.float64), []
    for t in range(77):
        h = a[..., t] * h + b[..., t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(a, b, chunk=4), torch.stack(expected, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not mamba_ssm_available(), reason="mamba-ssm is not installed (a CUDA-only package)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba-ssm's selective scan needs a CUDA device")
def test_mamba_ssm_backend_matches_parallel():
    inputs = [t.float().cuda() for t in _scan_inputs(300, 1)]
    y_cuda = selective_scan(*inputs, backend="mamba_ssm")
    y_par = selective_scan(*inputs, backend="parallel")
    torch.testing.assert_close(y_cuda, y_par, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(mamba_ssm_available(), reason="mamba-ssm is installed here")
def test_asking_for_missing_mamba_ssm_is_a_clear_error():
    with pytest.raises(ImportError, match="pip install mamba-ssm"):
        LaMambaDiffModel(**TINY, scan_backend="mamba_ssm")
    with pytest.raises(ImportError, match="pip install mamba-ssm"):
        selective_scan(*_scan_inputs(4, 1), backend="mamba_ssm")


def test_unknown_scan_backend_is_refused():
    with pytest.raises(ValueError, match="scan_backend must be one of"):
        LaMambaDiffModel(**TINY, scan_backend="cuda")


def test_model_backends_agree_end_to_end(one_thread):
    model, (x, t, y) = _tiny(), _inputs()
    with torch.no_grad():
        parallel = model(x, t, y).sample
        model.set_scan_backend("sequential")
        sequential = model(x, t, y).sample
    torch.testing.assert_close(parallel, sequential, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("size", [2, 5, 8])
def test_snake_scans_visit_every_token_once_through_neighbours(size):
    paths, inverses = snake_paths(size, size, CPU)
    for path, inverse in zip(paths, inverses):
        assert sorted(path.tolist()) == list(range(size * size))
        assert torch.equal(path[inverse], torch.arange(size * size))
        rows, cols = path // size, path % size
        steps = (rows.diff().abs() + cols.diff().abs()).tolist()
        assert set(steps) <= {1}  # continuous: every step moves to a 4-neighbour
    # the official starting corners: top-left, bottom-left (rows); bottom-left, bottom-right (columns)
    corners = [(int(p[0]) // size, int(p[0]) % size) for p in paths]
    last = size - 1
    assert corners == [(0, 0), (last, 0), (last, 0), (last, last)]
    assert int(paths[2][1]) == (last - 1) * size  # column scans move up first


def test_forward_shapes_timesteps_and_null_class(one_thread):
    model, (x, t, y) = _tiny(), _inputs()
    with torch.no_grad():
        out = model(x, t, y)
        assert out.sample.shape == (3, 8, 8, 8)
        # a 0-d timestep is broadcast over the batch, as StableDiffusion-style pipelines pass it
        same_t = model(x, torch.tensor(500), y).sample
        torch.testing.assert_close(same_t, model(x, torch.full((3,), 500), y).sample)
        # DiTPipeline's null id 1000 and id num_classes read the same (null) row
        null_1000 = model(x, t, torch.tensor([1000, 1000, 1000]), return_dict=False)[0]
        null_k = model(x, t, torch.tensor([5, 5, 5])).sample
        assert torch.equal(null_1000, null_k)
        assert not torch.equal(null_k, out.sample)


@pytest.mark.parametrize("labels", [[6, 0, 0], [-1, 0, 0], [1001, 0, 0]])
def test_class_ids_outside_the_table_are_refused(labels):
    model, (x, t, _) = _tiny(), _inputs()
    with pytest.raises(ValueError, match=r"0\.\.4 \(classes\), 5 or 1000 \(the null class\)"):
        model(x, t, torch.tensor(labels))


def test_wrong_latent_shape_is_refused():
    with pytest.raises(ValueError, match="sample_size"):
        _tiny()(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([0]))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(dims=[8, 16, 16, 32]), r"dims\[-2\] must equal dims\[-1\]"),
        (dict(sample_size=12, window_size=4), "tile"),
        (dict(num_classes=1001), "num_classes"),
        (dict(num_heads=3), "num_heads"),
    ],
)
def test_impossible_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        LaMambaDiffModel(**{**TINY, **overrides})


def test_gradient_checkpointing_gives_the_same_gradients(one_thread):
    (x, t, y) = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = _tiny().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, y).sample.square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_save_load_round_trip_is_bit_exact(tmp_path, one_thread):
    model, (x, t, y) = _tiny(num_heads=[2, 4, 4, 4], patch_size=2, window_size=2), _inputs()
    model.set_scan_backend("sequential")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_heads"] == [2, 4, 4, 4] and saved["scan_backend"] == "sequential"
    loaded = LaMambaDiffModel.from_pretrained(tmp_path).eval()
    assert loaded.config.scan_backend == "sequential"
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)


def test_runs_in_an_unmodified_dit_pipeline_with_guidance(tmp_path, one_thread):
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline

    model = _tiny()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
    ).eval()
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    images = pipe(class_labels=[1, 3], guidance_scale=4.0, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and ((images >= 0) & (images <= 1)).all()
    assert seen and all(labels == [1, 3, 1000, 1000] for labels in seen)  # CFG: conditional + null halves

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["genfast.backbones.lamamba", "LaMambaDiffModel"]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded(class_labels=[1, 3], guidance_scale=4.0, num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert (again == images).all()


# ------------------------------------------------------------------------------------------ configs and counts


def test_xl_has_the_official_parameter_and_flop_counts():
    """Official XL measured with fvcore: 652.5M parameters, 45.9 GFLOPs at 256^2 (one MAC = one FLOP)."""
    config = lamamba_config("XL")
    assert config["dims"] == [320, 640, 1280, 1280] and config["num_heads"] == 16 and config["d_state"] == 1
    model = build_on_meta(LaMambaDiffModel, **config)
    assert abs(count_params(model) / 652.5e6 - 1) < 0.01
    assert abs(count_flops(model) / 45.9 - 1) < 0.10
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name,dit_params", [("S", 33e6), ("B", 130e6), ("L", 458e6)])
def test_smaller_sizes_match_the_dit_they_are_compared_with(name, dit_params):
    model = build_on_meta(LaMambaDiffModel, **lamamba_config(name))
    assert abs(count_params(model) / dit_params - 1) < 0.05


def test_mini_fits_the_project_data():
    from genfast.data.shapes import IMAGE_SIZE, SHAPE_COLORS, SHAPES

    config = lamamba_config("mini")
    assert config["num_classes"] == len(SHAPES) * len(SHAPE_COLORS)
    assert config["sample_size"] == IMAGE_SIZE // 4  # genfast-mini's VAE downsamples 4x
    assert 1e6 <= count_params(build_on_meta(LaMambaDiffModel, **config)) <= 3e6
    with pytest.raises(ValueError, match="unknown LaMamba-Diff size"):
        lamamba_config("XXL")
