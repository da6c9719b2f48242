"""What every tab of the demo shares: the models (loaded once), the worker pipelines, cancellation,
input checks that answer with a `gr.Error`, and image conversion.

Models. The demo loads each model once. Work that changes a denoiser (a method's hooks, quantized
weights) runs on a *worker*: a pipeline with its own copy of the denoiser, scheduler and tokenizer
and the very same VAE and text encoder objects as every other worker (Nunchaku's demo shares them
the same way). A fast tokenizer is not thread-safe: each call sets its padding and truncation on the
one Rust tokenizer, and a pipeline call tokenizes twice with different settings, so two workers
sharing one could encode a prompt with the other's settings (CI once saw a concurrent job lose its
prompt); a tokenizer is small, so each worker has its own. A job takes a worker from a pool for its whole run and gives it back, so
concurrent clients never see each other's hooks, and a second job waits for a free worker.

Cancellation. Gradio's `cancels=` stops waiting for a job, but a job running in a thread goes on
to its end. So a Cancel button also sets a flag for its session and tab (`Jobs.cancel`); the job
reads the flag at every denoising step and training step (`Jobs.check`) and stops there.
"""

from __future__ import annotations

import copy
import functools
import queue
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

MAX_STEPS = 100
MAX_SEED = 2**31 - 1
MAX_GUIDANCE = 20.0


class Cancelled(Exception):
    """Raised inside a job whose Cancel button was pressed."""


# ---------------------------------------------------------------- errors


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error("Type a prompt first, for example 'a red circle on a blue background'.")
    return prompt.strip()


def check_int(name: str, value, low: int, high: int) -> int:
    """An integer in [low, high] (a float like 25.0 from a slider counts), else a gr.Error naming the field."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
    if not ok or not low <= int(value) <= high:
        raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {value!r}.")
    return int(value)


def check_number(name: str, value, low: float, high: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or not low <= float(value) <= high:
        raise gr.Error(f"{name} must be a number from {low:g} to {high:g}, got {value!r}.")
    return float(value)


def check_generation(prompt, seed, steps, guidance) -> tuple[str, int, int, float]:
    """The inputs every text-to-image tab takes, checked: (prompt, seed, steps, guidance)."""
    return (check_prompt(prompt), check_int("Seed", seed, 0, MAX_SEED), check_int("Steps", steps, 1, MAX_STEPS),
            check_number("Guidance", guidance, 0.0, MAX_GUIDANCE))


def user_errors(fn):
    """Handlers raise gr.Error for what the user can fix; genfast's own ValueError / FileNotFoundError
    already name the problem and the fix, so they are shown as they are. Anything else is a bug: Gradio
    then shows a plain 'Error' (never a traceback) and the server log has the traceback."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Cancelled:
            raise gr.Error("Cancelled.") from None
        except (ValueError, FileNotFoundError) as err:
            raise gr.Error(str(err)) from None

    return wrapped


# ---------------------------------------------------------------- cancellation


class Jobs:
    """Cancel flags per (browser session, tab): the Cancel button sets every flag of its session and tab, each
    running job reads its own. Flags are held weakly: a finished job's flag goes with the job."""

    def __init__(self):
        self._flags: dict[tuple[str, str], weakref.WeakSet] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(request: gr.Request | None, tab: str) -> tuple[str, str]:
        return (getattr(request, "session_hash", None) or "local", tab)

    def start(self, request: gr.Request | None, tab: str) -> threading.Event:
        """A fresh, unset flag for a job that starts now (a press before it started does not count)."""
        flag = threading.Event()
        with self._lock:
            self._flags = {k: v for k, v in self._flags.items() if v}  # sessions with no running job
            self._flags.setdefault(self._key(request, tab), weakref.WeakSet()).add(flag)
        return flag

    def cancel(self, request: gr.Request | None, tab: str) -> None:
        with self._lock:
            flags = list(self._flags.get(self._key(request, tab), ()))
        for flag in flags:
            flag.set()

    @staticmethod
    def check(flag: threading.Event | None) -> None:
        if flag is not None and flag.is_set():
            raise Cancelled


def step_callback(flag: threading.Event | None, progress=None, desc: str = "denoising"):
    """A diffusers `callback_on_step_end` that stops the call when cancelled and moves the progress bar."""

    def callback(pipe, step: int, timestep, kwargs: dict) -> dict:
        Jobs.check(flag)
        if progress is not None:
            total = getattr(pipe, "num_timesteps", None) or None
            progress((step + 1, total) if total else None, desc=desc)
        return kwargs

    return callback


