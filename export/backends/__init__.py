"""Backend registry (name -> class, filled by ``register``) and ``load_backend``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from export.backends.base import Backend
from export.errors import BackendUnavailableError

log = logging.getLogger(__name__)
BACKENDS: dict[str, type[Backend]] = {}
KINDS = ("tensorrt", "onnxruntime", "torch")


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.kind] = cls
    return cls


def _load_all() -> None:
    from export.backends import onnxruntime, tensorrt, torch  # noqa: F401  (each registers itself)


def available_kinds() -> dict[str, tuple[bool, str]]:
    """kind -> (available, reason when not)."""
    _load_all()
    return {k: BACKENDS[k].available() for k in KINDS}


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def load_manifest(modality: str, model_dir: str | Path, *, build: bool = True) -> dict[str, Any]:
    """The verified manifest of ``modality``; a corrupt or stale export is rejected and rebuilt."""
    from export.manifest import load_verified

    if build:
        from export.onnx_build import build_one

        build_one(modality, model_dir)  # cached by build key; rebuilds rejected files, logging why
    return load_verified(model_dir, modality)  # ModelFileError(path, reason) if still unusable


def load_backend(modality: str, kind: str = "auto", model_dir: str | Path = "models", *, build: bool = True,
                 **kw: Any) -> Backend:
    """Backend for ``modality``. kind: auto | tensorrt | onnxruntime | torch.

    auto picks TensorRT, then ONNX Runtime with CUDA, then ONNX Runtime on the CPU, logging one
    line when it falls back. ``kw`` go to the backend (device=, threads=, engine_dir=, ...).
    """
    _load_all()
    manifest = load_manifest(modality, model_dir, build=build)
    if kind == "auto":
        ok, why = BACKENDS["tensorrt"].available()
        if ok:
            return BACKENDS["tensorrt"](manifest, model_dir, **kw)
        device = "cuda" if _ort_has_cuda() else "cpu"
        log.info("backend auto for %s: TensorRT unavailable (%s); using onnxruntime (%s)", modality, why, device)
        kw.setdefault("device", device)
        return BACKENDS["onnxruntime"](manifest, model_dir, **kw)
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend kind {kind!r}; expected auto or one of {list(KINDS)}")
    ok, why = BACKENDS[kind].available()
    if not ok:
        raise BackendUnavailableError(f"backend {kind!r} unavailable: {why}")
    return BACKENDS[kind](manifest, model_dir, **kw)


__all__ = ["BACKENDS", "KINDS", "Backend", "available_kinds", "load_backend", "load_manifest", "register"]
