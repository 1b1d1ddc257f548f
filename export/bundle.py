"""One verified file that carries the built models from the workstation to the robot.

    python -m export build                                   # workstation: torch's exporter, weights packages
    python -m export bundle --out models --file models.tar   # one file: ONNX, manifests, an index of sha256s
    python -m export unbundle models.tar --out models        # robot: verify, then swap the folder in

Why a bundle: exporting the backbones needs torch's dynamo exporter, onnxscript and the packages
that ship the weights, none of which a robot needs to serve; what it needs are the ONNX files and
manifests. A bundle is a plain tar (the ONNX files hardly compress) whose first member,
``bundle.json``, lists every other member with its size and sha256. Unpacking refuses anything it
does not list (links, folders, paths with ``/`` or ``..``), checks every file against the index
and every model against its own manifest in a scratch folder beside the target, and only then
renames the scratch folder into place, so an interrupted or refused unbundle leaves the old models
as they were. The index is copied into the models folder: :func:`ensure_unbundled` (the agent's
``model_bundle`` setting) unpacks only when the folder does not already hold that same bundle.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write, fsync_dir
from export.errors import ModelFileError
from export.manifest import load_verified, manifest_path, sha256_file

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
INDEX_NAME = "bundle.json"
MODALITIES = ("audio", "image", "imu")
MAX_INDEX_BYTES = 1 << 20
_WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle holds: ``digest`` (sha256 of its index) names it; ``files`` name -> size, sha256."""

    path: Path
    digest: str
    files: dict[str, dict[str, Any]]
    index: dict[str, Any]

    @property
    def bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


def _index_bytes(index: dict[str, Any]) -> bytes:
    return json.dumps(index, indent=2, sort_keys=True).encode()