@contextmanager
def cancel_hook(denoiser: torch.nn.Module, flag: threading.Event | None, progress, desc: str, total: int):
    """For a pipeline that takes no step callback (DiTPipeline, VARPipeline): a forward pre-hook on its
    denoiser that stops the call when cancelled and moves the progress bar; yields a list holding the count
    of the calls made. The denoiser may be shared by sessions: the hook acts only on calls from the thread
    that entered (a pipeline calls its denoiser in the caller's thread), and comes off on exit, also on error."""
    me, calls = threading.get_ident(), [0]

    def on_call(module, args):
        if threading.get_ident() == me:  # another session's call on the shared denoiser is not ours to stop
            Jobs.check(flag)
            calls[0] += 1
            progress((calls[0], total), desc=desc, unit="steps")

    hook = denoiser.register_forward_pre_hook(on_call)
    try:
        yield calls
    finally:
        hook.remove()


class SameSeed:
    """One job's text-to-image call, repeatable on any pipeline: the same prompt, settings and seed (a fresh CPU
    generator each time), with the job's cancel flag and progress bar on every denoising step."""

    def __init__(self, prompt: str, seed: int, steps: int, guidance: float, flag=None, progress=None):
        self.seed, self.flag, self.progress = seed, flag, progress
        self.settings = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="pt")

    def kwargs(self, desc: str) -> dict:
        return dict(self.settings, generator=torch.Generator().manual_seed(self.seed),
                    callback_on_step_end=step_callback(self.flag, self.progress, desc))

    def call(self, pipe, desc: str):
        """A no-argument call of `pipe` (for eval.cost.time_call) returning its images (N, 3, H, W) in [0, 1]."""
        return lambda: pipe(**self.kwargs(desc)).images


# ---------------------------------------------------------------- tabs

DEFAULT_PROMPT = "a red circle on a blue background"


class Tab:
    """What every tab has: its key (TAB: Jobs' key, the prefix of its elem_ids and its API name), the shared
    models and cancel flags, a Cancel handler, and the wiring of its Run and Cancel buttons."""

    TAB = ""

    def __init__(self, models: DemoModels, jobs: Jobs):
        self.models, self.jobs = models, jobs

    def cancel(self, request: gr.Request = None) -> None:
        self.jobs.cancel(request, self.TAB)

    def buttons(self, label: str) -> tuple[gr.Button, gr.Button]:
        with gr.Row():
            return (gr.Button(label, variant="primary", elem_id=f"{self.TAB}-run"),
                    gr.Button("Cancel", elem_id=f"{self.TAB}-cancel"))

    def numbers(self, label: str = "raw numbers") -> tuple[gr.Markdown, gr.JSON]:
        """The numbers as a table for people and, folded away, as JSON (what gradio_client callers read)."""
        table = gr.Markdown(elem_id=f"{self.TAB}-numbers")
        with gr.Accordion(label, open=False):
            raw = gr.JSON(elem_id=f"{self.TAB}-json")
        return table, raw

    def wire(self, run: gr.Button, stop: gr.Button, inputs: list, outputs: list, concurrency_id: str = "pipelines",
             concurrency_limit: int | None = None) -> None:
        """Run -> self.run (API name TAB) in the queue; Cancel -> the job's flag and Gradio's own cancel.

        Jobs on worker pipelines share the "pipelines" limit: one job per worker, whatever its tab."""
        limit = self.models.workers if concurrency_limit is None else concurrency_limit
        event = run.click(self.run, inputs, outputs, api_name=self.TAB, concurrency_id=concurrency_id,
                          concurrency_limit=limit)
        stop.click(self.cancel, None, None, cancels=[event], api_name=f"cancel_{self.TAB}", queue=False)


def prompt_box(t: str) -> gr.Textbox:
    return gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, elem_id=f"{t}-prompt")


def sampling_inputs(t: str) -> tuple[gr.Number, gr.Slider, gr.Slider]:
    """Seed, steps and guidance in one row (what check_generation checks)."""
    with gr.Row():
        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id=f"{t}-seed")
        steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Steps", elem_id=f"{t}-steps")
        guidance = gr.Slider(0, MAX_GUIDANCE, value=5.0, step=0.5, label="Guidance", elem_id=f"{t}-guidance")
    return seed, steps, guidance


# ---------------------------------------------------------------- models


