r"""Distillation-based quantization-aware training (QAT): a quantized student learns from its own fp teacher.

`qat_distill(pipe, QATConfig(weights="int3"))` trains the pipeline's denoiser (the student) with its
weights fake-quantized in `weights` (genfast.quant.fake_quant: the forward reads the rounded weights,
the gradient passes straight through), against a frozen copy of the same fp denoiser (the teacher),
on the data the model was trained on; then quantizes the trained weights with genfast.quantize and
returns the pipeline, quantized, as PTQ would leave it. The layers quantized are those genfast.quantize
packs (its `quantizable` selection, the model's DEFAULT_SKIP), so PTQ and QAT spend the same bits, and
the student's final forward equals the fake-quantized forward it was trained with, bit for bit.

What is distilled, per kind of pipeline:

* VARPipeline (token model): teacher-forced inputs of real class images tokenized by the pipeline's own
  tokenizer (genfast.training.var_train.token_pool, ClassShapesDataset of the training seed), class
  labels with the training's label dropout to the null class (classifier-free guidance keeps working),
  the same inputs through teacher and student; loss on the logits (genfast.training.kd_losses): "topkld"
  (the default; K = `top_k`, by default the sampler's, genfast.generators.default_sampling) | "fkl" | "rkl" |
  "js" | "logit_mse".
* DiTPipeline (genfast's class-conditional minis: ClassDiT, LaMamba, AsCAN) and StableDiffusionPipeline
  (genfast-mini, the t2i minis): output distillation on noised latents of the recipe's latent pool
  (genfast.training.class_cond.latent_pool / genfast.training.t2i.latent_pool; captions with the
  training's empty-caption rate for t2i), x_t = add_noise(x_0, eps, t) with the pipeline scheduler's
  betas at uniform random t:

      L = mean_b  w(t_b) * mean((D_student(x_t, t_b, c) - D_teacher(x_t, t_b, c))^2),
      w(t) = min(SNR(t) + 1, 5) / (SNR(t) + 1)

  (only the first in_channels outputs: a learned-sigma half is not used by the sampler). w(t) is the
  weight the minis were trained with (min-SNR, gamma 5, on v): the student is held to the teacher as
  strongly as the training held the teacher to the data at each timestep, so no step the model learned
  cheaply gets more say than in training; on v-prediction it is min(SNR + 1, 5) times the x_0-error,
  bounded everywhere, and the pure-noise step (SNR 0, where the layout and colours are decided) keeps
  weight 1. It is simple and needs no probe of the quantization error.

lora_rank > 0 (EfficientDM's QALoRA idea): the float weights stay frozen and a peft LoRA (rank r,
alpha r) is trained on each quantized layer instead, INSIDE the quantizer: the layer's forward reads
fq(W + B A) (peft's `get_delta_weight`; its own additive branch is switched off with
`enable_adapters(False)`, since the delta reaches the output through fq). At the end W + B A is merged
(genfast.quant.lora.fuse_lora) and quantized, which gives exactly the forward trained; no peft layer
is left behind. (A LoRA added beside fq(W) instead would mostly be rounded away at the merge.)

Training runs on genfast's TrainLoop: AdamW (no weight decay), a cosine learning-rate decay from `lr`
to 0 over `steps`, gradient norm clipped at 1, checkpoints in `work_dir` and exact resume (a batch is a
pure function of (seed, step)); per-step losses go to `work_dir/qat_log.jsonl`. Trained are all the
denoiser's parameters (the quantized weights through the straight-through estimator), or only the LoRA.
Before and after, the distillation loss is measured on held-out data (renders of HELDOUT_SEED, the
images evaluation uses): `QATResult.heldout = {"ptq": loss of round-to-nearest, "qat": loss after}`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.classes import HELDOUT_SEED, TRAIN_SEED
from .kd_losses import LOSSES, READINGS, check_top_k, distill_loss

__all__ = ["HELDOUT_BATCHES", "OUTPUT_GAMMA", "QATConfig", "QATResult", "distillation_loss", "qat_distill"]

OUTPUT_GAMMA = 5.0  # w(t)'s cap: min_snr_gamma of the minis' recipes
HELDOUT_BATCHES = 4  # batches of batch_size the held-out loss averages
LABEL_DROPOUT = 0.1  # the class recipes' label dropout (VARRecipe / ClassCondRecipe default)
LOG_NAME = "qat_log.jsonl"
_RUN_CONTROL = ("checkpoint_every", "max_minutes")  # not part of the result: a resumed run may change them


@dataclass
class QATConfig:
    """What qat_distill does; validated when built (a bad value raises ValueError naming `QATConfig.<field>`).

    weights: a genfast.quant format name (genfast.quant.formats.FORMATS).
    loss: "auto" ("topkld" for a VARPipeline, "output" for a diffusion pipeline), a token loss of
        genfast.training.kd_losses.LOSSES, or "output" (timestep-weighted output distillation).
    topkld_reading: "direction" (reading B, the default) or "head_tail" (reading A); see kd_losses.
    top_k: TopKLD's K, the top-k the sampler draws from when the model is evaluated (VARPipeline(...,
        top_k=K)); None: genfast's sampling default for the codebook (genfast.generators.default_sampling, what
        train-var evaluates with and records in training.json).
    tail_weight: the tail's weight, lambda of reading "head_tail" / alpha of reading "direction" (1: reading
        A is forward KL exactly).
    steps, batch_size, lr: the training (AdamW, cosine decay of lr to 0).
    lora_rank: 0 trains the weights (straight-through); r > 0 a rank-r LoRA inside the quantizer.
    granularity: "channel", "tensor" or "group:N" for int / fp formats (None: "channel"); must stay None
        for mx* / nvfp4, whose scale blocks are fixed.
    seed: batch order, noise and LoRA initialisation (the data are the training images whatever the seed).
    pool_size: training images encoded once (cached in work_dir) and drawn from.
    checkpoint_every, max_minutes: run control (a resumed run may change them).
    """

    weights: str
    loss: str = "auto"
    topkld_reading: str = "direction"
    top_k: int | None = None
    tail_weight: float = 1.0
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    lora_rank: int = 0
    granularity: str | None = None
    seed: int = 0
    pool_size: int = 2048
    checkpoint_every: int = 100
    max_minutes: float | None = None

    def __post_init__(self):
        from ..quant.formats import FORMATS, get_format, parse_granularity

        def fail(name, what):
            raise ValueError(f"QATConfig.{name} must be {what}, got {getattr(self, name)!r}")

        if self.weights not in FORMATS:
            fail("weights", f"one of {', '.join(FORMATS)}")
        if self.loss not in ("auto", "output", *LOSSES):
            fail("loss", f"one of {('auto', 'output', *LOSSES)}")
        if self.topkld_reading not in READINGS:
            fail("topkld_reading", f"one of {READINGS}")
        for name, low in (("steps", 1), ("batch_size", 1), ("lora_rank", 0), ("seed", 0), ("pool_size", 1),
                          ("checkpoint_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(name, f"an integer >= {low}")
        for name, ok, what in (("lr", lambda v: v > 0, "a finite number > 0"),
                               ("tail_weight", lambda v: v >= 0, "a finite number >= 0")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                fail(name, what)
        if self.max_minutes is not None and (isinstance(self.max_minutes, bool)
                                             or not isinstance(self.max_minutes, (int, float))
                                             or not self.max_minutes > 0):
            fail("max_minutes", "None or a number > 0")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            fail("top_k", "None or an integer >= 1")
        if self.loss not in ("auto", "topkld"):
            self.check_topkld_options(self.loss)
        fmt = get_format(self.weights)
        if fmt.block is not None:
            if self.granularity is not None:
                raise ValueError(f"QATConfig.granularity does nothing for {self.weights}: its scales are fixed per "
                                 f"{fmt.block} weights; drop it")
        else:
            self.granularity = "channel" if self.granularity is None else self.granularity
            try:
                parse_granularity(self.granularity)
            except ValueError as err:
                raise ValueError(f"QATConfig.granularity: {err}") from None

    def check_topkld_options(self, loss: str) -> None:
        """TopKLD's options given with another loss would have no effect: refused, naming the field."""
        for name, default in (("top_k", None), ("topkld_reading", "direction"), ("tail_weight", 1.0)):
            if getattr(self, name) != default:
                raise ValueError(f"QATConfig.{name} is TopKLD's; it has no effect with loss {loss!r}: drop it "
                                 f"(or use loss='topkld')")

    def quant_config(self):
        """The genfast.QuantConfig both the fake quantization and the final quantization use."""
        from ..quant import QuantConfig

        return QuantConfig(weights=self.weights, granularity=self.granularity, kernel="dequantize")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QATResult:
    """pipe: the same pipeline object, its denoiser quantized (genfast.quantize) with the distilled weights;
    handle: that quantize handle (None when not finished); log: [{"step", "loss"}, ...] of every step run
    so far; heldout: {"ptq", "qat"} distillation loss on held-out data before / after; finished: False when
    stopped by max_minutes (the pipeline is then left as it was; rerun to resume from work_dir); top_k: the K
    TopKLD used (None for other losses)."""

    pipe: object
    handle: object
    log: list[dict] = field(default_factory=list)
    heldout: dict = field(default_factory=dict)
    finished: bool = True
    top_k: int | None = None


