"""Helpers shared by the local launchers (infra.py, triton.py). Standard library only: the launchers run before the
project is installed; they import this module from their own folder (a script's folder is first on sys.path)."""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so that two test sessions do not install or start the same service at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def log_end(path: Path, max_bytes: int = 64 * 1024) -> str | None:
    """The last ``max_bytes`` of a log as text, or None when it cannot be read."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None
