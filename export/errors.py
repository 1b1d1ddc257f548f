"""Typed errors of the export package (one module, as STYLE.md asks)."""

from __future__ import annotations

from common.errors import ContinuaError


class ExportError(ContinuaError):
    """Base class of every error raised by continua.export."""


class InputSpecError(ExportError, ValueError):
    """A batch does not match a backbone's input spec (shape, dtype, channels, rate, empty)."""

    def __init__(self, modality: str, problem: str, expected: str) -> None:
        super().__init__(f"{modality} input: {problem}", fix=f"expected {expected}")
        self.modality = modality
        self.problem = problem
        self.expected = expected


class ManifestMismatchError(ExportError):
    """A model manifest differs from what the learner was trained on."""

    def __init__(self, differences: list[str]) -> None:
        super().__init__("model manifest does not match the learner's: " + "; ".join(differences))
        self.differences = differences


class ModelFileError(ExportError):
    """An ONNX, engine or manifest file is missing, corrupt or does not match its manifest."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class BackendUnavailableError(ExportError):
    """The requested backend cannot run here (package missing, no GPU)."""


class EngineBuildError(ExportError):
    """TensorRT failed to parse the ONNX file or to build or load an engine."""