# ---------------------------------------------------------------- what is distilled, per pipeline kind

class _Task:
    """The data and loss of one kind of pipeline. batch(step, heldout) is a pure function of its arguments."""

    kind: str

    def __init__(self, pipe, config: QATConfig, loss: str):
        from ..pipelines import denoiser_of

        self.pipe, self.config, self.loss_name = pipe, config, loss
        self.student = denoiser_of(pipe)
        self.top_k = None  # TopKLD's K, resolved by _task
        self.pools: dict[bool, object] = {}

    def frozen(self) -> list[torch.nn.Module]:
        """The pipeline parts the data go through (moved to the device, never trained)."""
        return []

    @contextlib.contextmanager
    def frozen_parts(self, device):
        """The frozen parts on `device`, in eval mode without gradients; their modes, flags and devices put back
        after (genfast.training.t2i's _frozen)."""
        from .t2i import _frozen

        with _frozen(*self.frozen()):
            for part in self.frozen():
                part.to(device)
            yield

    labelled = True  # class labels, dropped to the null class as in training (a t2i task's captions are not)

    def recipe_class(self):
        raise NotImplementedError

    def data_recipe(self, heldout: bool):
        """The training recipe whose data (and, held out, fixed batches of HELDOUT_SEED renders) are distilled on."""
        c = self.config
        fields = dict(steps=c.steps, batch_size=c.batch_size,
                      pool_size=HELDOUT_BATCHES * c.batch_size if heldout else c.pool_size,
                      seed=HELDOUT_SEED if heldout else TRAIN_SEED)
        if self.labelled:
            fields["label_dropout"] = LABEL_DROPOUT
        return self.recipe_class()(**fields)

    def batch_recipe(self, heldout: bool):
        """The recipe batch_at draws a batch with: held-out data in a fixed order, training data by config.seed."""
        return self.data_recipe(True) if heldout else replace(self.data_recipe(False), seed=self.config.seed)

    def prepare(self, work_dir: Path, device, progress: bool, which: tuple[bool, ...] = (False, True)) -> None:
        """Encode the training (False) and / or held-out (True) data, cached in work_dir/train, work_dir/heldout
        (inside frozen_parts: the parts are on `device`, in eval mode)."""
        self.device = device
        for heldout in which:
            self.pools[heldout] = self.encode(self.data_recipe(heldout), work_dir / ("heldout" if heldout else "train"),
                                              device, progress)


