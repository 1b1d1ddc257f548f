"""A checkpoint's content in memory: encoded files plus their manifest entries.

What goes where (never a pickle on load):
- a value holding torch tensors (a tensor, a state dict, an optimizer state) -> ``torch.save``,
  read with ``torch.load(weights_only=True)``;
- numpy arrays anywhere in a value -> separate ``.npy`` files (``allow_pickle=False``), a
  ``{"__ndarray__": index}`` marker in their place;
- everything else (class list, task cursor, config, RNG states as ints) -> JSON.

Why a value of its own: the serving process never imports torch (it serves the exported ONNX
model) while the training worker does. The worker encodes a candidate (torch), writes it to
its job directory; the agent reads it back verified, commits it to the checkpoint store and
keeps the bytes, so that ``save`` can write the serving model again even after a failed write.
``decode(keys)`` decodes only what a process asks for, and imports torch only for a torch
entry it asked for.

Every byte a load reads is checked: each data file against its sha256 in the manifest, and the
manifest itself against the sha256 of its own content that it carries (``sensors.durable.seal``:
a flipped byte in the metadata, a count or a file name is refused like a flipped byte in the
weights). Format-1 manifests, written before manifests were sealed, are still read (their data
files are checked; their metadata cannot be) with a warning; every save writes a sealed one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import fsync_dir
from sensors.durable import seal, unseal

log = logging.getLogger(__name__)

FORMAT = 2  # 2: the manifest is sealed (carries the sha256 of its own content)
LEGACY_FORMATS = (1,)  # read without a seal (their metadata is not checksummed), never written
MANIFEST = "manifest.json"
_MARK = "__ndarray__"
_KINDS = ("torch", "json")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """A manifest (``entries``, ``meta`` and whatever a writer adds) as sealed JSON bytes."""
    return seal({**manifest, "format": FORMAT})


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """The checked content of a manifest file; ``ValueError`` naming ``where`` and the reason."""
    m, sealed = unseal(data, where)
    fmt = m.get("format")
    if sealed and fmt != FORMAT:
        raise ValueError(f"{where}: manifest format {fmt!r}, expected {FORMAT}")
    if not sealed:
        if fmt not in LEGACY_FORMATS:
            raise ValueError(f"{where}: unsealed manifest of format {fmt!r} (only format {LEGACY_FORMATS} may be "
                             f"unsealed): corrupt or edited")
        log.warning("%s: format-%s manifest without its own checksum (written before manifests were sealed): "
                    "its data files are verified, its metadata cannot be; the next save seals it", where, fmt)
    entries = m.get("entries")
    if not isinstance(entries, dict) or not isinstance(m.get("meta", {}), dict):
        raise ValueError(f"{where}: no entries/meta tables")
    for key, e in entries.items():
        ok = (isinstance(e, dict) and e.get("kind") in _KINDS and isinstance(e.get("sha256"), dict)
              and isinstance(e.get("arrays"), list) and all(isinstance(f, str) for f in [e.get("file"), *e["arrays"]]))
        if not ok:
            raise ValueError(f"{where}: entry {key!r} is malformed")
        unhashed = [f for f in [e["file"], *e["arrays"]] if f not in e["sha256"]]
        if unhashed:
            raise ValueError(f"{where}: entry {key!r} reads {unhashed}, which the manifest does not checksum")
        bad = [f for f in e["sha256"] if "/" in f or "\\" in f or f.startswith(".") or f == MANIFEST]
        if bad:
            raise ValueError(f"{where}: bad file name(s) {bad} in entry {key!r}")
    return m


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # no torch imported: nothing can be a tensor
    return torch is not None and isinstance(value, torch.Tensor)


def _has_tensor(value: Any) -> bool:
    if _is_tensor(value):
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
    if _is_tensor(value) or isinstance(value, str | int | float | bool | type(None)):
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


def _encode_value(key: str, value: Any) -> tuple[str, bytes, list[bytes]]:
    """(kind, main file bytes, array files' bytes) of one top-level state value."""
    arrays: list[np.ndarray] = []
    tree = _extract_arrays(value, arrays, key)
    blobs = []
    for arr in arrays:
        bio = io.BytesIO()
        np.save(bio, arr, allow_pickle=False)
        blobs.append(bio.getvalue())
    if _has_tensor(tree):
        import torch

        bio = io.BytesIO()
        torch.save(tree, bio)
        return "torch", bio.getvalue(), blobs
    _check_json_keys(tree, key)
    try:
        return "json", json.dumps(tree, allow_nan=True).encode(), blobs
    except (TypeError, ValueError) as exc:
        raise ValueError(f"state[{key}] is not JSON-serialisable: {exc}") from None


@dataclass
class StateFiles:
    """A checkpoint in memory: each top-level key's files (bytes) and its manifest entry.

    ``entries[key] = {"file", "kind" ("torch" | "json"), "arrays": [file, ...], "sha256":
    {file: digest}}`` exactly as a checkpoint's manifest lists them, so a store writes them
    unchanged and a reader verifies every byte.
    """

    entries: dict[str, dict[str, Any]]
    files: dict[str, bytes]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def encode(cls, state: dict[str, Any], meta: dict[str, Any] | None = None) -> StateFiles:
        """Encode ``state`` (tensors: torch.save; arrays: .npy; the rest: JSON); ValueError if it cannot."""
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError("state must be a dict with str keys")
        meta = dict(meta or {})
        json.dumps(meta)  # meta must be plain JSON; fail before touching the disk
        entries: dict[str, dict[str, Any]] = {}
        files: dict[str, bytes] = {}
        for i, (key, value) in enumerate(state.items()):
            kind, main, blobs = _encode_value(key, value)
            stem = f"e{i:03d}"
            names = [f"{stem}-a{j:03d}.npy" for j in range(len(blobs))]
            fname = f"{stem}.pt" if kind == "torch" else f"{stem}.json"
            files.update(zip(names, blobs, strict=True))
            files[fname] = main
            entries[key] = {"file": fname, "kind": kind, "arrays": names,
                            "sha256": {n: hashlib.sha256(files[n]).hexdigest() for n in [*names, fname]}}
        return cls(entries=entries, files=files, meta=meta)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    def verify(self) -> None:
        """ValueError naming the first file whose bytes do not match the manifest."""
        for entry in self.entries.values():
            for fname, digest in entry["sha256"].items():
                if "/" in fname or fname.startswith(".") or fname == MANIFEST:
                    raise ValueError(f"bad file name {fname!r} in manifest")
                data = self.files.get(fname)
                if data is None:
                    raise ValueError(f"{fname}: missing")
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ValueError(f"{fname}: sha256 mismatch (truncated or corrupt)")

    def decode(self, keys: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        """The state (or only ``keys``); torch is imported only to decode a torch entry asked for."""
        out: dict[str, Any] = {}
        for key, entry in self.entries.items():
            if keys is not None and key not in keys:
                continue
            arrays = [np.load(io.BytesIO(self.files[f]), allow_pickle=False) for f in entry["arrays"]]
            if entry["kind"] == "torch":
                import torch

                tree = torch.load(io.BytesIO(self.files[entry["file"]]), weights_only=True, map_location="cpu")
            else:
                tree = json.loads(self.files[entry["file"]].decode())
            out[key] = _restore_arrays(tree, arrays)
        missing = [k for k in keys or () if k not in out]
        if missing:
            raise KeyError(f"checkpoint has no {missing}; it holds {sorted(self.entries)}")
        return out

    def write_dir(self, path: str | Path, *, writer: Any = None) -> None:
        """Files + ``manifest.json`` into the existing directory ``path`` (each file fsynced)."""
        path = Path(path)
        write = writer or _write_file
        for fname, data in self.files.items():
            write(path / fname, data)
        write(path / MANIFEST, manifest_bytes({"meta": self.meta, "entries": self.entries, "nbytes": self.nbytes}))
        fsync_dir(path)

    @classmethod
    def read_dir(cls, path: str | Path) -> StateFiles:
        """Read and verify a directory written by ``write_dir`` or a store; ValueError with the reason."""
        path = Path(path)
        try:
            manifest = parse_manifest((path / MANIFEST).read_bytes(), MANIFEST)
            entries = manifest["entries"]
            names = [f for e in entries.values() for f in e["sha256"]]
            files = {f: (path / f).read_bytes() for f in names}  # only checksummed files are ever opened
            sf = cls(entries=entries, files=files, meta=dict(manifest.get("meta", {})))
            sf.verify()
        except ValueError:
            raise
        except Exception as exc:  # OSError, JSON, KeyError, TypeError: all mean "unusable"
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        return sf

    def with_meta(self, meta: dict[str, Any]) -> StateFiles:
        json.dumps(meta)
        return StateFiles(entries=self.entries, files=self.files, meta=dict(meta))


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
