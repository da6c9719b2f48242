"""Resumable training state on top of accelerate's save_state / load_state.

accelerate already saves models, optimizers, schedulers, RNG states and registered objects
(EMA); what it does not do is make the save atomic. Each checkpoint is written to a temporary
folder, renamed to `step-NNNNNNN`, and only then is the `latest` pointer moved to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..io import atomic_dir, atomic_write_text


class Checkpointer:
    def __init__(self, accelerator: Accelerator, root: str | Path, keep: int = 2):
        self.accelerator = accelerator
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def resume(self) -> int:
        """Load the latest checkpoint if there is one; return the step to continue from."""
        path = self.latest()
        if path is None:
            return 0
        self.accelerator.load_state(str(path))
        return json.loads((path / "step.json").read_text())["step"]

    def save(self, step: int) -> Path:
        final = self.root / f"step-{step:07d}"
        if self.accelerator.is_main_process:
            with atomic_dir(final) as tmp:
                self.accelerator.save_state(str(tmp), safe_serialization=True)
                (tmp / "step.json").write_text(json.dumps({"step": step}))
            atomic_write_text(self.root / "latest", final.name)
            for old in sorted(self.root.glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final