class _TokenTask(_Task):
    kind = "token"

    def frozen(self):
        return [self.pipe.vqvae]

    def recipe_class(self):
        from .var_train import VARRecipe

        return VARRecipe

    def encode(self, recipe, folder, device, progress):
        from .var_train import token_pool

        return token_pool(self.pipe.vqvae, recipe, folder, device)

    @torch.no_grad()
    def batch(self, step: int, heldout: bool = False) -> dict:
        from .class_cond import batch_at
        from .var_train import split_scales

        pool = self.pools[heldout]
        idx, labels = batch_at(self.batch_recipe(heldout), step, len(pool))
        flat = pool[idx].long().to(self.device)
        inputs = self.pipe.vqvae.teacher_forcing_inputs(split_scales(flat, self.pipe.transformer.patch_nums))
        return {"labels": labels.to(self.device), "inputs": inputs}

    def loss(self, student, teacher, batch) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(batch["labels"], batch["inputs"]).logits
        logits = student(batch["labels"], batch["inputs"]).logits
        c = self.config
        options = dict(top_k=self.top_k, reading=c.topkld_reading, tail_weight=c.tail_weight) \
            if self.loss_name == "topkld" else {}
        return distill_loss(self.loss_name, target, logits, **options)


class _DiffusionTask(_Task):
    """Output distillation, w(t)-weighted (module docstring)."""

    def __init__(self, pipe, config, loss):
        from diffusers import DDPMScheduler

        super().__init__(pipe, config, loss)
        self.noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.channels = self.student.config.in_channels

    def draw(self, x0: torch.Tensor, step: int, heldout: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, noised latents) of one batch: a pure function of (seed, step)."""
        seed = (10**9 + HELDOUT_SEED) if heldout else self.config.seed
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
        return t, self.noise_sched.add_noise(x0, noise, t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        alphas = self.noise_sched.alphas_cumprod[t.cpu()]
        snr = alphas / (1 - alphas)
        return (torch.clamp(snr + 1, max=OUTPUT_GAMMA) / (snr + 1)).to(self.device)

    def loss(self, student, teacher, batch) -> torch.Tensor:
        with torch.no_grad():
            target = self.run(teacher, batch)[:, :self.channels].float()
        pred = self.run(student, batch)[:, :self.channels].float()
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return (self.weight(batch["t"]) * per_sample).mean()


class _ClassTask(_DiffusionTask):
    kind = "class"

    def frozen(self):
        return [self.pipe.vae]

    def recipe_class(self):
        from .class_cond import ClassCondRecipe

        return ClassCondRecipe

    def encode(self, recipe, folder, device, progress):
        from .class_cond import latent_pool

        return latent_pool(self.pipe.vae, recipe, folder, device)

    @torch.no_grad()
    def batch(self, step: int, heldout: bool = False) -> dict:
        from .class_cond import batch_at

        pool = self.pools[heldout]
        idx, labels = batch_at(self.batch_recipe(heldout), step, len(pool))
        t, noisy = self.draw(pool[idx], step, heldout)
        return {"x": noisy.to(self.device), "t": t.to(self.device), "labels": labels.to(self.device)}

    @staticmethod
    def run(model, batch):
        return model(batch["x"], timestep=batch["t"], class_labels=batch["labels"]).sample


class _T2ITask(_DiffusionTask):
    kind = "t2i"

    def frozen(self):
        return [self.pipe.vae, self.pipe.text_encoder]

    labelled = False

    def recipe_class(self):
        from .t2i import T2IRecipe

        return T2IRecipe

    def encode(self, recipe, folder, device, progress):
        from .t2i import latent_pool

        return latent_pool(self.pipe.vae, recipe, folder, device, progress=progress)

    @torch.no_grad()
    def batch(self, step: int, heldout: bool = False) -> dict:
        from ..data.shapes import CaptionStyle
        from .mini import caption_batch, token_ids

        latents, scenes = self.pools[heldout]
        recipe = self.data_recipe(heldout)
        seed = recipe.seed if heldout else self.config.seed
        idx, captions = caption_batch(step, seed, recipe.batch_size, scenes, recipe.p_uncond, CaptionStyle())
        t, noisy = self.draw(latents[torch.from_numpy(idx)], step, heldout)
        cond = self.pipe.text_encoder(token_ids(self.pipe.tokenizer, captions).to(self.device))[0]
        return {"x": noisy.to(self.device), "t": t.to(self.device), "cond": cond}

    @staticmethod
    def run(model, batch):
        return model(batch["x"], batch["t"], batch["cond"]).sample


def _task(pipe, config: QATConfig) -> _Task:
    """The task for this pipeline, with config.loss resolved and checked against its kind."""
    from diffusers import DiTPipeline, StableDiffusionPipeline

    from ..generators import VARPipeline

    if isinstance(pipe, VARPipeline):
        loss = "topkld" if config.loss == "auto" else config.loss
        if loss == "output":
            raise ValueError("QATConfig.loss 'output' is for diffusion pipelines; a VARPipeline's logits distil with "
                             f"one of {LOSSES} (auto: topkld)")
        task = _TokenTask(pipe, config, loss)
        if loss == "topkld":
            from ..generators import default_sampling

            vocab = pipe.transformer.config.vocab_size
            task.top_k = default_sampling(vocab)["top_k"] if config.top_k is None else config.top_k
            try:
                check_top_k(task.top_k, vocab)
            except ValueError as err:
                raise ValueError(f"QATConfig.{err}") from None
        else:
            config.check_topkld_options(loss)
        return task
    kinds = {DiTPipeline: _ClassTask, StableDiffusionPipeline: _T2ITask}
    for cls, task in kinds.items():
        if isinstance(pipe, cls):
            loss = "output" if config.loss == "auto" else config.loss
            if loss != "output":
                raise ValueError(f"QATConfig.loss {loss!r} is a token loss; a {type(pipe).__name__} distils its "
                                 f"denoiser's outputs: use loss='output' (or 'auto')")
            config.check_topkld_options(loss)
            return task(pipe, config, loss)
    raise TypeError(f"qat_distill serves a genfast VARPipeline, a DiTPipeline (the class-conditional minis) or a "
                    f"StableDiffusionPipeline (genfast-mini); got {type(pipe).__name__}")


# ---------------------------------------------------------------- measuring

@torch.no_grad()
def _heldout(task: _Task, student, teacher) -> float:
    was = student.training
    student.eval()
    try:
        losses = [task.loss(student, teacher, task.batch(i, heldout=True)).item() for i in range(HELDOUT_BATCHES)]
    finally:
        student.train(was)
    return sum(losses) / len(losses)


def distillation_loss(pipe, teacher: torch.nn.Module, config: QATConfig, work_dir: str | os.PathLike | None = None
                      ) -> float:
    """The distillation loss qat_distill reports as `heldout`: `config`'s loss between the pipeline's denoiser
    as it is now (float, quantized or fake-quantized) and `teacher` (the fp denoiser), averaged over
    HELDOUT_BATCHES batches of held-out data (renders of HELDOUT_SEED, fixed noise). work_dir: where the
    encoded data are cached (default: a temporary folder)."""
    task = _task(pipe, config)
    device = next(task.student.parameters()).device
    with _work_folder(work_dir) as work, task.frozen_parts(device):
        task.prepare(work, device, progress=False, which=(True,))
        return _heldout(task, task.student, teacher.to(device).eval())


@contextlib.contextmanager
def _work_folder(work_dir):
    if work_dir is not None:
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="genfast-qat-") as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------- LoRA inside the quantizer

def _add_lora(model: torch.nn.Module, fq, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """A rank-r peft LoRA on every fake-quantized layer, its delta fed to the quantizer (fq(W + BA)); returns
    the LoRA parameters (the only ones left trainable)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    pattern = "^(?:" + "|".join(re.escape(name) for name in fq.layers) + ")$"
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern, lora_dropout=0.0), model)
    params = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if name not in fq.layers:
            raise RuntimeError(f"peft wrapped {name}, which is not fake-quantized")
        module.enable_adapters(False)  # no additive branch: the delta enters through fq (and is trained there)
        adapter = module.active_adapters[0]
        for part in (module.lora_A[adapter], module.lora_B[adapter]):
            part.requires_grad_(True)
            params += list(part.parameters())
        fq.set_offset(name, functools.partial(module.get_delta_weight, adapter))
    if not params:
        raise RuntimeError("peft added no LoRA layer")
    return params


