"""The one training loop every genfast trainer runs on.

accelerate does the device work (prepare, backward, gradient accumulation, mixed precision,
several GPUs); diffusers' EMAModel keeps the averages. What is added here: checkpoints that
cannot run code (genfast.training.checkpoint), a wall-clock budget, exact resume, a lock on the
work folder and a record of the run's inputs that a resumed run must match.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..io import atomic_write_text
from . import checkpoint as ck
from .checkpoint import CheckpointError

__all__ = ["CheckpointError", "LoopConfig", "TrainLoop", "WorkDirLock", "WorkDirLocked"]

MIXED_PRECISION = ("no", "fp16", "bf16")
RUN_INFO = "run.json"


def _now() -> float:
    """The clock the budget is measured on (tests replace it)."""
    return time.monotonic()


@dataclass
class LoopConfig:
    steps: int
    checkpoint_every: int = 500
    checkpoint_minutes: float | None = None  # also checkpoint once this long has passed since the last one
    max_minutes: float | None = None  # spent: checkpoint and return unfinished
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "no"
    ema_decay: float | None = None  # EMA of the models named in TrainLoop(ema=...)
    ema_power: float | None = None  # None: diffusers' (1+s)/(10+s) warmup; else 1 - (1+s)^-power
    max_grad_norm: float | None = None  # clip the models' gradient norm before each optimizer step
    keep: int = 2  # checkpoints kept
    desc: str = "train"
    progress: bool = True
    cpu: bool = False

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "grad_accum", "keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoopConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("max_minutes", "checkpoint_minutes", "ema_power", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"LoopConfig.{name} must be None or > 0, got {value!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"LoopConfig.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"LoopConfig.ema_decay must be None or in (0, 1), got {self.ema_decay!r}")
        if self.ema_power is not None and self.ema_decay is None:
            raise ValueError("LoopConfig.ema_power has no effect without ema_decay: set ema_decay in (0, 1)")


class WorkDirLocked(RuntimeError):
    """Another run (this process or another) holds the work folder."""


def _is_main_process() -> bool:
    # read from the launcher's environment: the lock may be taken before any Accelerator exists
    return os.environ.get("RANK", "0") == "0"


class WorkDirLock:
    """An exclusive fcntl lock on `<work_dir>/.lock`, held until release() (or the process ends).

    flock locks belong to an open file, so a second lock in the same process is refused too. Only
    the main process of a multi-process run takes it: its other processes share the folder.
    """

    def __init__(self, work_dir: str | os.PathLike):
        self.work_dir = Path(work_dir)
        self._file = None
        if not _is_main_process():
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / ".lock"
        f = open(path, "a+")  # noqa: SIM115 -- kept open: the lock lives as long as the file
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise WorkDirLocked(f"work folder {self.work_dir} is in use by another run (it holds {path}); wait "
                                f"for that run to finish, or give this one another output/work folder") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _key_diff(old, new, prefix="") -> list[str]:
    """Dotted keys whose values differ between two JSON objects."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for k in sorted(set(old) | set(new)):
            name = f"{prefix}{k}"
            if k not in old or k not in new:
                keys.append(name)
            else:
                keys += _key_diff(old[k], new[k], name + ".")
        return keys
    return [] if old == new else [prefix.rstrip(".") or "(whole record)"]


def check_run_info(work_dir: Path, run_info: dict) -> None:
    """Record the run's inputs in run.json, or refuse to go on when the recorded ones differ."""
    run_info = json.loads(json.dumps(run_info))  # tuples as lists: as they read back
    path = work_dir / RUN_INFO
    if not path.is_file():
        if _is_main_process():
            atomic_write_text(path, json.dumps(run_info, indent=1, sort_keys=True))
        return
    old = json.loads(path.read_text())
    diff = _key_diff(old, run_info)
    if diff:
        raise ValueError(f"{work_dir} holds an unfinished run with other inputs ({', '.join(diff)} differ from "
                         f"{path}); rerun with the same inputs to resume, or use another work folder, or delete "
                         f"{work_dir} to start afresh")


