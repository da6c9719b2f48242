"""What the one-recipe denoiser trainers share (`genfast train-class`, `genfast train-t2i`).

Each trainer keeps what differs: its data, objective, evaluation and pipeline. Here is the rest:
validation of the recipe fields they share, the latent pool's cache, the run around TrainLoop
(lock, resume, the per-step log, evaluation every eval_every steps, EMA copy-back), the weights an
evaluation samples from, and the atomic pipeline folder with training.json.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ..io import atomic_dir, atomic_write_text
from .checkpoint import state_hash
from .loop import MIXED_PRECISION, LoopConfig, TrainLoop, WorkDirLock
from .mini import NOISE_SCHEDULE

__all__ = ["PoolCache", "RecipeChecks", "run_recipe", "run_record", "trim_log", "write_pipeline"]

POOL_NAME = "latent_pool.safetensors"
LOG_NAME = "train_log.jsonl"
RUN_CONTROL = ("checkpoint_every", "max_minutes", "cpu", "eval_every", "eval_images")  # not part of the result


class RecipeChecks:
    """Mixin for a recipe dataclass: validates the shared fields in __post_init__ (ValueError naming
    `<Class>.<field>`), and gives tiny() and to_dict().

    The dataclass declares the fields (steps, batch_size, lr, warmup, weight_decay, min_snr_gamma,
    ema_decay, ema_power, max_grad_norm, pool_size, seed, checkpoint_every, max_minutes,
    mixed_precision, cpu, eval_every, eval_images, and its own chance field) and names here its
    chance field with what it means, and whether min_snr_gamma may be None (plain MSE).
    """

    _CHANCE: tuple[str, str]  # (field, what it is), a probability in [0, 1)
    _GAMMA_OPTIONAL = False

    def _integer(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{type(self).__name__}.{name} must be an integer >= {low}, got {value!r}")

    def _number(self, name: str, ok: Callable[[float], bool], what: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"{type(self).__name__}.{name} must be {what}, got {value!r}")

    def _check_run(self, optional=("max_grad_norm", "max_minutes")) -> None:
        """The fields every loop reads: optional positive numbers, EMA, mixed precision."""
        for name in optional:
            if getattr(self, name) is not None:
                self._number(name, lambda v: v > 0, "None or > 0")
        if self.ema_decay is not None:
            self._number("ema_decay", lambda v: 0 < v < 1, "None or in (0, 1)")
        if self.ema_power is not None:
            if self.ema_decay is None:
                raise ValueError(f"{type(self).__name__}.ema_power has no effect without ema_decay: set ema_decay "
                                 "in (0, 1) or ema_power=None")
            self._number("ema_power", lambda v: v > 0, "None or > 0")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"{type(self).__name__}.mixed_precision must be one of {MIXED_PRECISION}, "
                             f"got {self.mixed_precision!r}")

    def __post_init__(self):
        cls = type(self).__name__
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("pool_size", 1), ("seed", 0),
                          ("checkpoint_every", 1), ("eval_every", 0)):
            self._integer(name, low)
        self._number("lr", lambda v: v > 0, "> 0")
        self._number("weight_decay", lambda v: v >= 0, ">= 0")
        chance, what = self._CHANCE
        self._number(chance, lambda v: 0 <= v < 1, f"in [0, 1) ({what})")
        optional = ("max_grad_norm", "max_minutes")
        if self._GAMMA_OPTIONAL:
            optional = ("min_snr_gamma", *optional)
        else:
            self._number("min_snr_gamma", lambda v: v > 0, "> 0")
        self._check_run(optional)
        if self.eval_images is not None:
            if not self.eval_every:
                raise ValueError(f"{cls}.eval_images has no effect with eval_every=0: set eval_every > 0")
            self._integer("eval_images", 1)

    @classmethod
    def tiny(cls, **changes):
        """A few steps on a small pool: checks the whole path in seconds (tests, smoke runs)."""
        return cls(**{"steps": 3, "batch_size": 4, "warmup": 1, "pool_size": 16, "checkpoint_every": 2,
                      "ema_decay": 0.9, "ema_power": None, "eval_every": 0, **changes})

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- data

class PoolCache:
    """A pool's scaled latents in `<work_dir>/latent_pool.safetensors`, stored under a key of the data
    (pool_size, seed) and the VAE's weights: a changed key reads as no cache, and the pool is encoded again."""

    def __init__(self, work_dir: str | os.PathLike, recipe, vae):
        self.path = Path(work_dir) / POOL_NAME
        self.key = json.dumps({"pool_size": recipe.pool_size, "seed": recipe.seed, "vae": state_hash(vae)},
                              sort_keys=True)

    def load(self) -> torch.Tensor | None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.path.is_file():
            return None
        with safe_open(str(self.path), "pt") as f:
            if (f.metadata() or {}).get("key") != self.key:
                return None
        return load_file(str(self.path))["latents"]

    def save(self, latents: torch.Tensor) -> torch.Tensor:
        """Store `latents` (a temp file renamed into place) and return them."""
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        save_file({"latents": latents}, str(tmp), metadata={"key": self.key})
        os.replace(tmp, self.path)
        return latents


# ---------------------------------------------------------------- training