def _drop_lora(model: torch.nn.Module) -> None:
    """Take peft's layers off without merging (an interrupted or failed run)."""
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config


# ---------------------------------------------------------------- training

def qat_distill(pipe, config: QATConfig, work_dir: str | os.PathLike | None = None,
                progress: bool = False, data_dir: str | os.PathLike | None = None) -> QATResult:
    """Distil the pipeline's fp denoiser into itself quantized in config.weights (module docstring); returns
    QATResult(pipe, handle, log, heldout, finished).

    The pipeline's denoiser is trained in place where it lives (its device) and ends quantized by
    genfast.quantize (kernel "dequantize", the layout save_quantized writes): save it with
    genfast.save_quantized(result.pipe, out, result.handle). work_dir: checkpoints, encoded data and the
    per-step log; the same call resumes an interrupted run (None: a temporary folder). data_dir: where the
    encoded data are cached instead (default work_dir): the caches are keyed by the data and the frozen
    parts' weights, so runs of one model in other formats can share them. Stopped by
    config.max_minutes, the pipeline is put back as it was and finished is False.
    """
    from ..api import handles_on
    from ..quant import quantize
    from ..quant.fake_quant import fake_quantize
    from ..quant.lora import fuse_lora
    from .checkpoint import state_hash
    from .loop import LoopConfig, TrainLoop, WorkDirLock
    from .recipe_common import trim_log

    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig, got {type(config).__name__}")
    task = _task(pipe, config)
    student = task.student
    if "quantize" in handles_on(student):
        raise ValueError(f"the pipeline's {type(student).__name__} is already quantized; QAT starts from the float "
                         f"pipeline (load it again, or remove that quantize handle)")
    if methods := ", ".join(handles_on(student)):  # e.g. a step-skipping hook: QAT would train around it
        raise ValueError(f"the pipeline's {type(student).__name__} carries genfast handles ({methods}); remove them "
                         f"(handle.remove()) before QAT and apply them again after")
    device = next(student.parameters()).device
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    was_training = student.training
    qconfig = config.quant_config()
    log: list[dict] = []

    def put_back(fq):
        """The pipeline as it was: no LoRA, no fake quantization, the fp weights, flags and mode."""
        _drop_lora(student)
        if fq is not None and not fq.removed:
            fq.remove()
        student.load_state_dict(teacher.state_dict())
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
        student.train(was_training)

    with _work_folder(work_dir) as work, task.frozen_parts(device):
        lock = WorkDirLock(work)
        loop = fq = None
        try:
            task.prepare(Path(data_dir) if data_dir is not None else work, device, progress)
            run_info = {"qat": {k: v for k, v in config.to_dict().items() if k not in _RUN_CONTROL},
                        "pipeline": type(pipe).__name__, "model": type(student).__name__,
                        "teacher": state_hash(teacher), "frozen": state_hash(*task.frozen())}
            fq = fake_quantize(student, qconfig)
            heldout = {"ptq": _heldout(task, student, teacher)}  # fake-quantized, untrained: round to nearest
            if config.lora_rank:
                params = _add_lora(student, fq, config.lora_rank, config.seed)
            else:
                student.requires_grad_(True)
                params = list(student.parameters())
            student.train()
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
            every = config.checkpoint_every if work_dir is not None else config.steps
            loop_config = LoopConfig(steps=config.steps, checkpoint_every=min(every, config.steps),
                                     max_minutes=config.max_minutes, max_grad_norm=1.0, desc=f"qat {config.weights}",
                                     progress=progress, cpu=device.type == "cpu")
            loop = TrainLoop(work, loop_config, {"student": student}, optimizer, run_info=run_info, lock=lock)
            log_path = work / LOG_NAME
            record = {}

            def step_fn(step: int) -> torch.Tensor:
                lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = task.loss(loop.models["student"], teacher, task.batch(step))
                record.update(step=step + 1, loss=loss.item())
                return loss

            def on_step(done: int) -> None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(dict(record)) + "\n")

            trim_log(log_path, loop.resume())
            finished = loop.run(step_fn, on_step)
            if log_path.is_file():
                log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        except BaseException:
            put_back(fq)
            raise
        finally:
            if loop is not None:
                loop.close()
            lock.release()
        if not finished:
            put_back(fq)
            return QATResult(pipe, None, log, heldout, finished=False, top_k=task.top_k)
        try:
            fq.remove()  # the trained float weights (frozen ones under a LoRA)
            if config.lora_rank:
                fuse_lora(student)  # W + BA: what fq(W + BA) rounded in training
            for name, p in student.named_parameters():
                p.requires_grad_(flags[name])
            student.train(was_training)
            handle = quantize(pipe, qconfig)
        except BaseException:
            put_back(fq)
            raise
        heldout["qat"] = _heldout(task, student, teacher)
    return QATResult(pipe, handle, log, heldout, top_k=task.top_k)
