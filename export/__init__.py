"""Frozen backbones with feature taps, exported once to ONNX, run by TensorRT, ONNX Runtime or torch.

    from export import load_backend
    backend = load_backend("image")            # auto: TensorRT > ORT CUDA > ORT CPU
    taps = backend.extract(frames_uint8)       # Taps(modality, {name: (B, dim) float32})

Importing this package does not import torch, onnx or tensorrt.
"""

from __future__ import annotations

from pathlib import Path

from export.backends import Backend, available_kinds, load_backend
from export.errors import (
    BackendUnavailableError,
    EngineBuildError,
    ExportError,
    InputSpecError,
    ManifestMismatchError,
    ModelFileError,
)
from export.manifest import check_compatible, fingerprint
from export.taps import InputSpec, Taps, TapSpec


def build(modality: str | None = None, out_dir: str | Path = "models", *, force: bool = False) -> list[Path]:
    """Export ONNX + manifest for one modality or all (cached by content hash)."""
    from export.onnx_build import build as _build

    return _build(modality, out_dir, force=force)


def __getattr__(name: str) -> object:
    if name == "IncrementalAudioExtractor":
        from export.incremental import IncrementalAudioExtractor

        return IncrementalAudioExtractor
    raise AttributeError(name)


__all__ = ["Backend", "BackendUnavailableError", "EngineBuildError", "ExportError", "IncrementalAudioExtractor",
           "InputSpec", "InputSpecError", "ManifestMismatchError", "ModelFileError", "TapSpec", "Taps",
           "available_kinds", "build", "check_compatible", "fingerprint", "load_backend"]