def _accelerator(config: LoopConfig) -> Accelerator:
    # accelerate's state is one per process and refuses a second, different precision or device;
    # one process may run several loops (a trainer's stages, tests), so a disagreeing state is reset
    shared = AcceleratorState._shared_state
    if shared:
        wrong_device = config.cpu != (shared["device"].type == "cpu")
        if shared.get("_mixed_precision") != config.mixed_precision or wrong_device:
            if shared.get("num_processes", 1) > 1:
                raise ValueError("this process already runs accelerate with another mixed_precision/device; "
                                 "run loops with different settings in separate launches")
            AcceleratorState._reset_state(reset_partial_state=wrong_device)
    return Accelerator(
        mixed_precision=config.mixed_precision, cpu=config.cpu,
        # our own micro-batch loop decides when to sync, not the end of a dataloader epoch
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.grad_accum,
                                                                sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # shuffles a function of the epoch
    )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(),
             "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class TrainLoop:
    """Prepare, resume, run `step_fn` for the remaining steps, checkpoint; see docs of run()."""

    def __init__(self, work_dir: str | os.PathLike, config: LoopConfig, models: dict[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, lr_scheduler=None, dataloader=None, ema: tuple[str, ...] = (),
                 run_info: dict | None = None, extra_state: dict[str, tuple[Callable, Callable]] | None = None,
                 lock: WorkDirLock | None = None):
        self.work_dir = Path(work_dir)
        self.config = config
        ema = tuple(ema)
        if not models:
            raise ValueError("TrainLoop needs at least one model")
        for name in models:
            if not name or "/" in name:
                raise ValueError(f"model name {name!r}: must be non-empty without '/'")
        if unknown := [n for n in ema if n not in models]:
            raise ValueError(f"ema names {unknown} are not among the models {list(models)}")
        if ema and config.ema_decay is None:
            raise ValueError(f"ema={ema} has no effect without LoopConfig.ema_decay: set it in (0, 1)")
        if config.ema_decay is not None and not ema:
            raise ValueError("LoopConfig.ema_decay has no effect: name the models to average in TrainLoop(ema=...)")
        if lock is not None and lock.work_dir.resolve() != self.work_dir.resolve():
            raise ValueError(f"the lock given is on {lock.work_dir}, not on the work folder {self.work_dir}")
        self._own_lock = lock is None
        self.lock = lock if lock is not None else WorkDirLock(self.work_dir)
        try:
            if run_info is not None:
                check_run_info(self.work_dir, run_info)
            self.accelerator = acc = _accelerator(config)
            names = list(models)
            objects = [models[n] for n in names] + [optimizer]
            objects += [x for x in (lr_scheduler, dataloader) if x is not None]
            prepared = acc.prepare(*objects)
            self.models = dict(zip(names, prepared[: len(names)], strict=True))
            self.optimizer = prepared[len(names)]
            rest = list(prepared[len(names) + 1:])
            self.lr_scheduler = rest.pop(0) if lr_scheduler is not None else None
            self.dataloader = rest.pop(0) if dataloader is not None else None
            self.ema_models = {n: EMAModel(self.unwrap(n).parameters(), decay=config.ema_decay,
                                           use_ema_warmup=config.ema_power is not None,
                                           power=config.ema_power if config.ema_power is not None else 2 / 3)
                               for n in ema}
        except BaseException:
            self.close()
            raise
        self.extra_state = dict(extra_state or {})
        self.root = self.work_dir / "checkpoints"
        self.step = 0
        self.micro = 0  # the micro-batch within the optimizer step, for step_fn under grad_accum
        self._batches = 0  # dataloader batches drawn, so a resume skips exactly those
        self._batch_iter = None
        self._resumed = False
        self._saved_step = None

    # ---- state ----
    def unwrap(self, name: str) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.models[name])

    def _state(self) -> dict:
        state = {"step": self.step, "batches": self._batches, "optimizer": self.optimizer.state_dict(),
                 "ema": {n: e.state_dict() for n, e in self.ema_models.items()},
                 "extra": {n: get() for n, (get, _) in self.extra_state.items()}}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        scaler = self.accelerator.scaler
        if scaler is not None and scaler.state_dict():
            state["scaler"] = scaler.state_dict()
        return state

    def save(self) -> Path:
        """Checkpoint the current step (atomically; all processes call it)."""
        acc, tmp = self.accelerator, ck.staging_dir(self.root, self.step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rank = acc.process_index
        skeleton, tensors = ck.flatten(_rng_state())
        ck.write_tensors(tmp / f"rng-{rank}.safetensors", tensors)
        ck.write_json(tmp / f"rng-{rank}.json", skeleton)
        acc.wait_for_everyone()
        final = self.root / f"step-{self.step:07d}"
        if acc.is_main_process:
            weights = {f"{n}/{k}": v for n in self.models for k, v in self.unwrap(n).state_dict().items()}
            _, weights = ck.flatten(weights)
            ck.write_tensors(tmp / "models.safetensors", {k.lstrip("/"): v for k, v in weights.items()})
            skeleton, tensors = ck.flatten(self._state())
            groups = {"ema": {}, "optimizer": {}, "state": {}}
            for key, t in tensors.items():
                top = key.split("/")[1]
                groups["ema" if top == "ema" else "optimizer" if top in ("optimizer", "lr_scheduler", "scaler")
                       else "state"][key] = t
            for group, part in groups.items():
                ck.write_tensors(tmp / f"{group}.safetensors", part)
            ck.write_json(tmp / "state.json", skeleton)
            ck.publish(self.root, self.step, self.config.keep)
        acc.wait_for_everyone()
        self._saved_step = self.step
        return final

    def resume(self) -> int:
        """Load the latest checkpoint if there is one (after checking its manifest); return its step."""
        if self._resumed:
            return self.step
        self._resumed = True
        folder = ck.latest(self.root)
        if folder is None:
            return 0
        ck.verify(folder)
        weights = ck.read_tensors(folder, "models.safetensors")
        for name in self.models:
            sub = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + "/")}
            try:
                self.unwrap(name).load_state_dict(sub)
            except RuntimeError as e:
                raise CheckpointError(f"{folder / 'models.safetensors'} does not fit model {name!r} ({e}); "
                                      f"delete the work folder {self.work_dir} to start afresh") from None
        tensors = {}
        for group in ("ema", "optimizer", "state"):
            tensors.update(ck.read_tensors(folder, f"{group}.safetensors"))
        state = ck.unflatten(ck.read_json(folder, "state.json"), tensors)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        for name, ema in self.ema_models.items():
            ema.load_state_dict(state["ema"][name])
            ema.to(self.accelerator.device)
        for name, (_, set_fn) in self.extra_state.items():
            set_fn(state["extra"][name])
        rank = self.accelerator.process_index
        if (folder / f"rng-{rank}.json").is_file():
            rng = ck.read_tensors(folder, f"rng-{rank}.safetensors")
            _set_rng_state(ck.unflatten(ck.read_json(folder, f"rng-{rank}.json"), rng))
        self.step, self._batches, self._batch_iter = state["step"], state["batches"], None
        self._saved_step = self.step
        return self.step

    # ---- data ----
    def next_batch(self):
        """The next batch of the prepared dataloader, cycling through epochs; resumes where it stopped."""
        if self.dataloader is None:
            raise RuntimeError("TrainLoop.next_batch needs TrainLoop(dataloader=...)")
        while True:
            if self._batch_iter is None:
                epoch, skip = divmod(self._batches, len(self.dataloader))
                dl = self.accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
                for d in {id(x): x for x in (self.dataloader, dl)}.values():
                    if hasattr(d, "set_epoch"):
                        d.set_epoch(epoch)
                self._batch_iter = iter(dl)
            try:
                batch = next(self._batch_iter)
            except StopIteration:
                self._batch_iter = None
                continue
            self._batches += 1
            return batch

    # ---- the loop ----
    def run(self, step_fn: Callable[[int], torch.Tensor | tuple[torch.Tensor, dict]],
            on_step: Callable[[int], None] | None = None, on_save: Callable[[int], None] | None = None) -> bool:
        """Run the remaining steps; True when all are done, False when stopped by max_minutes.

        step_fn(step) returns the loss of one micro-batch (or (loss, logs)); under grad_accum it is
        called `grad_accum` times per step with `self.micro` counting them. Its batch must be a
        pure function of (step, micro), or come from next_batch() / state registered in
        extra_state, so that a resumed run continues exactly. on_step(done) runs after each
        optimizer step (and EMA update), before any checkpoint; on_save(step) after each checkpoint
        this run writes (every `checkpoint_every` steps, every `checkpoint_minutes`, at the budget, at the end).
        """
        cfg, acc = self.config, self.accelerator
        self.resume()
        t0 = last_save = _now()

        def save():
            nonlocal last_save
            self.save()
            if cfg.checkpoint_minutes is not None:
                last_save = _now()
            if on_save is not None:
                on_save(self.step)

        params = [p for m in self.models.values() for p in m.parameters() if p.requires_grad]
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.desc,
                   disable=not (cfg.progress and acc.is_local_main_process))
        try:
            while self.step < cfg.steps:
                for self.micro in range(cfg.grad_accum):
                    with acc.accumulate(*self.models.values()), acc.autocast():
                        out = step_fn(self.step)
                        loss, logs = out if isinstance(out, tuple) else (out, {})
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.max_grad_norm is not None:
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        self.optimizer.step()
                        if self.lr_scheduler is not None:
                            self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                assert acc.sync_gradients, "the last micro-batch of a step must sync"
                for name, ema in self.ema_models.items():
                    ema.step(self.unwrap(name).parameters())
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", **{k: (f"{v:.4g}" if isinstance(v, float) else v)
                                                               for k, v in logs.items()})
                if on_step is not None:
                    on_step(self.step)
                if self.step % cfg.checkpoint_every == 0 or (
                        cfg.checkpoint_minutes is not None and self.step < cfg.steps
                        and _now() - last_save >= 60 * cfg.checkpoint_minutes):
                    save()
                if (cfg.max_minutes is not None and self.step < cfg.steps
                        and _now() - t0 >= 60 * cfg.max_minutes):
                    if self._saved_step != self.step:
                        save()
                    return False
            if self._saved_step != self.step:
                save()  # a rerun after a crash while writing the outputs starts here, not from scratch
            return True
        finally:
            bar.close()

    def close(self) -> None:
        """Release the work folder's lock (a lock handed in by the caller stays with the caller)."""
        if getattr(self, "_own_lock", False) and getattr(self, "lock", None) is not None:
            self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
