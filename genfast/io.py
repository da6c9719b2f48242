"""Atomic writes: an interrupted save never leaves a half-written file or folder in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give the ones we keep the usual mode."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    _give_default_mode(Path(tmp), is_dir=False)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    The old folder (if any) is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _give_default_mode(tmp, is_dir=True)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(path: str | Path, folder: bool, what: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written: its parent missing or not a folder, a file
    where a folder goes (or the reverse), or a place this process cannot create files in."""
    path = Path(path)
    kind = "folder" if folder else "file"
    if not path.parent.is_dir():
        raise ValueError(f"{what} {path}: {path.parent} " + ("is not a folder" if path.parent.exists()
                                                            else "does not exist; create it first"))
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{what} {path} is an existing {'folder' if path.is_dir() else 'file'}; give a {kind} "
                         f"name")
    where = path if folder and path.is_dir() else path.parent
    try:  # a real probe: permissions, read-only mounts and root all answer the same way
        fd, probe = tempfile.mkstemp(dir=where, prefix=f".{path.name}.", suffix=".probe")
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot write in {where} ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path
