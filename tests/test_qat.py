"""Distillation-based QAT (genfast.training.qat) and its fake quantization (genfast.quant.fake_quant), on tiny
models built here: the fake-quantized forward is genfast.quantize's, QAT lowers the held-out distillation loss
below round-to-nearest, the result saves and loads, the LoRA path leaves nothing of peft behind, resume is exact."""

import argparse
import copy
import dataclasses
import json
import shutil

import pytest
import torch
from tiny_pipelines import tiny_tokenizer

import genfast
from genfast.api import handles_on
from genfast.generators import VARModel, VARPipeline
from genfast.pipelines.class_conditional import ClassDiT, dit_config, make_pipeline, mini_vae
from genfast.quant import QuantConfig
from genfast.quant.config import DEFAULT_SKIP
from genfast.quant.fake_quant import fake_quant_weight, fake_quantize
from genfast.quant.formats import FORMATS, encode, get_format
from genfast.quant.quantize import quantizable
from genfast.training.qat import QATConfig, distillation_loss, qat_distill

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = dict(sample_size=64, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4, vocab_size=16,
           patch_nums=(1, 2, 4, 8), share_quant_resi=2, mid_block_add_attention=False)
NET = dict(vocab_size=16, codebook_dim=4, patch_nums=(1, 2, 4, 8), width=32, depth=2, num_heads=2)
VAR_QAT = dict(weights="int3", top_k=4, steps=30, batch_size=8, lr=3e-3, pool_size=64)
DIT_QAT = dict(weights="int3", steps=20, batch_size=8, lr=1e-3, pool_size=32)


