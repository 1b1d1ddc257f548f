"""Where prepared data lives and how it is loaded: ``data/<name>.npz`` + ``data/manifest.json``.

Every load checks the file against the sha256 that ``prepare`` wrote into the manifest, so
a truncated copy or a stale file from another version is an error that names the fix, not
a silent wrong result. The directory is ``data/`` at the repository root, or ``$CONTINUA_DATA``.

Contents (INTERFACES.md "Prepared data"; extra keys may be added, none removed)::

    fashion_mnist  x_train (60000,28,28) u8, y_train i64, x_test (10000,28,28) u8, y_test i64,
                   class_names (10,) str
    digits         x (1797,8,8) u8 (0..16 scaled to 0..255), y i64
    basic_motions  x_train (40,6,100) f32, y_train i64, x_test, y_test, class_names (4,) str;
                   channels acc x,y,z then gyro x,y,z, values as shipped (10 Hz, 10 s)
    speech         audio (N,16000) i16, y (N,) i64 word index, voice (N,) "engine:voice",
                   aug (N,) str, words (20,) str (the Fashion-MNIST names, then "zero".."nine"),
                   split (N,) "train"|"test" (leave-voices-out: see :func:`voice_split`)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from demodata.errors import DatasetCorruptError, DatasetNotPreparedError

__all__ = [
    "DATASETS",
    "MANIFEST",
    "DatasetCorruptError",
    "DatasetNotPreparedError",
    "data_dir",
    "file_sha256",
    "load",
    "manifest",
    "speech_split",
    "voice_split",
]

DATASETS = ("fashion_mnist", "digits", "basic_motions", "speech")
MANIFEST = "manifest.json"
ENV_VAR = "CONTINUA_DATA"
_REPO = Path(__file__).resolve().parents[1]

# Leave-voices-out split of the speech set: a voice is a synthesiser timbre ("+variant" of
# espeak-ng, or one flite speaker); test voices never occur in train, across all accents.
TEST_ESPEAK_VARIANTS = frozenset({"m3", "f4"})
TEST_FLITE_VOICES = frozenset({"slt"})


def data_dir() -> Path:
    """The prepared-data directory: ``$CONTINUA_DATA`` if set, else ``<repo>/data``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else _REPO / "data"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fix(name: str | None = None) -> str:
    only = f" --only {name}" if name else ""
    return f"run `make data` (or `python -m demodata.prepare{only} --force`)"


def manifest(root: Path | None = None) -> dict[str, Any]:
    """The parsed ``manifest.json``; raises ``DatasetNotPreparedError`` if absent."""
    path = (root or data_dir()) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetNotPreparedError(f"no prepared data: {path} does not exist; {_fix()}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetCorruptError(f"{path} is not valid JSON ({exc}); {_fix()}") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict):
        raise DatasetCorruptError(f"{path} has no 'datasets' table; {_fix()}")
    return data


# (path, size, mtime_ns) -> sha256 of files already verified by this process
_verified: dict[tuple[str, int, int], str] = {}


def load(name: str, *, verify: bool = True, root: Path | None = None) -> dict[str, np.ndarray]:
    """All arrays of one prepared dataset, fully read into memory.

    Raises ``DatasetNotPreparedError`` when the dataset was never prepared and
    ``DatasetCorruptError`` (a subclass) when the file does not match the manifest.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    root = root or data_dir()
    entry = manifest(root)["datasets"].get(name)
    if entry is None:
        raise DatasetNotPreparedError(f"dataset {name!r} is not in {root / MANIFEST}; {_fix(name)}")
    path = root / entry["file"]
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DatasetNotPreparedError(
            f"{path} is missing although the manifest lists it; {_fix(name)}"
        ) from None
    if st.st_size != entry["bytes"]:
        raise DatasetCorruptError(
            f"{path} is {st.st_size} bytes, the manifest says {entry['bytes']}; {_fix(name)}"
        )
    if verify:
        key = (str(path), st.st_size, st.st_mtime_ns)
        digest = _verified.get(key) or file_sha256(path)
        if digest != entry["sha256"]:
            raise DatasetCorruptError(
                f"{path} sha256 {digest[:16]}... does not match the manifest {entry['sha256'][:16]}...; {_fix(name)}"
            )
        _verified[key] = digest
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zipfile/format errors of a file that passed no hash check
        raise DatasetCorruptError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); {_fix(name)}"
        ) from None
    missing = sorted(set(entry.get("arrays", {})) - set(arrays))
    if missing:
        raise DatasetCorruptError(f"{path} lacks arrays {missing}; {_fix(name)}")
    return arrays


def voice_split(voices: np.ndarray | list[str]) -> np.ndarray:
    """``"train"`` or ``"test"`` for each ``"engine:voice"`` string (leave-voices-out)."""
    out = []
    for v in voices:
        engine, _, voice = str(v).partition(":")
        if engine == "espeak-ng":
            test = voice.partition("+")[2] in TEST_ESPEAK_VARIANTS
        elif engine == "flite":
            test = voice in TEST_FLITE_VOICES
        else:
            raise ValueError(f"unknown speech engine in voice {v!r}; expected 'espeak-ng:...' or 'flite:...'")
        out.append("test" if test else "train")
    return np.asarray(out)


def speech_split(data: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    """The clips of one voice split (``"train"`` or ``"test"``) of a loaded speech set."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    splits = data["split"] if "split" in data else voice_split(data["voice"])
    keep = splits == split
    n = len(keep)
    return {k: (v[keep] if v.ndim and len(v) == n and k != "words" else v) for k, v in data.items()}