def with_denoiser(pipe, denoiser: torch.nn.Module, scheduler=None):
    """A pipeline of `pipe`'s class with `denoiser` (and `scheduler`, if given) in place of its own and every
    other component the very same object: nothing is loaded or copied."""
    import inspect

    from ..pipelines import denoiser_of

    name = next(k for k, v in pipe.components.items() if v is denoiser_of(pipe))
    parts = {**pipe.components, name: denoiser}
    if scheduler is not None:
        parts["scheduler"] = scheduler
    # the constructor's own settings too (requires_safety_checker=False keeps diffusers from warning each time)
    accepted = inspect.signature(type(pipe).__init__).parameters
    parts.update({k: v for k, v in pipe.config.items() if k in accepted and k not in parts})
    out = type(pipe)(**parts)
    out.set_progress_bar_config(disable=True)
    return out


def _worker_copy(pipe):
    """A worker: its own copy of the denoiser, its own scheduler (it keeps per-call state) and tokenizers, the
    rest shared."""
    from ..pipelines import denoiser_of

    denoiser = denoiser_of(pipe)
    # the denoiser may carry a genfast record (a quantized folder's handle) that points at the pipeline: the
    # copy keeps pointing at the same pipeline and components instead of copying all of them
    keep = {id(pipe): pipe, **{id(c): c for c in pipe.components.values() if c is not denoiser}}
    worker = with_denoiser(pipe, copy.deepcopy(denoiser, memo=keep),
                           type(pipe.scheduler).from_config(pipe.scheduler.config))
    tokenizers = {k: copy.deepcopy(v) for k, v in pipe.components.items() if k.startswith("tokenizer") and v is not None}
    worker.register_modules(**tokenizers)  # see the module docstring: tokenizers are not thread-safe
    return worker


class DemoModels:
    """The demo's models, each loaded once; `worker()` lends a pipeline for one job.

    pipeline: a local diffusers pipeline folder, or None for the embedded genfast-mini.
    workers: how many jobs may run on pipelines at once (the queue's concurrency limit).
    class_pipelines: the Backbones tab's DiTPipeline folders (a list of backbones_tab.Backbone), or None for
    the embedded ones (assets/genfast-*-class); settable after construction.
    bits_pipelines: the Bits tab's models, one per family (a list of bits_tab.BitsModel), or None for the
    embedded ones (assets/genfast-var-mini, assets/genfast-dit-class); settable after construction.
    """

    def __init__(self, pipeline: str | None = None, device: str = "cpu", workers: int = 2):
        from ..models import load_mini
        from ..quant.saving import load_pipeline

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.pipeline_path = pipeline
        self.device = torch.device(device)
        base = load_mini(device) if pipeline is None else load_pipeline(pipeline, device)
        base.set_progress_bar_config(disable=True)
        self.base = base
        self.workers = workers
        self._pool: queue.Queue = queue.Queue()
        for i in range(workers):
            self._pool.put(base if i == 0 else _worker_copy(base))
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._cache: dict[str, object] = {}
        self.class_pipelines: list | None = None
        self.bits_pipelines: list | None = None

    def warm_up(self) -> None:
        """One short call per worker: a process's first call pays for allocations no later call pays for,
        and the first job's baseline would look slower than it is."""
        for _ in range(self.workers):
            with self.worker() as pipe:
                pipe("warm-up", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")

    @property
    def is_mini(self) -> bool:
        return self.pipeline_path is None

    @contextmanager
    def worker(self):
        """A pipeline nobody else uses until the block ends; whatever a job put on it must come off inside."""
        pipe = self._pool.get()
        try:
            yield pipe
        finally:
            self._pool.put(pipe)

    def shared(self, key: str, load):
        """`load()` once per key (thread-safe): the evaluator, the assembled student, the heads prior ...

        One lock per key: a slow load (a checkpoint written to measure its size) holds up only its own key."""
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._cache:
                self._cache[key] = load()
            return self._cache[key]

    def evaluator(self):
        from ..models import load_evaluator

        return self.shared("evaluator", lambda: load_evaluator(self.device))


# ---------------------------------------------------------------- images


def to_pil(image) -> Image.Image:
    """A (3, H, W) tensor in [0, 1], an HWC uint8 array or a PIL image -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """Pipeline output in [0, 1] as the pixels a saved PNG holds (every metric on the page is taken on those)."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def enlarge(image: Image.Image, side: int = 256) -> Image.Image:
    """Nearest-neighbour enlargement of a small image (genfast-mini draws 64x64) so pixels stay sharp."""
    if image.width >= side:
        return image
    k = max(1, side // image.width)
    return image.resize((image.width * k, image.height * k), Image.NEAREST)


def fmt_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


@functools.cache
def demo_dir() -> Path:
    """Where the demo writes files it offers for download (Gradio serves them from its cache): a folder of this
    process's own, made private by mkdtemp (a fixed name in /tmp could be another user's)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="genfast-demo-"))
