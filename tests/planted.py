"""A code-carrying pickle to plant in checkpoints: unpickling it creates a marker file."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from genfast.training.checkpoint import CheckpointError


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # what an attacker's pickle does: call anything on load
        return (open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    data = pickle.dumps(_Payload(marker))
    pickle.loads(data).close()  # the payload is live: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()
    return data


def assert_planted_pickles_refused(checkpoints: Path, resume, tmp_path: Path) -> None:
    """Plant the payload in the latest checkpoint of `checkpoints`, as an extra accelerate-style file
    and in place of a real file; `resume()` must raise CheckpointError each time and never run it."""
    folder = checkpoints / (checkpoints / "latest").read_text().strip()
    backup = tmp_path / "pristine-checkpoint"
    shutil.copytree(folder, backup)
    marker = tmp_path / "payload-ran"
    data = payload(marker)
    for plant in ("custom_checkpoint_0.pkl", "models.safetensors", "state.json"):
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)
        (folder / plant).write_bytes(data)
        with pytest.raises(CheckpointError, match=plant.replace(".", r"\.")) as err:
            resume()
        assert "delete the work folder" in str(err.value).lower()
        assert not marker.exists(), f"the payload planted as {plant} ran"
    shutil.rmtree(folder)
    shutil.copytree(backup, folder)
