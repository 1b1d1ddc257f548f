"""Checkpoint store: atomic saves, verified loads, the previous good one kept for rollback.

Layout of ``dir`` (the agent's ``state/``)::

    LATEST                    "ckpt-000012"  (replaced atomically)
    ckpt-000012/manifest.json {"format", "seq", "created_ns", "meta", "entries": {key: {file, kind, sha256, bytes}}}
    ckpt-000012/e000.pt ...   one file per top-level key of the state
    ckpt-000011/              the previous good one (``keep`` newest are kept, at least 2)
    corrupt/ckpt-000013-<ns>/ checkpoints that failed verification, moved aside
    rolled-back/...           checkpoints undone by ``rollback``

What goes where (never a pickle on load):
- a value holding torch tensors (a tensor, a state dict, an optimizer state) -> ``torch.save``,
  read with ``torch.load(weights_only=True)``;
- numpy arrays anywhere in a value -> separate ``.npy`` files (``allow_pickle=False``), a
  ``{"__ndarray__": file}`` marker in their place;
- everything else (class list, task cursor, config, RNG states as ints) -> JSON.

Why this protocol: a robot loses power mid-save. A save writes into a hidden temp dir,
fsyncs every file and the dir, renames it into place, fsyncs ``dir``, then swaps
``LATEST``; at no moment is a half-written checkpoint visible under a final name. A load
checks every file's size and sha256 against the manifest; a bad one (truncated, bit rot,
bad manifest) is moved to ``corrupt/`` and the previous one is loaded instead, and the
result says so. A failed save (disk full, read-only) raises ``CheckpointWriteError``,
removes its temp dir, and leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
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

import numpy as np
import torch

from runtime.errors import CheckpointWriteError, NoCheckpointError
from sensors.atomic import fsync_dir

log = logging.getLogger(__name__)

FORMAT = 1
LATEST = "LATEST"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^ckpt-(\d{6,})$")
_MARK = "__ndarray__"
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_tensor(v) for v in value)
    return False


def _extract_arrays(value: Any, arrays: list[np.ndarray], where: str) -> Any:
    """Replace numpy arrays by markers (collected in ``arrays``); reject what cannot be saved safely."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise ValueError(f"state[{where}] is an object array: it would need pickle")
        arrays.append(value)
        return {_MARK: len(arrays) - 1}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if _MARK in value:
            raise ValueError(f"state[{where}] uses the reserved key {_MARK!r}")
        return type(value)((k, _extract_arrays(v, arrays, f"{where}.{k}")) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(_extract_arrays(v, arrays, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, torch.Tensor | str | int | float | bool | type(None)):
        return value
    raise ValueError(f"state[{where}] has type {type(value).__name__}; expected tensors, arrays, "
                     "or JSON values (dict, list, str, int, float, bool, None)")


def _check_json_keys(value: Any, where: str) -> None:
    """JSON turns int keys into strings: refuse instead of loading back something else."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"state[{where}] has a non-str key {k!r}: JSON would change it")
            _check_json_keys(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json_keys(v, f"{where}[{i}]")


def _restore_arrays(value: Any, files: list[np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_MARK}:
            return files[value[_MARK]]
        return type(value)((k, _restore_arrays(v, files)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(_restore_arrays(v, files) for v in value)
    return value


class CheckpointStore:
    """Numbered checkpoints in one directory; one writer (the agent) at a time."""

    def __init__(self, root: str | Path, *, keep: int = 3) -> None:
        if keep < 2:
            raise ValueError(f"keep={keep!r} must be >= 2 (rollback needs the previous one)")
        self.root = Path(root)
        self.keep = keep
        self._lock = threading.Lock()

    # ---- names
    def _names(self) -> list[str]:
        """Checkpoint dir names, oldest first."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(names, key=lambda n: int(_NAME.match(n).group(1)))

    def _latest_name(self) -> str | None:
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
            fsync_dir(self.root)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    # ---- save
    def save(self, state: dict[str, Any], meta: dict[str, Any] | None = None) -> CheckpointInfo:
        """Write ``state`` as the new latest checkpoint; ``CheckpointWriteError`` on any I/O failure."""
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError("state must be a dict with str keys")
        meta = dict(meta or {})
        json.dumps(meta)  # meta must be plain JSON; fail before touching the disk
        prepared: list[tuple[str, str, Any, list[np.ndarray]]] = []
        for i, (key, value) in enumerate(state.items()):
            arrays: list[np.ndarray] = []
            tree = _extract_arrays(value, arrays, key)
            kind = "torch" if _has_tensor(tree) else "json"
            if kind == "json":
                _check_json_keys(tree, key)
                try:
                    tree = json.dumps(tree, allow_nan=True)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"state[{key}] is not JSON-serialisable: {exc}") from None
            prepared.append((key, f"e{i:03d}", (kind, tree), arrays))
        with self._lock:
            return self._save_locked(prepared, meta)

    def _save_locked(self, prepared: list, meta: dict[str, Any]) -> CheckpointInfo:
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
            entries: dict[str, Any] = {}
            for key, stem, (kind, tree), arrays in prepared:
                files = []
                for j, arr in enumerate(arrays):
                    fname = f"{stem}-a{j:03d}.npy"
                    self._write(tmp / fname, lambda f, a=arr: np.save(f, a, allow_pickle=False))
                    files.append(fname)
                fname = f"{stem}.pt" if kind == "torch" else f"{stem}.json"
                if kind == "torch":
                    self._write(tmp / fname, lambda f, t=tree: torch.save(t, f))
                else:
                    self._write(tmp / fname, lambda f, t=tree: f.write(t.encode()))
                entries[key] = {"file": fname, "kind": kind, "arrays": files}
            total = 0
            for entry in entries.values():
                for fname in [entry["file"], *entry["arrays"]]:
                    entry.setdefault("sha256", {})[fname] = _sha256(tmp / fname)
                    total += (tmp / fname).stat().st_size
            manifest = {"format": FORMAT, "seq": seq, "name": name, "created_ns": time.time_ns(),
                        "meta": meta, "entries": entries, "nbytes": total}
            self._write(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(self.root)
            try:
                self._write_latest(name)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            why = _disk_reason(self.root, exc)
            log.error("checkpoint %s not written: %s (%s)", name, why, exc)
            raise CheckpointWriteError(f"cannot write checkpoint {final}: {why} ({exc})") from exc
        log.info("checkpoint %s saved (%d bytes)", name, total)
        self._retain()
        return CheckpointInfo(name=name, seq=seq, path=final, created_ns=manifest["created_ns"], meta=meta,
                              nbytes=total, latest=True)

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
        """Keep the ``keep`` newest checkpoints (and LATEST's); bound corrupt/ and rolled-back/."""
        latest = self._latest_name()
        names = self._names()
        for name in names[: max(0, len(names) - self.keep)]:
            if name != latest:
                shutil.rmtree(self.root / name, ignore_errors=True)
        for sub in ("corrupt", "rolled-back"):
            d = self.root / sub
            if d.is_dir():
                for p in sorted(d.iterdir(), key=lambda p: p.stat().st_mtime)[: -self.keep]:
                    shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-ckpt-*"):  # left by a crash mid-save
            shutil.rmtree(p, ignore_errors=True)

    # ---- load
    def _read(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Verify and load one checkpoint; any problem raises ``ValueError`` with the reason."""
        path = self.root / name
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if manifest.get("format") != FORMAT or not isinstance(manifest.get("entries"), dict):
                raise ValueError(f"manifest format {manifest.get('format')!r} unknown")
            for entry in manifest["entries"].values():
                for fname, digest in entry["sha256"].items():
                    if "/" in fname or fname.startswith("."):
                        raise ValueError(f"bad file name {fname!r} in manifest")
                    if _sha256(path / fname) != digest:
                        raise ValueError(f"{fname}: sha256 mismatch (truncated or corrupt)")
            state: dict[str, Any] = {}
            for key, entry in manifest["entries"].items():
                arrays = [np.load(path / f, allow_pickle=False) for f in entry["arrays"]]
                if entry["kind"] == "torch":
                    with open(path / entry["file"], "rb") as f:
                        tree = torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
                else:
                    tree = json.loads((path / entry["file"]).read_text())
                state[key] = _restore_arrays(tree, arrays)
        except ValueError:
            raise
        except Exception as exc:  # OSError, JSON, torch unpickler, KeyError: all mean "unusable"
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        return state, manifest.get("meta", {})

    def _move_aside(self, name: str, sub: str) -> Path | None:
        dest = self.root / sub / f"{name}-{time.time_ns()}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.root / name, dest)
            fsync_dir(self.root)
            return dest
        except OSError as exc:
            log.error("cannot move %s to %s: %s", name, dest, exc)
            return None

    def load_latest(self) -> LoadResult:
        """Load LATEST (else the newest); corrupt ones go to ``corrupt/`` and older ones are tried."""
        with self._lock:
            latest = self._latest_name()
            names = self._names()[::-1]
            order = ([latest] if latest else []) + [n for n in names if n != latest]
            corrupt: list[CorruptCheckpoint] = []
            for i, name in enumerate(order):
                try:
                    state, meta = self._read(name)
                except ValueError as exc:
                    moved = self._move_aside(name, "corrupt")
                    log.error("checkpoint %s is corrupt (%s); moved to %s", name, exc, moved)
                    corrupt.append(CorruptCheckpoint(name=name, reason=str(exc), moved_to=moved))
                    continue
                if name != latest:
                    with contextlib.suppress(OSError):
                        self._write_latest(name)
                if i > 0:
                    log.warning("loaded older checkpoint %s after %d unusable one(s)", name, i)
                return LoadResult(state=state, meta=meta, name=name, seq=int(_NAME.match(name).group(1)),
                                  path=self.root / name, fell_back=i > 0, corrupt=corrupt)
            raise NoCheckpointError(f"no usable checkpoint in {self.root}"
                                    + (f" ({len(corrupt)} corrupt, moved to corrupt/)" if corrupt else ""),
                                    corrupt)

    def rollback(self) -> LoadResult:
        """Undo the latest checkpoint: load the previous good one, move the latest to ``rolled-back/``.

        The previous one is verified *before* anything moves, so a failed rollback changes
        nothing (``NoCheckpointError``); corrupt older ones met on the way go to ``corrupt/``.
        """
        with self._lock:
            names = self._names()
            latest = self._latest_name() or (names[-1] if names else None)
            older = [n for n in names[::-1] if latest and int(_NAME.match(n).group(1)) < int(_NAME.match(latest).group(1))]
            corrupt: list[CorruptCheckpoint] = []
            for name in older:
                try:
                    state, meta = self._read(name)
                except ValueError as exc:
                    corrupt.append(CorruptCheckpoint(name=name, reason=str(exc),
                                                     moved_to=self._move_aside(name, "corrupt")))
                    continue
                moved = self._move_aside(latest, "rolled-back")
                if moved is None:
                    raise CheckpointWriteError(f"cannot move {latest} aside in {self.root}")
                self._write_latest(name)
                log.warning("rolled back %s (kept in %s); now at %s", latest, moved, name)
                return LoadResult(state=state, meta=meta, name=name, seq=int(_NAME.match(name).group(1)),
                                  path=self.root / name, fell_back=bool(corrupt), corrupt=corrupt)
            raise NoCheckpointError(f"no good checkpoint older than {latest} in {self.root}", corrupt)

    def list(self) -> list[CheckpointInfo]:
        """Checkpoints newest first, from their manifests (not verified: see ``load_latest``)."""
        latest = self._latest_name()
        out = []
        for name in self._names()[::-1]:
            try:
                m = json.loads((self.root / name / MANIFEST).read_text())
                created, meta, nbytes = int(m["created_ns"]), dict(m.get("meta", {})), int(m.get("nbytes", 0))
            except (OSError, ValueError, KeyError, TypeError):
                created, meta, nbytes = 0, {"error": "unreadable manifest"}, 0
            out.append(CheckpointInfo(name=name, seq=int(_NAME.match(name).group(1)), path=self.root / name,
                                      created_ns=created, meta=meta, nbytes=nbytes, latest=name == latest))
        return out
