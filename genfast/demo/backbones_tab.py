"""Backbones tab: one class label and seed through each class-conditional backbone (DiT, LaMamba-Diff,
AsCAN, each a diffusers DiTPipeline folder written by `genfast train-class`), the images side by side with
each model's parameters, FLOPs and measured time.

FLOPs are the denoiser's (`genfast.backbones.count_flops`: matmuls, convolutions and attention, one
multiply-add = one flop), counted once per model on the meta device for one forward pass of one latent.
With guidance > 1 DiTPipeline runs each step on the class and on the null class together, in one
denoiser call with a batch of 2, so an image takes steps x 2 forward passes (steps x 1 without guidance).
The time is the whole pipeline call, the VAE decode included (the same VAE for every backbone).

Folders that are not built yet are listed with the command that builds them; the others still run.

Concurrency: the pipelines are shared by every session. A DiTPipeline call mutates its scheduler
(set_timesteps), so each call runs on a view of the shared pipeline with a scheduler of its own
(`with_denoiser`: the very same denoiser and VAE, nothing copied); two sessions then sample one model at
once instead of queueing behind a lock. DiTPipeline takes no step callback, so Cancel reaches the loop
through a forward pre-hook on the denoiser; as the denoiser is shared, the hook acts only on calls made
from its own job's thread (a pipeline calls its denoiser in the caller's thread), and comes off after
the call, also when it fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from .common import (
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    Jobs,
    Tab,
    cancel_hook,
    check_int,
    check_number,
    enlarge,
    fmt_seconds,
    sampling_inputs,
    to_pil,
    user_errors,
    with_denoiser,
)

INTRO = ("One class and seed through each class-conditional backbone (DiTPipeline folders written by "
         "`genfast train-class` with one recipe and budget): the images side by side, with each denoiser's "
         "parameters, FLOPs and the measured time of the call.")


@dataclass(frozen=True)
class Backbone:
    """One model the tab shows: its name on the page, its DiTPipeline folder, and the command that writes
    the folder when it is missing."""

    name: str
    folder: Path
    command: str


def default_backbones() -> list[Backbone]:
    """The embedded class-conditional pipelines (assets/genfast-{dit,lamamba,ascan}-class), trained with one
    recipe and budget at equal parameters."""
    from ..models import ASCAN_CLASS, ASSETS, DIT_CLASS, LAMAMBA_CLASS, rebuild_command

    return [Backbone(name, ASSETS / folder, rebuild_command(folder))
            for name, folder in (("DiT", DIT_CLASS), ("LaMamba-Diff", LAMAMBA_CLASS), ("AsCAN", ASCAN_CLASS))]


def is_built(model) -> bool:
    """Whether a model's folder (anything with .folder: a Backbone, a bits_tab.BitsModel) holds a pipeline."""
    return (Path(model.folder) / "model_index.json").is_file()


def built_status(models: list, nothing: str) -> str:
    """What a tab says before a run: the models found, then the missing ones with their build commands."""
    found = [m for m in models if is_built(m)]
    head = f"Found: {', '.join(m.name for m in found)}." if found else nothing
    return "\n\n".join(filter(None, [head, missing_note([m for m in models if not is_built(m)])]))


def split_built(models: list, nothing: str) -> tuple[list, list]:
    """(the models whose folder holds a pipeline, the others); none built: a gr.Error that starts with
    `nothing` and names each build command."""
    present = [m for m in models if is_built(m)]
    missing = [m for m in models if not is_built(m)]
    if not present:
        raise gr.Error(f"{nothing} " + missing_note(missing).replace("\n", " "))
    return present, missing


def check_class(label) -> str:
    from ..data.classes import class_names

    names = class_names()
    if label not in names:
        raise gr.Error(f"Class must be one of the {len(names)} class names ({names[0]!r} ... {names[-1]!r}), "
                       f"got {label!r}.")
    return label


def missing_note(missing: list[Backbone]) -> str:
    from ..models import shown_path

    lines = [f"- **{b.name}** (`{shown_path(Path(b.folder))}`): `{b.command}`" for b in missing]
    return "\n".join(["Not built yet (build with the command, then run again):", *lines]) if lines else ""


@dataclass
class Loaded:
    """A backbone's pipeline, loaded once, and its costs, counted once."""

    pipe: object  # diffusers.DiTPipeline
    parameters: int
    gflops: float  # one forward pass of one latent (count_flops, batch 1)


