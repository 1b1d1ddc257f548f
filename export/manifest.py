"""Model manifests: what an exported graph computes, and the checks that refuse a wrong one.

A manifest (JSON, beside the ONNX file) records tap names, shapes and dtypes, the input spec,
preprocessing, opset, source package versions and a content hash (sha256 of the ONNX file).
The learner stores :func:`fingerprint` of the manifest it was trained on; the agent calls
:func:`check_compatible` before serving, which raises :class:`ManifestMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from export.errors import ManifestMismatchError, ModelFileError

MANIFEST_FORMAT = 1
REQUIRED = ("format", "modality", "backbone", "backbone_version", "onnx", "content_hash", "build_key",
            "input", "taps", "opset", "source_versions", "preprocessing")
# fields that decide whether a learner's taps mean the same thing
COMPAT_FIELDS = ("modality", "backbone", "backbone_version", "taps", "input", "preprocessing", "content_hash")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path(model_dir: str | Path, modality: str) -> Path:
    return Path(model_dir) / f"{modality}.manifest.json"


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Atomic write: temp file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and structurally check a manifest; ModelFileError(path, reason) when it is not usable."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "manifest missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"manifest unreadable: {e}") from e
    if not isinstance(data, dict):
        raise ModelFileError(path, "manifest is not a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ModelFileError(path, f"manifest lacks {missing}")
    if data["format"] != MANIFEST_FORMAT:
        raise ModelFileError(path, f"manifest format {data['format']} != {MANIFEST_FORMAT}")
    return data


def verify_files(manifest: dict[str, Any], model_dir: str | Path) -> Path:
    """Check the ONNX file (and parts) against the manifest's hashes; return the ONNX path."""
    model_dir = Path(model_dir)
    files = [(manifest["onnx"], manifest["content_hash"])]
    files += [(p["onnx"], p["sha256"]) for p in manifest.get("parts", {}).values()]
    for name, digest in files:
        path = model_dir / name
        if not path.is_file():
            raise ModelFileError(path, "ONNX file missing")
        actual = sha256_file(path)
        if actual != digest:
            raise ModelFileError(path, f"sha256 {actual[:12]} does not match manifest {digest[:12]} (corrupt or replaced)")
    return model_dir / manifest["onnx"]


def load_verified(model_dir: str | Path, modality: str) -> dict[str, Any]:
    """Read the manifest of ``modality`` and verify its files; raises ModelFileError."""
    path = manifest_path(model_dir, modality)
    manifest = read_manifest(path)
    if manifest["modality"] != modality:
        raise ModelFileError(path, f"manifest is for modality {manifest['modality']!r}, not {modality!r}")
    verify_files(manifest, model_dir)
    return manifest


def fingerprint(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest a learner stores with its weights (JSON-serialisable)."""
    return {k: manifest[k] for k in COMPAT_FIELDS if k in manifest}


def check_compatible(manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise ManifestMismatchError unless ``manifest`` matches ``expected`` on every field
    ``expected`` has among COMPAT_FIELDS (a full manifest or a :func:`fingerprint`)."""
    diffs = []
    for key in COMPAT_FIELDS:
        if key not in expected:
            continue
        have, want = manifest.get(key), expected[key]
        if key == "taps":
            have = [(t["name"], t["dim"]) for t in have or []]
            want = [(t["name"], t["dim"]) for t in want]
        if _canon(have) != _canon(want):
            diffs.append(f"{key}: model has {_short(have)}, learner expects {_short(want)}")
    if diffs:
        raise ManifestMismatchError(diffs)


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _short(v: Any, n: int = 120) -> str:
    s = _canon(v)
    return s if len(s) <= n else s[: n - 3] + "..."
