"""Crash-safe file writes, shared by every package that persists something.

Why one module: datasets, engine caches, replay buffers and checkpoints must all survive a
robot losing power mid-write, and the protocol is easy to get subtly wrong (fsync the file
*and* the directory, rename within one filesystem, clean the temp file on failure).
It lives in ``common``, the neutral home that every package may import.

Why the mode is set with ``fchmod`` and the umask is only *read*: ``os.umask`` can only be
read by setting it, and the umask is process-wide, so ``umask(0); umask(old)`` in a
multithreaded agent lets every file another thread creates in between come out world-writable.
``mkstemp`` makes the temp file 0600; ``fchmod`` then gives it the requested mode before a byte
is written, so a secret written with ``mode=0o600`` is never readable by anyone else.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FALLBACK_UMASK = 0o022  # where /proc/self/status has no "Umask:" line (not Linux, kernel < 4.7)


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


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` without changing it (see the module docstring)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return FALLBACK_UMASK


def atomic_write(path: str | Path, data: bytes | Callable[[Any], None], *, mode: int | None = None) -> None:
    """Write ``data`` (bytes, or a ``write(file)`` callable) to a temp file beside ``path``,
    fsync it, rename it over ``path`` and fsync the directory: readers see the old file or
    the new one, never a torn one.

    ``mode``: the new file's permission bits, exactly (``0o600`` for a secret). ``None`` (the
    default): what ``open()`` would give, ``0o666`` less the umask (``0o644`` under the usual
    umask 022). The process umask is never changed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    perms = (0o666 & ~current_umask()) if mode is None else mode
    if not 0 <= perms <= 0o7777:
        raise ValueError(f"mode={mode!r} must be permission bits like 0o644")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), perms)  # mkstemp made it 0600; the mode is set before anything is written
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
