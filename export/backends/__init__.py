"""Backend registry (name -> class, filled by ``register``) and ``load_backend``.

Why backend modules are imported one at a time: the robot's serving process runs ONNX Runtime
and must never import torch (the CUDA build of torch alone costs ~570 MB of resident memory,
three ONNX Runtime sessions ~110 MB). So ``load_backend("image", "onnxruntime")`` imports only
the ONNX Runtime backend, and a model that is missing or fails its checksum is exported by a
``python -m export build`` child process when ``build="missing"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from export.backends.base import Backend
from export.errors import BackendUnavailableError, ModelFileError

log = logging.getLogger(__name__)
BACKENDS: dict[str, type[Backend]] = {}
KINDS = ("tensorrt", "onnxruntime", "torch")


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.kind] = cls
    return cls


def _backend_class(kind: str) -> type[Backend]:
    """The backend class of ``kind``, importing only its module (each registers itself)."""
    if kind not in KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; expected auto or one of {list(KINDS)}")
    if kind not in BACKENDS:
        importlib.import_module(f"export.backends.{kind}")
    return BACKENDS[kind]


def available_kinds() -> dict[str, tuple[bool, str]]:
    """kind -> (available, reason when not). Does not import torch to say whether it is there."""
    out = {}
    for k in KINDS:
        if k == "torch" and k not in BACKENDS:
            found = importlib.util.find_spec("torch") is not None
            out[k] = (True, "") if found else (False, "torch is not installed")
        else:
            out[k] = _backend_class(k).available()
    return out


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _build_in_child(modality: str, model_dir: str | Path) -> None:
    """Export ``modality`` in a ``python -m export build`` process: this one stays torch-free."""
    cmd = [sys.executable, "-m", "export", "build", "--modality", modality, "--out", str(model_dir)]
    log.info("%s: model missing or unverified in %s; exporting it: %s", modality, model_dir, " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise ModelFileError(Path(model_dir) / f"{modality}.onnx", f"`{' '.join(cmd)}` failed ({res.returncode}): {tail}")


def load_manifest(modality: str, model_dir: str | Path, *, build: bool | str = True) -> dict[str, Any]:
    """The verified manifest of ``modality``.

    ``build``: True re-checks the build key in this process (imports torch; a corrupt or stale
    export is rebuilt); ``"missing"`` trusts verified files (sha256 as in the manifest) and
    exports only a missing or corrupt model, in a child process; False never builds.
    """
    from export.manifest import load_verified

    if build == "missing":
        try:
            return load_verified(model_dir, modality)
        except ModelFileError as exc:
            log.warning("%s: %s", modality, exc)
        _build_in_child(modality, model_dir)
    elif build:
        from export.onnx_build import build_one

        build_one(modality, model_dir)  # cached by build key; rebuilds rejected files, logging why
    return load_verified(model_dir, modality)  # ModelFileError(path, reason) if still unusable


def load_backend(modality: str, kind: str = "auto", model_dir: str | Path = "models", *, build: bool | str = True,
                 **kw: Any) -> Backend:
    """Backend for ``modality``. kind: auto | tensorrt | onnxruntime | torch.

    auto picks TensorRT, then ONNX Runtime with CUDA, then ONNX Runtime on the CPU, logging one
    line when it falls back. ``kw`` go to the backend (device=, threads=, engine_dir=, ...).
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; expected auto or one of {list(KINDS)}")
    manifest = load_manifest(modality, model_dir, build=build)
    if kind == "auto":
        ok, why = _backend_class("tensorrt").available()
        if ok:
            return BACKENDS["tensorrt"](manifest, model_dir, **kw)
        device = "cuda" if _ort_has_cuda() else "cpu"
        log.info("backend auto for %s: TensorRT unavailable (%s); using onnxruntime (%s)", modality, why, device)
        kw.setdefault("device", device)
        return _backend_class("onnxruntime")(manifest, model_dir, **kw)
    cls = _backend_class(kind)
    ok, why = cls.available()
    if not ok:
        raise BackendUnavailableError(f"backend {kind!r} unavailable: {why}")
    return cls(manifest, model_dir, **kw)


__all__ = ["BACKENDS", "KINDS", "Backend", "available_kinds", "load_backend", "load_manifest", "register"]