def run_record(recipe, model, **inputs) -> dict:
    """run.json's record of a run's inputs (a resumed run must match it): the recipe less its run
    controls, the model's class and config, `inputs` (hashes of the frozen parts), the noise schedule."""
    return {"recipe": {k: v for k, v in recipe.to_dict().items() if k not in RUN_CONTROL},
            "model": type(model).__name__,
            "model_config": json.loads(json.dumps({k: v for k, v in dict(model.config).items()
                                                   if not k.startswith("_")}, default=str)),
            **inputs, "noise_schedule": NOISE_SCHEDULE}


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint a run resumes from (they will be written again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def run_recipe(model: torch.nn.Module, work_dir: str | os.PathLike, recipe, *, name: str, desc: str,
               inputs: dict, lr_at: Callable[[int], float], prepare: Callable[[TrainLoop], Callable],
               evaluate: Callable[[torch.nn.Module, object], dict], describe: Callable[[dict], str],
               progress: bool, log: Callable[[str], None]) -> tuple[torch.nn.Module, bool]:
    """Train `model` (in place, as TrainLoop model `name`) with AdamW on `recipe`; returns (model, finished).

    prepare(loop) moves the frozen parts to the loop's device, reads the data and returns
    loss_at(step), the loss of that step's batch (this process's share of it); lr_at(step) is
    set before each step. inputs: hashes of the frozen parts, for run.json (see run_record). Each step
    appends {step, loss, lr} to train_log.jsonl; every recipe.eval_every steps also the accuracies
    evaluate(model, evaluator) gives for a copy of the model with its EMA weights (see
    _evaluate_averaged), and a line `describe(record)` goes to `log`.
    finished False: stopped by max_minutes with a checkpoint in `work_dir`; the same call resumes.
    When finished, the model holds the EMA weights (if ema_decay is set); it is returned in eval mode.
    """
    work = Path(work_dir)
    lock = WorkDirLock(work)
    loop = None
    try:
        model.requires_grad_(True).train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        config = LoopConfig(steps=recipe.steps, checkpoint_every=recipe.checkpoint_every,
                            max_minutes=recipe.max_minutes, mixed_precision=recipe.mixed_precision,
                            ema_decay=recipe.ema_decay, ema_power=recipe.ema_power,
                            max_grad_norm=recipe.max_grad_norm, desc=desc, progress=progress, cpu=recipe.cpu)
        loop = TrainLoop(work, config, {name: model}, opt, ema=(name,) if recipe.ema_decay else (),
                         run_info=run_record(recipe, model, **inputs), lock=lock)
        acc = loop.accelerator
        if recipe.batch_size % acc.num_processes:
            raise ValueError(f"{type(recipe).__name__}.batch_size ({recipe.batch_size}) must divide evenly over "
                             f"the {acc.num_processes} processes")
        loss_at = prepare(loop)
        log_path = work / LOG_NAME
        state = {}

        def step_fn(step: int):
            lr = lr_at(step)  # a function of the step: resume has nothing to restore
            for group in opt.param_groups:
                group["lr"] = lr
            loss = loss_at(step)
            state["record"] = {"step": step + 1, "loss": loss.item(), "lr": lr}
            return loss

        start = loop.resume()
        if acc.is_main_process:
            trim_log(log_path, start)
        if start:
            log(f"[{desc}] resumed at step {start} of {recipe.steps}")
        evaluator = None

        def on_step(done: int):
            nonlocal evaluator
            record = state["record"]
            if recipe.eval_every and done % recipe.eval_every == 0 and acc.is_main_process:
                if evaluator is None:
                    from ..models import load_evaluator

                    evaluator = load_evaluator(acc.device)
                record.update(_evaluate_averaged(loop, name, evaluate, evaluator))
                log(f"[{desc}] step {done}: {describe(record)}")
            if acc.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

        finished = loop.run(step_fn, on_step)
        if finished and recipe.ema_decay:
            loop.ema_models[name].copy_to(model.parameters())
        if not finished:
            log(f"[{desc}] stopped at step {loop.step} of {recipe.steps} (max_minutes); run again with the "
                f"same inputs to resume")
    finally:
        if loop is not None:
            loop.close()
        lock.release()
    model.eval()
    return model, finished


# ---------------------------------------------------------------- evaluation during training

@torch.no_grad()
def _evaluate_averaged(loop: TrainLoop, name: str, evaluate: Callable[[torch.nn.Module, object], dict],
                       evaluator) -> dict:
    """{"<name>_accuracy": value to 4 places} of evaluate(model, evaluator), on a copy of the loop's model
    `name` holding its EMA weights (its current ones without EMA), in eval mode."""
    model = copy.deepcopy(loop.unwrap(name))
    if name in loop.ema_models:
        loop.ema_models[name].copy_to(model.parameters())
    rng_state = torch.get_rng_state()  # sampling must not move the training's random streams
    try:
        accuracy = evaluate(model.eval(), evaluator)
    finally:
        torch.set_rng_state(rng_state)
    return {f"{k}_accuracy": round(v, 4) for k, v in accuracy.items()}


# ---------------------------------------------------------------- the result

def write_pipeline(pipe, out_dir: str | os.PathLike, model: torch.nn.Module, recipe=None, extra: dict | None = None,
                   *, about: dict | None = None, adjust: Callable[[Path], None] | None = None) -> Path:
    """Save `pipe` (safetensors) to `out_dir` in one atomic rename, with training.json: the class and
    parameter count of `model`, `about`, the recipe, `extra`.

    adjust(folder) may change the saved files before the rename; a hand-written README.md already in
    `out_dir` is kept."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if adjust is not None:
            adjust(tmp)
        card = out / "README.md"
        if card.is_file():  # a model card written by hand: keep it
            (tmp / "README.md").write_text(card.read_text())
        info = {"model": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                **(about or {}), "recipe": recipe.to_dict() if recipe is not None else None, **(extra or {})}
        atomic_write_text(tmp / "training.json", json.dumps(info, indent=2))
    return out
