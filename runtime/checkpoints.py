"""Checkpoint store: atomic saves, verified loads, the previous good one kept for rollback.

Layout of ``dir`` (the agent's ``state/``)::

    LATEST                    "ckpt-000012": the newest checkpoint's name, for people and tools
    ckpt-000012/manifest.json {"format", "seq", "created_ns", "meta", "entries": {key: {file, kind, sha256, bytes}},
                               "manifest_sha256"}  (sealed: the digest of its own content)
    ckpt-000012/e000.pt ...   one file per top-level key of the state
    ckpt-000011/              the previous good one (``keep`` newest are kept, at least 2)
    corrupt/ckpt-000013-<ns>/ checkpoints that failed verification, moved aside
    rolled-back/...           checkpoints undone by ``rollback``

What goes where (tensors, arrays, JSON; never a pickle on load): see :mod:`runtime.statefiles`.

Why this protocol: a robot loses power mid-save. A save writes into a hidden temp dir,
fsyncs every file and the dir, renames it into place (the commit: one rename), fsyncs
``dir``, then rewrites ``LATEST``; at no moment is a half-written checkpoint visible under a
final name. A load takes the newest checkpoint directory, not ``LATEST``: the pointer is
one more file that a flipped byte or a crash between the rename and its update could make
lie, and the newest complete directory is by construction the last commit (``rollback``
moves the newer ones away). ``LATEST`` is rewritten when it lags. A load checks every file's
sha256 against the manifest and the manifest against its own seal; a bad one (truncated,
bit rot, edited manifest) is moved to ``corrupt/``, counted (``stats``), and the previous
one is loaded instead, and the result says so. A failed save (disk full, read-only) raises
``CheckpointWriteError``, removes its temp dir, and leaves the previous checkpoints untouched.

Named fault points (``sensors.durable.fault_point``, no-ops unless ``CONTINUA_FAULT_AT`` is
set) mark the steps a crash test kills the process at: ``checkpoint.between_entries``,
``.before_rename``, ``.after_rename``, ``.after_latest``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import fsync_dir
from runtime.errors import CheckpointWriteError, NoCheckpointError
from runtime.statefiles import MANIFEST, StateFiles, manifest_bytes
from sensors.durable import fault_point

log = logging.getLogger(__name__)

LATEST = "LATEST"
_NAME = re.compile(r"^ckpt-(\d{6,})$")
# Opt-in test hook, unset in production: seconds to sleep after each file a save writes, so
# that a reliability test can SIGKILL the agent deterministically in the middle of a save.
_SLOW_SAVE_ENV = "CONTINUA_TEST_SLOW_SAVE_S"


@dataclass(frozen=True, kw_only=True)
class CorruptCheckpoint:
    name: str
    reason: str
    moved_to: Path | None


@dataclass(kw_only=True)
class LoadResult:
    """What ``load_latest``/``rollback`` loaded and what happened on the way."""

    state: dict[str, Any]
    meta: dict[str, Any]
    name: str
    seq: int
    path: Path
    files: StateFiles | None = None  # every file of the checkpoint, verified (to re-save or hand on)
    fell_back: bool = False  # True: the newest was unusable, an older one was loaded
    corrupt: list[CorruptCheckpoint] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    name: str
    seq: int
    path: Path
    created_ns: int
    meta: dict[str, Any]
    nbytes: int
    latest: bool


def _disk_reason(root: Path, exc: BaseException) -> str:
    """Say "disk full" / "read-only" in words: torch wraps ENOSPC in an opaque RuntimeError."""
    import errno

    codes = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in codes:
            return codes[cause.errno]
        cause = cause.__cause__ or cause.__context__
    try:
        st = os.statvfs(root)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return "disk full"
    except OSError:
        pass
    return "write failed"


class CheckpointStore:
    """Numbered checkpoints in one directory; one writer (the agent) at a time."""

    def __init__(self, root: str | Path, *, keep: int = 3) -> None:
        if keep < 2:
            raise ValueError(f"keep={keep!r} must be >= 2 (rollback needs the previous one)")
        self.root = Path(root)
        self.keep = keep
        self._lock = threading.Lock()
        # what went wrong so far (a status page shows it): corrupt checkpoints met, failed saves
        self.counters = {"saved": 0, "save_failed": 0, "loaded": 0, "corrupt": 0, "fell_back": 0}

    # ---- names
    def _names(self) -> list[str]:
        """Checkpoint dir names, oldest first."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(names, key=lambda n: int(_NAME.match(n).group(1)))

    def stats(self) -> dict[str, int]:
        """Counters since this store was opened (``corrupt``: checkpoints that failed verification)."""
        return dict(self.counters)

    def _latest_name(self) -> str | None:
        """What ``LATEST`` says (None when missing, garbled or naming no directory); informative only."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if _NAME.match(name) and (self.root / name).is_dir() else None

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".{LATEST}.{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "w") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / LATEST)
            fsync_dir(self.root)  # the rename is durable only once the directory is
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    # ---- save
    def save(self, state: dict[str, Any], meta: dict[str, Any] | None = None) -> CheckpointInfo:
        """Write ``state`` as the new latest checkpoint; ``CheckpointWriteError`` on any I/O failure."""
        return self.save_files(StateFiles.encode(state, meta))

    def save_files(self, files: StateFiles) -> CheckpointInfo:
        """Write already encoded files (and their meta) as the new latest checkpoint."""
        with self._lock:
            try:
                info = self._save_locked(files)
            except CheckpointWriteError:
                self.counters["save_failed"] += 1
                raise
            self.counters["saved"] += 1
            return info

    def _save_locked(self, sf: StateFiles) -> CheckpointInfo:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            seq = self._next_seq()
        except OSError as exc:
            raise CheckpointWriteError(f"cannot write checkpoints in {self.root}: {exc}") from exc
        name = f"ckpt-{seq:06d}"
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        final = self.root / name
        try:
            tmp.mkdir()
            for i, entry in enumerate(sf.entries.values()):  # entry by entry: learner, buffer, reservoir...
                if i == 1:
                    fault_point("checkpoint.between_entries")
                for fname in [*entry["arrays"], entry["file"]]:
                    self._write(tmp / fname, lambda f, d=sf.files[fname]: f.write(d))
            manifest = {"seq": seq, "name": name, "created_ns": time.time_ns(), "meta": sf.meta,
                        "entries": sf.entries, "nbytes": sf.nbytes}
            self._write(tmp / MANIFEST, lambda f: f.write(manifest_bytes(manifest)))
            fsync_dir(tmp)
            fault_point("checkpoint.before_rename")
            os.rename(tmp, final)  # the commit
            fsync_dir(self.root)
            fault_point("checkpoint.after_rename")
            try:
                self._write_latest(name)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                fsync_dir(self.root)
                raise
            fault_point("checkpoint.after_latest")
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            why = _disk_reason(self.root, exc)
            log.error("checkpoint %s not written: %s (%s)", name, why, exc)
            raise CheckpointWriteError(f"cannot write checkpoint {final}: {why} ({exc})") from exc
        log.info("checkpoint %s saved (%d bytes)", name, sf.nbytes)
        self._retain()
        return CheckpointInfo(name=name, seq=seq, path=final, created_ns=manifest["created_ns"], meta=sf.meta,
                              nbytes=sf.nbytes, latest=True)

    def _next_seq(self) -> int:
        """One past every number used so far, also by corrupt and rolled-back ones (names never repeat)."""
        names = self._names()
        seq = int(_NAME.match(names[-1]).group(1)) + 1 if names else 1
        for sub in ("corrupt", "rolled-back"):
            if (self.root / sub).is_dir():
                seq = max([seq] + [int(m.group(1)) + 1 for p in (self.root / sub).iterdir()
                                   if (m := re.match(r"^ckpt-(\d{6,})", p.name))])
        return seq

    @staticmethod
    def _write(path: Path, writer: Any) -> None:
        with open(path, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        if _SLOW_SAVE_ENV in os.environ:  # test hook, off by default (see _SLOW_SAVE_ENV)
            time.sleep(float(os.environ[_SLOW_SAVE_ENV]))

    def _retain(self) -> None:
        """Keep the ``keep`` newest checkpoints; bound corrupt/ and rolled-back/."""
        names = self._names()
        for name in names[: max(0, len(names) - self.keep)]:
            shutil.rmtree(self.root / name, ignore_errors=True)
        for sub in ("corrupt", "rolled-back"):
            d = self.root / sub
            if d.is_dir():
                for p in sorted(d.iterdir(), key=lambda p: p.stat().st_mtime)[: -self.keep]:
                    shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-ckpt-*"):  # left by a crash mid-save
            shutil.rmtree(p, ignore_errors=True)

    # ---- load
    def _read(self, name: str, keys: list[str] | tuple[str, ...] | None = None
              ) -> tuple[dict[str, Any], StateFiles]:
        """Verify one checkpoint and decode ``keys`` (all when None); ``ValueError`` with the reason."""
        sf = StateFiles.read_dir(self.root / name)
        try:
            state = sf.decode(keys)
        except Exception as exc:  # JSON, torch unpickler, missing key: all mean "unusable"
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        return state, sf

    def _move_aside(self, name: str, sub: str) -> Path | None:
        dest = self.root / sub / f"{name}-{time.time_ns()}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.root / name, dest)
            fsync_dir(self.root)  # gone from the root (no longer the newest) ...
            fsync_dir(dest.parent)  # ... and kept aside, durably both
            return dest
        except OSError as exc:
            log.error("cannot move %s to %s: %s", name, dest, exc)
            return None

    def load_latest(self, keys: list[str] | tuple[str, ...] | None = None) -> LoadResult:
        """Load the newest checkpoint; corrupt ones go to ``corrupt/`` and older ones are tried.
        Every file is verified; only ``keys`` are decoded (all when None)."""
        with self._lock:
            latest = self._latest_name()
            order = self._names()[::-1]
            corrupt: list[CorruptCheckpoint] = []
            for i, name in enumerate(order):
                try:
                    state, sf = self._read(name, keys)
                except ValueError as exc:
                    moved = self._move_aside(name, "corrupt")
                    log.error("checkpoint %s is corrupt (%s); moved to %s", name, exc, moved)
                    corrupt.append(CorruptCheckpoint(name=name, reason=str(exc), moved_to=moved))
                    self.counters["corrupt"] += 1
                    continue
                if name != latest:
                    if i == 0 and latest is not None:
                        log.warning("LATEST says %s, the newest checkpoint is %s (a save was cut between its "
                                    "rename and the pointer update); pointer fixed", latest, name)
                    with contextlib.suppress(OSError):
                        self._write_latest(name)
                self.counters["loaded"] += 1
                if i > 0:
                    self.counters["fell_back"] += 1
                    log.warning("loaded older checkpoint %s after %d unusable one(s)", name, i)
                return LoadResult(state=state, meta=sf.meta, name=name, seq=int(_NAME.match(name).group(1)),
                                  path=self.root / name, files=sf, fell_back=i > 0, corrupt=corrupt)
            raise NoCheckpointError(f"no usable checkpoint in {self.root}"
                                    + (f" ({len(corrupt)} corrupt, moved to corrupt/)" if corrupt else ""),
                                    corrupt)

    def rollback(self, keys: list[str] | tuple[str, ...] | None = None) -> LoadResult:
        """Undo the latest checkpoint: load the previous good one, move the latest to ``rolled-back/``.

        The previous one is verified *before* anything moves, so a failed rollback changes
        nothing (``NoCheckpointError``); corrupt older ones met on the way go to ``corrupt/``.
        """
        with self._lock:
            names = self._names()
            latest = names[-1] if names else None
            older = [n for n in names[::-1] if latest and int(_NAME.match(n).group(1)) < int(_NAME.match(latest).group(1))]
            corrupt: list[CorruptCheckpoint] = []
            for name in older:
                try:
                    state, sf = self._read(name, keys)
                except ValueError as exc:
                    corrupt.append(CorruptCheckpoint(name=name, reason=str(exc),
                                                     moved_to=self._move_aside(name, "corrupt")))
                    self.counters["corrupt"] += 1
                    continue
                moved = self._move_aside(latest, "rolled-back")
                if moved is None:
                    raise CheckpointWriteError(f"cannot move {latest} aside in {self.root}")
                self._write_latest(name)
                log.warning("rolled back %s (kept in %s); now at %s", latest, moved, name)
                return LoadResult(state=state, meta=sf.meta, name=name, seq=int(_NAME.match(name).group(1)),
                                  path=self.root / name, files=sf, fell_back=bool(corrupt), corrupt=corrupt)
            raise NoCheckpointError(f"no good checkpoint older than {latest} in {self.root}", corrupt)

    def list(self) -> list[CheckpointInfo]:
        """Checkpoints newest first, from their manifests (not verified: see ``load_latest``)."""
        names = self._names()
        latest = names[-1] if names else None
        out = []
        for name in names[::-1]:
            try:
                m = json.loads((self.root / name / MANIFEST).read_text())
                created, meta, nbytes = int(m["created_ns"]), dict(m.get("meta", {})), int(m.get("nbytes", 0))
            except (OSError, ValueError, KeyError, TypeError):
                created, meta, nbytes = 0, {"error": "unreadable manifest"}, 0
            out.append(CheckpointInfo(name=name, seq=int(_NAME.match(name).group(1)), path=self.root / name,
                                      created_ns=created, meta=meta, nbytes=nbytes, latest=name == latest))
        return out
