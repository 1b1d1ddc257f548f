"""Crash-safe file writes, shared by every package that persists something.

Why one module: datasets, engine caches, replay buffers and checkpoints must all survive a
robot losing power mid-write, and the protocol is easy to get subtly wrong (fsync the file
*and* the directory, rename within one filesystem, clean the temp file on failure).
``sensors`` is the leftmost package, so all of them may import it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Make a rename or unlink in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | Callable[[Any], None]) -> None:
    """Write ``data`` (bytes, or a ``write(file)`` callable) to a temp file beside ``path``,
    fsync it, rename it over ``path`` and fsync the directory: readers see the old file or
    the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the result is as readable as any other file
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
