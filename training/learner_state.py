"""A learner's saved state on disk: one generation directory per save, committed by one rename.

Layout of a learner directory (``Learner.save(directory)``)::

    gen-000007/manifest.json   sealed (sensors.durable.seal): format, parts, each file's sha256 and size
    gen-000007/learner.json    the learner state without its tensors: config, class names, tap dims,
                               counters, RNG states ... ({"__tensor__": key} / {"__ndarray__": key} marks)
    gen-000007/learner.pt      its tensors: one flat {key: Tensor} dict (torch.save)
    gen-000007/buffer.json     the replay buffer's state, the same way (arrays as tensors)
    gen-000007/buffer.pt
    gen-000006/                the previous generation (``keep`` newest are kept)
    corrupt/gen-000008-<ns>/   generations that failed verification, moved aside by a load

Why: (1) no pickle on load. ``torch.load(weights_only=True)`` of a flat tensor dict and
``json.loads`` of the rest cannot run code, so a state file from anywhere is safe to open; the
format needs nothing else (numpy arrays travel as tensors, tuples as lists). Directories of the
old format (``state.pt``, a full pickle) are refused with a clear error, never unpickled.
(2) One commit: state and buffer are written into a hidden temp directory, fsynced, and renamed
into place together, then the directory is fsynced; a crash at any moment leaves the previous
pair or the new pair, never a new state beside an old buffer. (3) Every file a load reads is
listed in the manifest with its sha256, and the manifest carries the sha256 of its own content:
a flipped byte anywhere makes that generation unusable: it is moved to ``corrupt/`` (kept for
a look, out of the count of generations a save keeps) and the previous one is loaded instead,
with the reason in the ``LoadReport``. Fault points (``sensors.durable``):
``learner.between_state_and_buffer``, ``learner.before_rename``, ``learner.after_rename``.
One writer per directory at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import fsync_dir
from sensors.durable import fault_point, seal, unseal
from training.errors import LearnerStateError

log = logging.getLogger(__name__)

FORMAT = 2  # of the directory layout (1: the old state.pt pickle, refused)
KIND = "continua-learner"
MANIFEST = "manifest.json"
_GEN = re.compile(r"^gen-(\d{6,})$")
_TENSOR, _ARRAY = "__tensor__", "__ndarray__"


@dataclass
class LoadReport:
    """Which generation a load used and the newer ones it skipped, with the reason (a counter for a status page)."""

    generation: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (generation, reason)

    @property
    def fell_back(self) -> bool:
        return bool(self.skipped)


# ---- encoding: tensors apart, the rest JSON --------------------------------------------------------
def _split(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """``value`` as a JSON tree with tensors (and numpy arrays, as tensors) moved to ``tensors``."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise ValueError(f"learner state {where} is an object array: it would need pickle")
        key = f"t{len(tensors)}"
        try:
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        except TypeError as exc:
            raise ValueError(f"learner state {where}: numpy dtype {value.dtype} has no torch equivalent") from exc
        return {_ARRAY: key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if _TENSOR in value or _ARRAY in value:
            raise ValueError(f"learner state {where} uses a reserved key")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f"learner state {where} has non-str keys {bad[:3]}: JSON would change them")
        return {k: _split(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    raise ValueError(f"learner state {where} has type {type(value).__name__}; expected tensors, arrays or "
                     "JSON values (dict, list, str, int, float, bool, None)")


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        if set(tree) == {_ARRAY}:
            return tensors[tree[_ARRAY]].numpy().copy()
        return {k: _join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def encode_part(value: dict[str, Any], name: str) -> dict[str, bytes]:
    """``{name.json: ..., name.pt: ...}`` for one part of a saved state; ``ValueError`` if it cannot be saved safely."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(value, tensors, name)
    bio = io.BytesIO()
    torch.save(tensors, bio)
    return {f"{name}.json": json.dumps(tree, allow_nan=True).encode(), f"{name}.pt": bio.getvalue()}


def decode_part(files: dict[str, bytes], name: str) -> Any:
    """The inverse of ``encode_part`` (bytes already verified); never unpickles anything but tensors."""
    tensors = torch.load(io.BytesIO(files[f"{name}.pt"]), weights_only=True, map_location="cpu")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{name}.pt is not a flat dict of tensors")
    return _join(json.loads(files[f"{name}.json"].decode()), tensors)


# ---- generations ---------------------------------------------------------------------------------
def generations(directory: Path) -> list[str]:
    """Generation directory names, newest first."""
    if not directory.is_dir():
        return []
    names = [p.name for p in directory.iterdir() if p.is_dir() and _GEN.match(p.name)]
    return sorted(names, key=lambda n: int(_GEN.match(n).group(1)), reverse=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_generation(directory: Path, parts: dict[str, dict[str, Any]], *, keep: int = 2) -> str:
    """Write ``parts`` (learner first, then buffer) as a new generation; returns its name."""
    if keep < 1:
        raise ValueError(f"keep={keep!r} must be >= 1")
    encoded = {name: encode_part(value, name) for name, value in parts.items()}  # fail before touching the disk
    directory.mkdir(parents=True, exist_ok=True)
    used = [int(_GEN.match(n).group(1)) for n in generations(directory)]
    if (directory / "corrupt").is_dir():  # numbers never repeat, not even those of corrupt generations
        used += [int(m.group(1)) for q in (directory / "corrupt").iterdir() if (m := re.match(r"^gen-(\d{6,})-", q.name))]
    seq = max(used, default=0) + 1
    name = f"gen-{seq:06d}"
    tmp = directory / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        listed: dict[str, dict[str, Any]] = {}
        for i, files in enumerate(encoded.values()):
            if i == 1:
                fault_point("learner.between_state_and_buffer")
            for fname, data in files.items():
                _write_synced(tmp / fname, data)
                listed[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest = {"format": FORMAT, "kind": KIND, "seq": seq, "created_ns": time.time_ns(),
                    "parts": list(encoded), "files": listed}
        _write_synced(tmp / MANIFEST, seal(manifest))
        fsync_dir(tmp)
        fault_point("learner.before_rename")
        os.rename(tmp, directory / name)  # the commit: state and buffer together
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("learner.after_rename")
    for old in generations(directory)[keep:]:
        shutil.rmtree(directory / old, ignore_errors=True)
    for stale in directory.glob(".tmp-gen-*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    if (directory / "corrupt").is_dir():
        for old in sorted((directory / "corrupt").iterdir(), key=lambda p: p.stat().st_mtime)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return name


def _move_aside(directory: Path, name: str) -> Path | None:
    """Move an unusable generation to ``corrupt/`` so that no later save counts it as a kept one."""
    dest = directory / "corrupt" / f"{name}-{time.time_ns()}"
    try:
        dest.parent.mkdir(exist_ok=True)
        os.rename(directory / name, dest)
        fsync_dir(directory)
        fsync_dir(dest.parent)
    except OSError as exc:  # a read-only directory: load anyway, leave it where it is
        log.error("cannot move %s/%s aside: %s", directory, name, exc)
        return None
    return dest


def read_generation(path: Path) -> dict[str, Any]:
    """Verify one generation (sealed manifest, every file's sha256 and size) and decode its parts;
    ``ValueError`` with the reason."""
    try:
        manifest, sealed = unseal((path / MANIFEST).read_bytes(), f"{path.name}/{MANIFEST}")
    except OSError as exc:
        raise ValueError(f"{path.name}/{MANIFEST}: {exc}") from None
    if not sealed or manifest.get("format") != FORMAT or manifest.get("kind") != KIND:
        raise ValueError(f"{path.name}/{MANIFEST} is not a sealed format-{FORMAT} {KIND} manifest")
    listed, part_names = manifest.get("files"), manifest.get("parts")
    if not isinstance(listed, dict) or not isinstance(part_names, list) or "learner" not in part_names:
        raise ValueError(f"{path.name}/{MANIFEST} lists no learner part")
    files: dict[str, bytes] = {}
    for fname, info in listed.items():
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith(".") or fname == MANIFEST:
            raise ValueError(f"{path.name}: bad file name {fname!r} in the manifest")
        try:
            data = (path / fname).read_bytes()
        except OSError as exc:
            raise ValueError(f"{path.name}/{fname}: {exc}") from None
        if not isinstance(info, dict) or len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise ValueError(f"{path.name}/{fname}: size or sha256 mismatch (truncated or corrupt)")
        files[fname] = data
    out: dict[str, Any] = {}
    for part in part_names:
        missing = [f for f in (f"{part}.json", f"{part}.pt") if f not in files]
        if missing:
            raise ValueError(f"{path.name}: part {part!r} needs {missing}, which the manifest does not checksum")
        try:
            out[part] = decode_part(files, str(part))
        except Exception as exc:  # torch's unpickler refusing a global, bad JSON, a missing tensor: unusable
            raise ValueError(f"{path.name}: part {part!r} does not decode ({type(exc).__name__}: {exc})") from exc
    return out


def load_generation(directory: Path) -> tuple[dict[str, Any], LoadReport]:
    """The parts of the newest generation that verifies, and the report of what was skipped."""
    names = generations(directory)
    if not names:
        if (directory / "state.pt").exists():
            raise LearnerStateError(
                f"{directory} holds a learner saved in the old format (state.pt, a Python pickle): it is not "
                "loaded, because unpickling a file can run any code. Retrain it, or convert it "
                "with training.learner_state.convert_old_format(directory, new_directory) (restricted unpickler)")
        raise LearnerStateError(f"no saved learner in {directory} (no gen-* directory)")
    skipped: list[tuple[str, str]] = []
    for name in names:
        try:
            parts = read_generation(directory / name)
        except ValueError as exc:
            moved = _move_aside(directory, name)
            log.error("learner state %s/%s is unusable (%s); moved to %s; trying the previous generation",
                      directory, name, exc, moved)
            skipped.append((name, str(exc)))
            continue
        if skipped:
            log.warning("learner state: loaded %s after %d unusable newer generation(s)", name, len(skipped))
        return parts, LoadReport(generation=name, skipped=skipped)
    raise LearnerStateError(f"no usable learner state in {directory}: "
                            + "; ".join(f"{n}: {r}" for n, r in skipped))


def convert_old_format(old: Path | str, new: Path | str) -> Path:
    """Re-save an old-format learner directory (``state.pt`` + ``buffer/``) in the sealed format.

    ``state.pt`` is read with ``torch.load(weights_only=True)`` too: the old state held only
    tensors and plain values, so a genuine file converts, and one that needs any other class
    (a crafted pickle) is refused here as well."""
    from training.buffer import ReplayBuffer
    from training.config import LearnerConfig
    from training.learner import Learner

    old = Path(old)
    try:
        state = torch.load(old / "state.pt", weights_only=True, map_location="cpu")
    except Exception as exc:  # the restricted unpickler refusing a global, a torn zip...
        raise LearnerStateError(f"{old / 'state.pt'} cannot be converted safely ({type(exc).__name__}: {exc})") from exc
    learner = Learner(state["tap_dims"], LearnerConfig.from_saved(state["config"]))
    if (old / "buffer").exists():
        learner.strategy.buffer = ReplayBuffer.load(old / "buffer", seed=learner.config.training.seed)
    learner.load_state_dict(state)
    return learner.save(new)