def load_backbone(folder, device) -> Loaded:
    """A DiTPipeline folder, loaded offline (a genfast quantized one too), warmed up, with its costs."""
    from diffusers import DiTPipeline

    from .. import backbones  # noqa: F401 -- diffusers finds a folder's denoiser class only in modules imported
    from ..backbones import count_flops, count_params
    from ..pipelines import class_conditional  # noqa: F401 -- ClassDiT, the DiT baseline's class
    from ..quant.saving import load_pipeline

    pipe = load_pipeline(folder, device)
    if not isinstance(pipe, DiTPipeline):
        why = (f"{folder} holds a {type(pipe).__name__}; the Backbones tab shows class-conditional DiTPipeline "
               f"folders (written by `genfast train-class`)")
        raise ValueError(why)  # noqa: TRY004 -- a ValueError is shown to the user as it is
    pipe.set_progress_bar_config(disable=True)
    # a process's first call pays for allocations no later call pays for: keep that out of the measured time
    pipe([0], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    return Loaded(pipe, count_params(pipe.transformer), count_flops(pipe.transformer))


def numbers_table(n: dict) -> str:
    rows = n["models"]
    passes = n["forwards_per_image"]
    how = f"{n['steps']} steps x 2: class and null class" if n["samples_per_call"] == 2 else f"{n['steps']} steps"
    lines = [
        "| | " + " | ".join(r["name"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| parameters | " + " | ".join(f"{r['parameters']:,}" for r in rows) + " |",
        "| GFLOPs per forward (one latent) | " + " | ".join(f"{r['gflops_per_forward']:.3g}" for r in rows) + " |",
        f"| GFLOPs per image ({passes} forwards: {how}) | "
        + " | ".join(f"{r['gflops_per_image']:.3g}" for r in rows) + " |",
        "| time (this call, VAE decode included) | " + " | ".join(fmt_seconds(r["seconds"]) for r in rows) + " |",
    ]
    note = missing_note([Backbone(m["name"], Path(m["folder"]), m["command"]) for m in n["missing"]])
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


class BackbonesTab(Tab):
    TAB = "backbones"

    def backbones(self) -> list[Backbone]:
        """The folders shown: DemoModels.class_pipelines when set (tests, other folders), else the embedded ones."""
        chosen = self.models.class_pipelines
        return list(chosen) if chosen is not None else default_backbones()

    def load(self, backbone: Backbone) -> Loaded:
        folder = Path(backbone.folder)
        return self.models.shared(f"backbones:{folder.resolve()}", lambda: load_backbone(folder, self.models.device))

    def status(self) -> str:
        """What the page says before a run: which backbones are there and how to build the others."""
        return built_status(self.backbones(), "No backbone is built yet.")

    @user_errors
    def run(self, label, seed, steps, guidance, request: gr.Request = None,
            progress=gr.Progress()):  # noqa: B008 -- Gradio injects its tracker there
        """([(image, caption)] for the gallery, numbers markdown, numbers)."""
        label = check_class(label)
        seed = check_int("Seed", seed, 0, MAX_SEED)
        steps = check_int("Steps", steps, 1, MAX_STEPS)
        guidance = check_number("Guidance", guidance, 0.0, MAX_GUIDANCE)
        present, missing = split_built(self.backbones(), "No class-conditional backbone is built yet.")
        flag = self.jobs.start(request, self.TAB)
        samples = 2 if guidance > 1 else 1  # DiTPipeline batches the null class with guidance > 1 only
        gallery, rows = [], []
        for backbone in present:
            Jobs.check(flag)  # Cancel between models too (a load can take a while)
            progress(None, desc=f"loading {backbone.name}")
            loaded = self.load(backbone)
            Jobs.check(flag)
            image, seconds, calls = self._sample(loaded, backbone.name, label, seed, steps, guidance, flag, progress)
            rows.append({"name": backbone.name, "folder": str(backbone.folder), "parameters": loaded.parameters,
                         "gflops_per_forward": loaded.gflops, "gflops_per_call": loaded.gflops * samples,
                         "gflops_per_image": loaded.gflops * samples * steps, "denoiser_calls": calls,
                         "seconds": seconds})
            caption = f"{backbone.name}: {fmt_seconds(seconds)}, {rows[-1]['gflops_per_image']:.3g} GFLOPs"
            gallery.append((image, caption))
        numbers = {"class": label, "seed": seed, "steps": steps, "guidance": guidance, "samples_per_call": samples,
                   "forwards_per_image": steps * samples, "models": rows,
                   "missing": [{"name": b.name, "folder": str(b.folder), "command": b.command} for b in missing]}
        return gallery, numbers_table(numbers), numbers

    @staticmethod
    def _sample(loaded: Loaded, name: str, label: str, seed: int, steps: int, guidance: float, flag, progress):
        """(enlarged image, seconds of the call, denoiser calls) of one model on the label and seed."""
        from ..eval.compare import class_label_ids
        from ..eval.cost import time_call

        pipe = loaded.pipe
        cid = class_label_ids(pipe, [label])[0]  # the folder's own label table
        view = with_denoiser(pipe, pipe.transformer, type(pipe.scheduler).from_config(pipe.scheduler.config))
        with cancel_hook(pipe.transformer, flag, progress, name, steps) as calls:
            timed, images = time_call(view, lambda: view(
                [cid], guidance_scale=guidance, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images)
        return enlarge(to_pil(images[0])), timed.call_s, calls[0]

    def build(self) -> None:
        from ..data.classes import class_names

        t = self.TAB
        gr.Markdown(INTRO)
        gr.Markdown(self.status, elem_id=f"{t}-status")  # a function: read again at every page load
        with gr.Row():
            with gr.Column(scale=1):
                label = gr.Dropdown(class_names(), value=class_names()[0], label="Class", elem_id=f"{t}-class")
                seed, steps, guidance = sampling_inputs(t)
                run, stop = self.buttons("Sample each backbone")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Same class and seed through each backbone", elem_id=f"{t}-images",
                                     columns=3, object_fit="contain", format="png", height="auto")
                table, raw = self.numbers()
        # its own queue: it borrows no worker pipeline
        self.wire(run, stop, [label, seed, steps, guidance], [gallery, table, raw], concurrency_id=t)