def _perturb(model, seed, std):
    """Weights away from the init (adaLN-Zero would make every block the identity and nothing to quantize)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(**TOK)


@pytest.fixture(scope="module")
def var_model():
    torch.manual_seed(0)
    return _perturb(VARModel(**NET), 1, 0.3)


@pytest.fixture(scope="module")
def vae():
    return mini_vae()


@pytest.fixture(scope="module")
def dit_model():
    torch.manual_seed(0)
    return _perturb(ClassDiT(**dit_config(20_000)), 1, 0.1)


@pytest.fixture(scope="module")
def dit_data(tmp_path_factory, vae):
    """The DiT runs' training and held-out latents (DIT_QAT's pools), encoded once; dit_work copies them into a
    work folder where qat_distill finds them cached (work/train, work/heldout)."""
    from genfast.data.classes import HELDOUT_SEED, TRAIN_SEED
    from genfast.training.class_cond import ClassCondRecipe, latent_pool
    from genfast.training.qat import HELDOUT_BATCHES

    folder = tmp_path_factory.mktemp("dit-data")
    latent_pool(vae, ClassCondRecipe(pool_size=DIT_QAT["pool_size"], seed=TRAIN_SEED), folder / "train")
    latent_pool(vae, ClassCondRecipe(pool_size=HELDOUT_BATCHES * DIT_QAT["batch_size"], seed=HELDOUT_SEED),
                folder / "heldout")
    return folder


def dit_work(dit_data, path):
    shutil.copytree(dit_data, path)
    return path


def var_pipe(model, tokenizer):
    return VARPipeline(transformer=copy.deepcopy(model), vqvae=tokenizer)


def _var_inputs(model):
    g = torch.Generator().manual_seed(7)
    n = sum(p * p for p in NET["patch_nums"]) - 1
    return torch.tensor([3, 1000, 17]), torch.randn(3, n, NET["codebook_dim"], generator=g)


def _dit_inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 999]), torch.tensor([3, 1000])


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- fake quantization

@pytest.mark.parametrize("weights", ["int3", "int8", "fp4_e2m1", "fp6_e2m3", "mxfp4", "nvfp4"])
def test_the_fake_quantized_forward_is_the_quantized_forward_and_remove_restores(var_model, weights):
    model = copy.deepcopy(var_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    labels, inputs = _var_inputs(model)
    config = QuantConfig(weights=weights, kernel="dequantize")
    handle = fake_quantize(model, config)
    assert set(handle.layers) == {name for name, _ in quantizable(model, DEFAULT_SKIP)}  # genfast.quantize's layers
    with torch.no_grad():
        fake = model(labels, inputs).logits
    handle.remove()
    # the same Parameter objects in the same places, the same state
    assert [n for n, _ in model.named_parameters()] == list(params)
    assert all(params[n] is p for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with genfast.quantize(model, config), torch.no_grad():
        assert torch.equal(model(labels, inputs).logits, fake)


def test_the_gradient_passes_straight_through_the_rounding():
    layer = torch.nn.Linear(6, 4)
    handle = fake_quantize(layer, QuantConfig(weights="int2", skip=()))
    x = torch.randn(5, 6)
    layer(x).pow(2).sum().backward()
    original = layer.parametrizations.weight.original
    y = x @ fake_quant_weight(original, get_format("int2"), "channel", True).T + layer.bias
    # d/dW of sum((x fq(W)^T + b)^2) with dfq/dW := identity
    torch.testing.assert_close(original.grad, (2 * y).T.detach() @ x)
    handle.remove()
    assert isinstance(layer.weight, torch.nn.Parameter) and type(layer) is torch.nn.Linear


@pytest.mark.parametrize("weights", [f for f in FORMATS if get_format(f).family in ("int", "float")])
def test_quantizing_fake_quantized_weights_again_gives_the_same_codes(weights):
    fmt = get_format(weights)
    w = torch.randn(24, 70, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3] = 0  # an all-zero row
    for granularity in ("channel", "tensor", "group:8"):
        for symmetric in ((True, False) if fmt.family == "int" else (True,)):
            fq = fake_quant_weight(w, fmt, granularity, symmetric)
            again = fake_quant_weight(fq, fmt, granularity, symmetric)
            codes = encode(w, fmt, granularity, symmetric).codes
            assert torch.equal(encode(fq, fmt, granularity, symmetric).codes, codes)
            # the same codes; the scale is recomputed from fq's own range, equal up to float rounding
            torch.testing.assert_close(again, fq, rtol=1e-6, atol=1e-9)


def test_fake_quantize_refuses_what_it_cannot_simulate(var_model):
    model = copy.deepcopy(var_model)
    with pytest.raises(ValueError, match="activations"):
        fake_quantize(model, QuantConfig(weights="int8", activations="int8"))
    handle = genfast.quantize(model, weights="int4", kernel="dequantize")
    with pytest.raises(ValueError, match="already have a parametrized"):
        fake_quantize(model, weights="int4")
    handle.remove()
    with fake_quantize(model, weights="int4"), pytest.raises(ValueError, match="already have a parametrized"):
        fake_quantize(model, weights="int4")


# ---------------------------------------------------------------- QAT on a token model

def test_qat_on_a_var_beats_round_to_nearest_and_converts_exactly(var_model, tokenizer, tmp_path):
    teacher = copy.deepcopy(var_model)
    config = QATConfig(**VAR_QAT)
    ptq = var_pipe(var_model, tokenizer)
    with genfast.quantize(ptq, config.quant_config()):
        ptq_loss = distillation_loss(ptq, teacher, config, work_dir=tmp_path / "ptq")

    pipe = var_pipe(var_model, tokenizer)
    result = qat_distill(pipe, config)
    assert result.finished and result.pipe is pipe and handles_on(pipe.transformer)["quantize"] is result.handle
    assert [r["step"] for r in result.log] == list(range(1, config.steps + 1))
    qat_loss = distillation_loss(pipe, teacher, config, work_dir=tmp_path / "qat")
    assert result.heldout["ptq"] == pytest.approx(ptq_loss, rel=1e-5)  # its start is round-to-nearest
    assert result.heldout["qat"] == pytest.approx(qat_loss, rel=1e-5)
    assert qat_loss < 0.7 * ptq_loss

    # the quantized student's forward is the fake-quantized forward of its trained float weights
    labels, inputs = _var_inputs(var_model)
    with torch.no_grad():
        quantized = pipe.transformer(labels, inputs).logits
    result.handle.remove()
    with fake_quantize(pipe.transformer, config.quant_config()), torch.no_grad():
        assert torch.equal(pipe.transformer(labels, inputs).logits, quantized)


def test_a_qat_var_saves_and_loads_with_the_same_outputs(var_model, tokenizer, tmp_path):
    from genfast.quant.saving import load_pipeline

    pipe = var_pipe(var_model, tokenizer)
    result = qat_distill(pipe, QATConfig(**{**VAR_QAT, "steps": 3, "loss": "js", "top_k": None}))
    genfast.save_quantized(pipe, tmp_path / "q", result.handle)
    loaded = load_pipeline(tmp_path / "q")  # a VARPipeline, which diffusers' DiffusionPipeline cannot look up
    assert isinstance(loaded, VARPipeline)
    qconfig = handles_on(loaded.transformer)["quantize"].config
    assert qconfig.weights == "int3"
    labels, inputs = _var_inputs(var_model)
    with torch.no_grad():
        assert torch.equal(loaded.transformer(labels, inputs).logits, pipe.transformer(labels, inputs).logits)
    images = loaded([1, 2], top_k=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(var_model, tokenizer, tmp_path, stop_after):
    config = QATConfig(**{**VAR_QAT, "steps": 4, "checkpoint_every": 2})
    straight = qat_distill(var_pipe(var_model, tokenizer), config, tmp_path / "a")
    stop_after(2)
    pipe = var_pipe(var_model, tokenizer)
    stopped = qat_distill(pipe, dataclasses.replace(config, max_minutes=1), tmp_path / "b")
    assert not stopped.finished and stopped.handle is None and len(stopped.log) == 2
    _same_state(pipe.transformer, var_model)  # put back as it was: float, untrained
    assert not handles_on(pipe.transformer)
    resumed = qat_distill(pipe, config, tmp_path / "b")
    assert resumed.finished and resumed.log == straight.log
    _same_state(resumed.pipe.transformer, straight.pipe.transformer)  # packed codes, scales, float layers
    with pytest.raises(ValueError, match="lr"):  # a resumed run must have the same inputs
        qat_distill(var_pipe(var_model, tokenizer), dataclasses.replace(config, lr=1e-2), tmp_path / "b")


# ---------------------------------------------------------------- QAT on diffusion models

def test_qat_on_a_dit_beats_round_to_nearest_and_saves(dit_model, vae, dit_data, tmp_path):
    from genfast.quant.saving import load_pipeline

    teacher = copy.deepcopy(dit_model)
    config = QATConfig(**DIT_QAT)
    pipe = make_pipeline(copy.deepcopy(dit_model), vae)
    work = dit_work(dit_data, tmp_path / "work")
    result = qat_distill(pipe, config, work)
    ptq = make_pipeline(copy.deepcopy(dit_model), vae)
    with genfast.quantize(ptq, config.quant_config()):
        ptq_loss = distillation_loss(ptq, teacher, config, work_dir=work)
    qat_loss = distillation_loss(pipe, teacher, config, work_dir=work)
    assert result.heldout == pytest.approx({"ptq": ptq_loss, "qat": qat_loss}, rel=1e-5)
    assert qat_loss < 0.8 * ptq_loss

    genfast.save_quantized(pipe, tmp_path / "q", result.handle)
    loaded = load_pipeline(tmp_path / "q")
    x, t, labels = _dit_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.transformer(x, timestep=t, class_labels=labels).sample,
                           pipe.transformer(x, timestep=t, class_labels=labels).sample)
    assert handles_on(loaded.transformer)["quantize"].config.weights == "int3"


def test_the_lora_path_trains_a_lora_inside_the_quantizer_and_leaves_no_peft_behind(dit_model, vae, dit_data, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    teacher = copy.deepcopy(dit_model)
    names = [n for n, _ in dit_model.named_modules()]
    config = QATConfig(**{**DIT_QAT, "lr": 1e-2, "lora_rank": 4})
    pipe = make_pipeline(copy.deepcopy(dit_model), vae)
    result = qat_distill(pipe, config, dit_work(dit_data, tmp_path / "work"))
    model = pipe.transformer
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    assert not [n for n, _ in model.named_modules() if "lora" in n or "base_layer" in n]
    assert result.heldout["qat"] < 0.8 * result.heldout["ptq"]

    x, t, labels = _dit_inputs()
    with torch.no_grad():
        quantized = model(x, timestep=t, class_labels=labels).sample
    result.handle.remove()
    assert [n for n, _ in model.named_modules()] == names  # the module tree the model had
    # only the quantized layers' weights moved (W + BA merged); every other tensor is the teacher's
    lora_layers = {f"{n}.weight" for n, _ in quantizable(model, DEFAULT_SKIP)}
    for key, value in model.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[key]) != (key in lora_layers), key
    with fake_quantize(model, config.quant_config()), torch.no_grad():  # the merged weights, fake-quantized
        assert torch.equal(model(x, timestep=t, class_labels=labels).sample, quantized)


def test_qat_runs_on_a_text_to_image_pipeline(vae):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from genfast.models import MINI, asset_path

    folder = asset_path(MINI)
    mini = argparse.Namespace(vae=vae, text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
                              tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                              scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=mini.text_encoder.config.hidden_size, attention_head_dim=4, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=mini.vae, text_encoder=mini.text_encoder, tokenizer=mini.tokenizer, unet=unet,
                                   scheduler=mini.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    text_encoder = {k: v.clone() for k, v in mini.text_encoder.state_dict().items()}
    result = qat_distill(pipe, QATConfig(weights="int4", steps=2, batch_size=1, pool_size=2))
    assert result.finished and handles_on(pipe.unet)["quantize"] is result.handle
    assert all(r["loss"] >= 0 for r in result.log) and set(result.heldout) == {"ptq", "qat"}
    assert all(torch.equal(v, text_encoder[k]) for k, v in mini.text_encoder.state_dict().items())  # frozen


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize(("options", "field"), [
    (dict(weights="int9"), "weights"), (dict(loss="kl"), "loss"), (dict(topkld_reading="both"), "topkld_reading"),
    (dict(top_k=0), "top_k"), (dict(tail_weight=-1.0), "tail_weight"), (dict(tail_weight=float("nan")), "tail_weight"),
    (dict(steps=0), "steps"), (dict(batch_size=2.5), "batch_size"), (dict(lr=0), "lr"),
    (dict(lora_rank=-1), "lora_rank"),
    (dict(seed=True), "seed"), (dict(pool_size=0), "pool_size"), (dict(granularity="row"), "granularity"),
    (dict(weights="mxfp4", granularity="channel"), "granularity"), (dict(max_minutes=0), "max_minutes"),
    (dict(loss="fkl", top_k=8), "top_k"), (dict(loss="output", topkld_reading="head_tail"), "topkld_reading"),
    (dict(loss="js", tail_weight=2.0), "tail_weight"), (dict(checkpoint_every=0), "checkpoint_every"),
])
def test_bad_config_values_name_the_field(options, field):
    with pytest.raises(ValueError, match=f"QATConfig.{field}"):
        QATConfig(**{"weights": "int3", **options})


def test_losses_that_do_not_fit_the_pipeline_are_refused(var_model, tokenizer, dit_model, vae):
    var = var_pipe(var_model, tokenizer)
    with pytest.raises(ValueError, match="QATConfig.top_k .* vocabulary has 16 tokens"):
        qat_distill(var, QATConfig(weights="int3", top_k=16))
    with pytest.raises(ValueError, match="'output' is for diffusion"):
        qat_distill(var, QATConfig(weights="int3", loss="output"))
    dit = make_pipeline(copy.deepcopy(dit_model), vae)
    with pytest.raises(ValueError, match="token loss"):
        qat_distill(dit, QATConfig(weights="int3", loss="topkld"))
    with pytest.raises(ValueError, match="QATConfig.top_k is TopKLD's"):
        qat_distill(dit, QATConfig(weights="int3", top_k=4))
    with pytest.raises(TypeError, match="VARPipeline, a DiTPipeline"):
        qat_distill(object(), QATConfig(weights="int3"))
    with fake_quantize(var.transformer, weights="int4"), pytest.raises(ValueError, match=r"handles \(fake_quantize\)"):
        qat_distill(var, QATConfig(weights="int3", top_k=4))
    genfast.quantize(dit, weights="int8")
    with pytest.raises(ValueError, match="already quantized"):
        qat_distill(dit, QATConfig(weights="int3"))
    # nothing was changed by the refusals
    _same_state(var.transformer, var_model)
    assert not handles_on(var.transformer)


def test_topkld_s_k_defaults_to_the_samplers_top_k(var_model, tokenizer):
    from genfast.generators import default_sampling

    result = qat_distill(var_pipe(var_model, tokenizer), QATConfig(weights="int3", steps=1, batch_size=2, pool_size=2))
    assert result.top_k == default_sampling(NET["vocab_size"])["top_k"] < NET["vocab_size"]
    assert qat_distill(var_pipe(var_model, tokenizer), QATConfig(weights="int3", loss="js", steps=1, batch_size=2,
                                                                 pool_size=2)).top_k is None


# ---------------------------------------------------------------- the command

def _parser():
    from genfast.cli_qat import add_qat_parser

    parser = argparse.ArgumentParser(prog="genfast")
    add_qat_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_qat_command_writes_a_quantized_pipeline_with_its_log(dit_model, vae, dit_data, tmp_path, capsys):
    from genfast.quant.saving import load_pipeline

    make_pipeline(copy.deepcopy(dit_model), vae).save_pretrained(tmp_path / "fp")
    work = dit_work(dit_data, tmp_path / "work")
    args = _parser().parse_args(["qat", "--pipeline", str(tmp_path / "fp"), "--weights", "int4", "--steps", "2",
                                 "--batch-size", str(DIT_QAT["batch_size"]), "--pool-size", str(DIT_QAT["pool_size"]),
                                 "--work-dir", str(work), "--quiet", "--out", str(tmp_path / "q")])
    assert args.func(args) == 0
    assert f"wrote {tmp_path / 'q'}" in capsys.readouterr().out
    loaded = load_pipeline(tmp_path / "q")
    assert handles_on(loaded.transformer)["quantize"].config.weights == "int4"
    record = json.loads((tmp_path / "q" / "qat.json").read_text())
    assert record["config"]["steps"] == 2 and [r["step"] for r in record["log"]] == [1, 2]
    assert set(record["heldout_loss"]) == {"ptq", "qat"}
    assert (work / "checkpoints").is_dir()
    args = _parser().parse_args(["qat", "--pipeline", str(tmp_path / "q"), "--weights", "int4", "--out",
                                 str(tmp_path / "q2")])
    with pytest.raises(ValueError, match="already a genfast quantized pipeline"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parser().parse_args(["qat", "--pipeline", "p", "--weights", "int9", "--out", "q"])


def test_qat_command_trains_a_var_folder(var_model, tokenizer, tmp_path):
    var_pipe(var_model, tokenizer).save_pretrained(tmp_path / "fp")
    # what train-var records: the sampling the model is evaluated with, whose top-k TopKLD takes as K
    (tmp_path / "fp" / "training.json").write_text(json.dumps({"sampling": {"top_k": 3, "top_p": 0.95}}))
    args = _parser().parse_args(["qat", "--pipeline", str(tmp_path / "fp"), "--weights", "fp4_e2m1",
                                 "--steps", "2", "--batch-size", "4", "--pool-size", "8", "--quiet",
                                 "--out", str(tmp_path / "q")])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "q" / "transformer" / "genfast_quantization.json").read_text())
    assert saved["config"]["weights"] == "fp4_e2m1" and "blocks.0.qkv" in saved["layers"]
    assert "head" not in saved["layers"]  # DEFAULT_SKIP, as genfast quantize
    record = json.loads((tmp_path / "q" / "qat.json").read_text())
    assert record["config"]["top_k"] == record["topkld_k"] == 3 and len(record["log"]) == 2
    args = _parser().parse_args(["qat", "--pipeline", str(tmp_path / "fp"), "--weights", "int3", "--loss", "rkl",
                                 "--steps", "1", "--batch-size", "4", "--pool-size", "8", "--quiet",
                                 "--out", str(tmp_path / "q2")])
    assert args.func(args) == 0  # the recorded top-k is TopKLD's only: another loss runs without it
    assert json.loads((tmp_path / "q2" / "qat.json").read_text())["topkld_k"] is None
    args = _parser().parse_args(["qat", "--pipeline", str(tmp_path / "fp"), "--weights", "int3", "--top-k", "16",
                                 "--out", str(tmp_path / "q3")])
    with pytest.raises(ValueError, match="vocabulary has 16 tokens"):
        args.func(args)
