"""`genfast compare`: the baseline and each variant on the same prompts and seeds, side by side.

A variant is a recipe (variants.py): a registered method, a chain of methods applied to the
baseline pipeline, or a pipeline folder on disk loaded like the baseline. Per variant it measures
speed (median latency of the pipeline call and of the denoising loop, denoiser calls, and peak
memory in an untimed call of its own) and quality (FID in a named feature space, faithfulness to
the baseline's images, prompt accuracy on genfast-mini), then writes report.json, report.md,
grid.png and pareto.png.

A class-conditional pipeline (diffusers' DiTPipeline, e.g. one `genfast train-class` wrote) is compared
the same way on class labels in place of prompts ("red circle": image i has label i and seed + i).
When its labels are genfast's classes, the real images are held-out renders of the same classes and
class accuracy (the embedded evaluator: shape and colour both right) replaces prompt accuracy.

The judges (FID feature network, LPIPS, the evaluator) are built once per run on the run's device,
and each image folder's FID features are computed once.

Under `accelerate launch` the images are shared out over the processes in whole batches (image i
always has seed + i and sits in the same batch), gathered on the main process, and measured there;
the main process alone runs the timed calls while the others wait, so timings are not contended.
"""

from __future__ import annotations

import gc
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.classes import heldout_class_images
from ..io import atomic_write_text
from .cost import CallCost, measure_cost
from .variants import BASELINE, Variant

FEATURE_SPACE_CHOICES = ("auto", "mini-features", "inception")