def _model_files(model_dir: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Verified manifests of every modality, and the file names they reference (manifests included)."""
    manifests = {m: load_verified(model_dir, m) for m in MODALITIES}  # ModelFileError names what is wrong
    names = set()
    for m, man in manifests.items():
        names.add(manifest_path(model_dir, m).name)
        names.add(man["onnx"])
        names.update(p["onnx"] for p in man.get("parts", {}).values())
    return manifests, sorted(names)


def make_bundle(model_dir: str | Path, dest: str | Path) -> BundleInfo:
    """Pack the verified models of ``model_dir`` into ``dest`` (atomically: readers never see half a bundle)."""
    model_dir, dest = Path(model_dir), Path(dest)
    manifests, names = _model_files(model_dir)
    for name in names:
        if not _safe_name(name):
            raise ModelFileError(model_dir / name, "a manifest names a file outside the models folder")
    files = {n: {"size": (model_dir / n).stat().st_size, "sha256": sha256_file(model_dir / n)} for n in names}
    index = {"format": BUNDLE_FORMAT, "created_unix": round(time.time(), 3), "files": files,
             "models": {m: {"backbone": man["backbone"], "content_hash": man["content_hash"],
                            "source_versions": man["source_versions"]} for m, man in manifests.items()},
             "built_with": {"python": platform.python_version(), "machine": platform.machine()}}
    raw = _index_bytes(index)

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_member(INDEX_NAME, len(raw)), io.BytesIO(raw))
            for name in names:
                with open(model_dir / name, "rb") as src:
                    tar.addfile(_member(name, files[name]["size"]), src)

    atomic_write(dest, write)
    return BundleInfo(dest, hashlib.sha256(raw).hexdigest(), files, index)


def _safe_name(name: object) -> bool:
    """A plain file name inside the models folder: no separator, no ``.``/``..``, not the index."""
    return isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", "..", INDEX_NAME)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # no owner or time of the workstation
    return info


def _parse_index(path: Path, raw: bytes) -> BundleInfo:
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"bundle index unreadable: {e}") from e
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ModelFileError(path, f"not a continua models bundle of format {BUNDLE_FORMAT} (index format {got!r})")
    files = index.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelFileError(path, "bundle index lists no files")
    for name, meta in files.items():
        if not _safe_name(name):
            raise ModelFileError(path, f"bundle index names an unsafe path {name!r}")
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            raise ModelFileError(path, f"bundle index entry {name!r} lacks size or sha256")
    return BundleInfo(path, hashlib.sha256(raw).hexdigest(), files, index)


def read_bundle(path: str | Path) -> BundleInfo:
    """The index of a bundle file (the first member), without unpacking it."""
    path = Path(path)
    with _open(path) as tar:
        return _read_index(path, tar)


def _open(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise ModelFileError(path, "models bundle missing")
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise ModelFileError(path, f"not a readable models bundle (tar): {e}") from e


def _read_index(path: Path, tar: tarfile.TarFile) -> BundleInfo:
    try:
        first = tar.next()
    except (tarfile.TarError, EOFError, OSError) as e:  # Python 3.10 raises OSError on an all-zero file
        raise ModelFileError(path, f"models bundle is truncated or corrupt: {e}") from e
    if first is None or first.name != INDEX_NAME or not first.isfile() or first.size > MAX_INDEX_BYTES:
        raise ModelFileError(path, f"models bundle does not start with its index {INDEX_NAME}")
    return _parse_index(path, tar.extractfile(first).read())  # type: ignore[union-attr]


def unbundle(path: str | Path, model_dir: str | Path) -> BundleInfo:
    """Verify ``path`` and make ``model_dir`` hold exactly its models; ModelFileError names what is wrong.

    The old folder stays in place until the new one has passed every check."""
    path, model_dir = Path(path), Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=f".{model_dir.name}.unbundle-"))
    try:
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide the models from other users of the robot
        with _open(path) as tar:
            info = _read_index(path, tar)
            _extract(path, tar, info, scratch)
        for m in MODALITIES:
            load_verified(scratch, m)  # each model against its own manifest
        (scratch / INDEX_NAME).write_bytes(_index_bytes(info.index))
        _swap_in(scratch, model_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    log.info("unbundled %s (%d files, %.1f MB, bundle %s) into %s", path, len(info.files), info.bytes / 1e6,
             info.digest[:12], model_dir)
    return info


def _extract(path: Path, tar: tarfile.TarFile, info: BundleInfo, scratch: Path) -> None:
    seen: set[str] = set()
    try:
        for i, member in enumerate(tar):
            name = member.name
            if i == 0 and name == INDEX_NAME:
                continue  # the index itself, already read
            if name not in info.files or name in seen:
                raise ModelFileError(path, f"bundle member {name!r} is not in its index (or repeated)")
            if not member.isfile():
                raise ModelFileError(path, f"bundle member {name!r} is not a regular file")
            want = info.files[name]
            if member.size != want["size"]:
                raise ModelFileError(path, f"bundle member {name!r} is {member.size} bytes, index says {want['size']}")
            src = tar.extractfile(member)
            h = hashlib.sha256()
            with open(scratch / name, "wb") as dst:
                while chunk := src.read(1 << 20):  # type: ignore[union-attr]
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            if h.hexdigest() != want["sha256"]:
                raise ModelFileError(path, f"bundle member {name!r}: sha256 {h.hexdigest()[:12]} does not match the "
                                           f"index {want['sha256'][:12]} (corrupt or tampered)")
            seen.add(name)
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:  # the scratch folder, not the bundle: say so as it is
            raise
        raise ModelFileError(path, f"models bundle is truncated or corrupt: {e}") from e
    except (tarfile.TarError, EOFError) as e:
        raise ModelFileError(path, f"models bundle is truncated or corrupt: {e}") from e
    missing = sorted(set(info.files) - seen)
    if missing:
        raise ModelFileError(path, f"models bundle is truncated: {missing} listed but absent")


def _swap_in(scratch: Path, model_dir: Path) -> None:
    """Rename ``scratch`` to ``model_dir``; an existing folder is moved aside first and removed after."""
    old = None
    if model_dir.exists() or model_dir.is_symlink():
        old = model_dir.with_name(f".{model_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(model_dir, old)
    os.replace(scratch, model_dir)
    fsync_dir(model_dir.parent)
    if old is None:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def ensure_unbundled(path: str | Path, model_dir: str | Path) -> BundleInfo:
    """Unpack ``path`` into ``model_dir`` unless the folder already holds that bundle, verified."""
    path, model_dir = Path(path), Path(model_dir)
    info = read_bundle(path)
    held = model_dir / INDEX_NAME
    if held.is_file() and hashlib.sha256(held.read_bytes()).hexdigest() == info.digest:
        try:
            for m in MODALITIES:
                load_verified(model_dir, m)
            log.info("models in %s are bundle %s (%s), verified", model_dir, info.digest[:12], path)
            return info
        except ModelFileError as exc:
            log.warning("models in %s no longer match bundle %s (%s): unpacking again", model_dir, path, exc)
    return unbundle(path, model_dir)


def describe(info: BundleInfo) -> dict[str, Any]:
    """The JSON line of ``python -m export bundle|unbundle``."""
    return {"bundle": str(info.path), "digest": info.digest[:16], "files": len(info.files),
            "bytes": info.bytes, "models": {m: v.get("content_hash", "")[:16] for m, v in info.index.get("models", {}).items()},
            "built_with": info.index.get("built_with"), "python_here": sys.version.split()[0]}