@dataclass
class CompareSettings:
    pipeline: str | None = None  # a local diffusers pipeline folder; None: the embedded genfast-mini
    # None: held-out genfast-mini evaluation prompts; for a DiTPipeline, the held-out class labels (each in turn)
    prompts: list[str] | None = None
    num_images: int = 64
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0
    batch_size: int = 32
    runs: int = 3  # timed calls per variant (median), after a warm-up call
    feature_space: str = "auto"  # auto: inception when its weights are on disk, else mini-features
    inception_weights: str | None = None
    lpips_weights: str | None = None
    dtype: str = "float32"
    out: str = "outputs/compare"
    command: str = ""  # the command line, recorded in the report
    # a diffusers callback_on_step_end for every generating call (the demo's Cancel raises from it); not recorded
    step_callback: object = field(default=None, repr=False)
    prompts_source: str = field(default="", init=False)

    def __post_init__(self):
        for name in ("num_images", "steps", "batch_size", "runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.feature_space not in FEATURE_SPACE_CHOICES:
            raise ValueError(f"feature space must be one of {FEATURE_SPACE_CHOICES}, got {self.feature_space!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("the prompt list is empty: give at least one prompt")


# ---------------------------------------------------------------- generation


def speaks_mini(pipe, pipeline: str | None) -> bool:
    """Whether the evaluator can judge a text-to-image pipeline's prompts: genfast-mini itself, or a pipeline
    that reads genfast-mini's caption grammar (its tokenizer's vocabulary: the AsCAN text mini, a quantized or
    assembled genfast-mini) and draws 64x64 images as it does."""
    from ..models import MINI, asset_path

    if pipeline is None or Path(pipeline).resolve() == asset_path(MINI).resolve():
        return True
    tokenizer, unet = getattr(pipe, "tokenizer", None), getattr(pipe, "unet", None)
    if tokenizer is None or unet is None:
        return False
    if unet.config.sample_size * pipe.vae_scale_factor != 64:  # the evaluator reads genfast-mini's 64x64 images
        return False
    from transformers import CLIPTokenizer

    return tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(asset_path(MINI) / "tokenizer").get_vocab()


def _load(settings: CompareSettings, device):
    from ..models import load_mini
    from ..quant.saving import load_pipeline  # any pipeline folder, genfast quantized ones included

    dtype = getattr(torch, settings.dtype)
    pipe = load_mini(device, dtype) if settings.pipeline is None else load_pipeline(settings.pipeline, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Pipeline output (N, 3, H, W) in [0, 1] -> uint8, what a saved PNG holds (every metric reads these)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def is_class_pipeline(pipe) -> bool:
    """Whether `pipe` is class-conditional (diffusers' DiTPipeline: class ids in, no prompts)."""
    from diffusers import DiTPipeline

    return isinstance(pipe, DiTPipeline)


def genfast_classes(pipe) -> bool:
    """Whether a DiTPipeline's labels are genfast's classes (genfast.data.classes): only those have real
    renders and an evaluator that judges them."""
    from ..data.classes import class_names

    return all(pipe.labels.get(name) == cid for cid, name in enumerate(class_names()))


def default_class_labels(pipe, n: int) -> list[str]:
    """n label names: the held-out class list (every class in turn) for genfast's classes, else the
    pipeline's own classes in id order, cycled (one name per id)."""
    from ..data.classes import class_names, eval_class_labels

    if genfast_classes(pipe):
        names = class_names()
        return [names[cid] for cid in eval_class_labels(n)]
    _check_has_labels(pipe)
    first = {}
    for name, cid in pipe.labels.items():
        first.setdefault(cid, name)
    names = [first[cid] for cid in sorted(first)]
    return [names[i % len(names)] for i in range(n)]


def _check_has_labels(pipe) -> None:
    if not pipe.labels:
        raise ValueError(f"{type(pipe).__name__} has no label names (no id2label in its model_index.json): "
                         f"genfast compare needs them to name its classes; write the pipeline with "
                         f"genfast.pipelines.class_conditional.make_pipeline, or call keep_labels(pipe) before "
                         f"save_pretrained")


def class_label_ids(pipe, names: list[str]) -> list[int]:
    """The class ids of label names; unknown names are an error listing a few of the pipeline's labels."""
    _check_has_labels(pipe)
    unknown = [name for name in dict.fromkeys(names) if name not in pipe.labels]
    if unknown:
        by_id = sorted(pipe.labels, key=pipe.labels.get)
        raise ValueError(f"unknown class label(s) {', '.join(map(repr, unknown[:5]))}: a class-conditional "
                         f"pipeline takes one of its label names per line, e.g. {', '.join(map(repr, by_id[:6]))} "
                         f"({len(by_id)} in all)")
    return [pipe.labels[name] for name in names]


class _Generator:
    """Runs a pipeline on batches of the image list: image i has prompt i and seed + i."""

    def __init__(self, pipe, prompts: list[str], settings: CompareSettings):
        self.pipe, self.prompts, self.s = pipe, prompts, settings
        n, bs = len(prompts), settings.batch_size
        self.batches = [list(range(a, min(a + bs, n))) for a in range(0, n, bs)]

    def inputs(self, batch: list[int]) -> dict:
        return {"prompt": [self.prompts[i] for i in batch]}

    def kwargs(self, batch: list[int]) -> dict:
        return dict(
            **self.inputs(batch),
            num_inference_steps=self.s.steps,
            guidance_scale=self.s.guidance,
            # CPU generators: the same noise whatever the device, so reports agree across machines
            generator=[torch.Generator().manual_seed(self.s.seed + i) for i in batch],
            output_type="pt",
            **({"callback_on_step_end": self.s.step_callback} if self.s.step_callback is not None else {}),
        )

    def call(self, batch: list[int]):
        return lambda: self.pipe(**self.kwargs(batch)).images

    def on(self, pipe) -> _Generator:
        """The same prompts, seeds and batches on another pipeline (a --pipeline-variant folder)."""
        if is_class_pipeline(pipe):
            raise ValueError(f"the variant is a class-conditional {type(pipe).__name__}, the baseline a "
                             f"{type(self.pipe).__name__}: compare variants of one model")
        return _Generator(pipe, self.prompts, self.s)


class _ClassGenerator(_Generator):
    """A DiTPipeline on batches of the image list: image i has class label i (a name) and seed + i."""

    def __init__(self, pipe, labels: list[str], settings: CompareSettings, ids: list[int] | None = None):
        if settings.step_callback is not None:  # dropping it would make the demo's Cancel do nothing
            raise ValueError(f"step_callback: {type(pipe).__name__} takes no callback_on_step_end, so a per-step "
                             f"callback (the demo's Cancel) cannot run on a class-conditional pipeline; leave it unset")
        super().__init__(pipe, labels, settings)
        self.ids = class_label_ids(pipe, labels) if ids is None else ids

    def inputs(self, batch: list[int]) -> dict:
        return {"class_labels": [self.ids[i] for i in batch]}

    def on(self, pipe) -> _Generator:
        if not is_class_pipeline(pipe):
            raise ValueError(f"the variant is a {type(pipe).__name__}, the baseline a class-conditional "
                             f"{type(self.pipe).__name__}: compare variants of one model")
        # a variant's own label table (it may number the classes apart); a folder saved without its labels
        # (a DiTPipeline forgets them unless keep_labels recorded them) takes the baseline's ids
        return _ClassGenerator(pipe, self.prompts, self.s, None if pipe.labels else self.ids)


def apply_recipe(pipe, variant: Variant, call_kwargs: dict) -> list:
    """Apply a variant's methods left to right, then let each prepare (feature inheritance's calibration
    call) on `call_kwargs`; the handles, in the order applied. Whatever fails, what was applied comes off."""
    from ..api import apply_method

    handles = []
    try:
        for step in variant.steps:
            handles.append(apply_method(pipe, step.method, **step.options))
        # after the whole chain is on: a calibration then sees the pipeline it will be measured on
        for handle in handles:
            handle.prepare(**call_kwargs)
    except BaseException:
        remove_recipe(handles)
        raise
    return handles


def remove_recipe(handles: list) -> None:
    """Take a recipe's handles off in reverse order of application."""
    for handle in reversed(handles):
        handle.remove()


def _variant_pipeline(variant: Variant, base: _Generator, settings: CompareSettings, device) -> _Generator:
    """The generator a variant runs on: the baseline pipeline, or its own folder loaded like the baseline."""
    if variant.folder is None:
        return base
    from ..quant.saving import load_pipeline  # any pipeline folder, genfast quantized ones included

    pipe = load_pipeline(variant.folder, device, getattr(torch, settings.dtype))
    pipe.set_progress_bar_config(disable=True)
    return base.on(pipe)


def generate_variant(variant: Variant, base: _Generator, settings: CompareSettings, state, progress: bool):
    """(uint8 images of every prompt, CallCost) on the main process; (None, None) on the others."""
    from accelerate.utils import gather_object

    gen = _variant_pipeline(variant, base, settings, state.device)
    handles = []
    try:
        # every process prepares on the same (first) batch, so all of them run one schedule
        handles = apply_recipe(gen.pipe, variant, gen.kwargs(gen.batches[0]))
        try:
            mine = gen.batches[state.process_index :: state.num_processes]
            local = []
            for batch in tqdm(mine, desc=f"  {variant.name}", leave=False, disable=not progress):
                local.append((batch[0], _to_uint8(gen.call(batch)())))
            gathered = gather_object(local) if state.num_processes > 1 else local
            cost = None
            if state.is_main_process:
                # batch 0 was generated above on this process: the timed calls below are warm
                cost, _ = measure_cost(gen.pipe, gen.call(gen.batches[0]), runs=settings.runs, handles=handles)
            state.wait_for_everyone()
        finally:
            remove_recipe(handles)
    finally:
        if variant.folder is not None:  # a folder's pipeline: free it before the next variant loads
            gen = handles = None  # handles hold their pipeline too
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if not state.is_main_process:
        return None, None
    images = torch.cat([t for _, t in sorted(gathered, key=lambda item: item[0])])
    return images, cost


# ---------------------------------------------------------------- measuring


@dataclass
class _Judges:
    """What measures quality, set up once per run on the main process, on the run's device."""

    features: object  # fid.FeatureSpace: the FID feature network, built once
    lpips: object | None  # LPIPSMetric, or None with the reason in lpips_note
    lpips_note: str
    evaluator: object | None  # the attribute classifier (genfast-mini and genfast's classes only)

    @classmethod
    def build(cls, settings: CompareSettings, feature_space: str, mini: bool, device):
        """mini: whether the evaluator can judge the images (genfast-mini's prompts, genfast's classes)."""
        from ..models import load_evaluator
        from .fid import FeatureSpace
        from .lpips_metric import LPIPSMetric, lpips_available

        ok, note = lpips_available("alex", settings.lpips_weights)
        lpips = LPIPSMetric("alex", settings.lpips_weights, device=device) if ok else None
        evaluator = load_evaluator(device) if mini else None
        # mini-features is the evaluator's embedding: one network serves prompt accuracy and FID
        features = FeatureSpace(feature_space, settings.inception_weights, device, classifier=evaluator)
        return cls(features, lpips, note, evaluator)


def resolve_feature_space(settings: CompareSettings) -> str:
    """auto -> inception when its weights are on disk, else mini-features; inception without them -> the error."""
    from .fid import inception_weights_path

    if settings.feature_space == "auto":
        try:
            inception_weights_path(settings.inception_weights)
            return "inception"
        except FileNotFoundError:
            return "mini-features"
    if settings.feature_space == "inception":
        inception_weights_path(settings.inception_weights)  # raises with the fix when they are missing
    return settings.feature_space


def _quality(images: torch.Tensor, base: torch.Tensor, judges: _Judges, gen: _Generator) -> dict:
    """Faithfulness to the baseline's images, and prompt accuracy (class accuracy for a class pipeline)."""
    from ..pipelines.class_conditional import class_accuracy
    from .faithfulness import faithfulness
    from .prompt_accuracy import prompt_accuracy

    x, ref = images.float() / 255, base.float() / 255
    faith = faithfulness(x, ref)
    faith["lpips"] = float(judges.lpips(x, ref).mean()) if judges.lpips is not None else None
    if isinstance(gen, _ClassGenerator):
        acc = class_accuracy(x * 2 - 1, gen.ids, judges.evaluator) if judges.evaluator is not None else None
        return {"faithfulness": faith, "class_accuracy": acc}
    acc = prompt_accuracy(x * 2 - 1, gen.prompts, judges.evaluator) if judges.evaluator is not None else None
    return {"faithfulness": faith, "prompt_accuracy": acc}


def _real_images(num_images: int) -> torch.Tensor:
    """Renders of the scenes the default evaluation prompts describe (uint8 NCHW)."""
    from ..data.shapes import ShapesDataset
    from .prompt_accuracy import EVAL_STYLE, HELDOUT_SEED

    ds = ShapesDataset(num_images, seed=HELDOUT_SEED, style=EVAL_STYLE)
    return torch.from_numpy(np.stack([ds.sample(i)[0] for i in range(num_images)])).permute(0, 3, 1, 2)


def _row(variant: Variant, cost: CallCost, base_cost: CallCost, quality: dict, fids: list[dict]) -> dict:
    return {
        "name": variant.name,
        "kind": variant.kind,  # baseline, method, chain or pipeline
        "recipe": [{"method": step.method,
                    "options": {k: list(v) if isinstance(v, tuple) else v for k, v in step.options.items()}}
                   for step in variant.steps],
        "pipeline": variant.folder,
        "speedup": base_cost.call_s / cost.call_s,
        "loop_speedup": base_cost.loop_s / cost.loop_s if cost.loop_s else None,
        "latency": cost.to_dict(),
        "fid": fids,
        **quality,
    }


# ---------------------------------------------------------------- the whole job


def default_prompts(n: int) -> list[str]:
    from .prompt_accuracy import eval_prompts

    return eval_prompts(n)


def run_compare(settings: CompareSettings, variants: list[Variant]) -> dict | None:
    """Run the comparison and write its files; the report on the main process, None on the others."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .fid import save_images
    from .report import write_report

    if not variants:
        raise ValueError("nothing to compare: give at least one --method or --pipeline-variant")
    # cpu=True on a machine without CUDA: only then does accelerate see processes started by
    # `accelerate launch --multi_gpu` (torchrun) there as a multi-CPU group rather than as strangers
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    main = state.is_main_process
    # every process checks what could be wrong before any of them starts work, so none waits on a failed one
    feature_space = resolve_feature_space(settings)
    pipe = _load(settings, state.device)
    classes = is_class_pipeline(pipe)
    what = "class label(s)" if classes else "prompt(s)"
    if settings.prompts is None:
        if classes:
            prompts = default_class_labels(pipe, settings.num_images)
            settings.prompts_source = (f"{settings.num_images} held-out class labels (every class in turn)"
                                       if genfast_classes(pipe) else f"the pipeline's first class labels, cycled "
                                                                     f"to {settings.num_images}")
        else:
            prompts = default_prompts(settings.num_images)
            settings.prompts_source = f"{settings.num_images} held-out genfast-mini evaluation prompts"
    else:
        if classes:  # every label given, also those --num-images leaves unused
            class_label_ids(pipe, settings.prompts)
        prompts = [settings.prompts[i % len(settings.prompts)] for i in range(settings.num_images)]
        settings.prompts_source = f"{len(settings.prompts)} {what} from a file, cycled to {settings.num_images}"
    gen = _ClassGenerator(pipe, prompts, settings) if classes else _Generator(pipe, prompts, settings)
    # the evaluator judges genfast-mini's prompt grammar and genfast's classes, nothing else
    judged = genfast_classes(pipe) if classes else speaks_mini(pipe, settings.pipeline)
    judges = _Judges.build(settings, feature_space, judged, state.device) if main else None
    out = Path(settings.out)
    images, costs = {}, {}
    for variant in tqdm([BASELINE, *variants], desc="compare", disable=not main):
        imgs, cost = generate_variant(variant, gen, settings, state, main)
        if main:
            images[variant], costs[variant] = imgs, cost
            save_images(imgs, out / "images" / variant.slug)
    if not main:
        return None
    for variant in variants:  # a folder may hold another model: faithfulness needs images like the baseline's
        if images[variant].shape != images[BASELINE].shape:
            raise ValueError(f"{variant.name} makes images of shape {tuple(images[variant].shape[1:])}, the "
                             f"baseline {tuple(images[BASELINE].shape[1:])}: compare variants of one model")

    # the features of every folder are computed once, by one network, and reused for each FID
    feats = {v: judges.features.features(out / "images" / v.slug) for v in [BASELINE, *variants]}
    references = {"baseline": feats[BASELINE]}
    real = None
    if classes and judged:  # renders of any list of genfast's classes
        real = heldout_class_images(gen.ids)
    elif not classes and settings.prompts is None:
        real = _real_images(settings.num_images)
    if real is not None:
        references["real"] = judges.features.features(save_images(real, out / "images" / "real"))
    accuracy = "class_accuracy" if classes else "prompt_accuracy"
    rows = []
    for variant in tqdm([BASELINE, *variants], desc="measure"):
        fids = [{**judges.features.fid(feats[variant], ref), "reference": name}
                for name, ref in references.items() if not (variant is BASELINE and name == "baseline")]
        quality = _quality(images[variant], images[BASELINE], judges, gen)
        rows.append(_row(variant, costs[variant], costs[BASELINE], quality, fids))

    report = {
        "command": settings.command,
        "pipeline": settings.pipeline or "embedded genfast-mini",
        "pipeline_class": type(pipe).__name__,
        "prompts": settings.prompts_source,
        "num_images": settings.num_images,
        "image_size": list(images[BASELINE].shape[-2:]),
        "steps": settings.steps,
        "guidance": settings.guidance,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "timed_runs": settings.runs,
        "processes": state.num_processes,
        "device": str(state.device),
        "dtype": settings.dtype,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "feature_space": judges.features.name,
        "lpips": {"available": judges.lpips is not None, "note": judges.lpips_note},
        # class accuracy for a class pipeline, prompt accuracy otherwise, as in the rows
        accuracy: (("attribute classifier, shape and colour both right (genfast's classes only)" if classes
                    else "attribute classifier (genfast-mini's prompt grammar only)") if judged else None),
        "variants": rows,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_report(report, images, [BASELINE, *variants], prompts, out)
    return report
