"""ONNX Runtime backend: the embedded default (CPU; CUDA execution provider where present)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from export.backends import register
from export.backends.base import Backend
from export.errors import BackendUnavailableError, ModelFileError
from export.manifest import verify_files
from export.taps import INPUT_NAME

log = logging.getLogger(__name__)


def make_session(path: str | Path, *, device: str = "cpu", threads: int | None = None) -> Any:
    """An InferenceSession on ``path``; a file ORT cannot load is a ModelFileError naming it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # several sessions share few cores (one per backbone): spinning workers would steal them
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif device == "cuda":
        raise BackendUnavailableError("onnxruntime: CUDAExecutionProvider not available (install onnxruntime-gpu)")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types for invalid graphs
        raise ModelFileError(path, f"onnxruntime cannot load it: {e}") from e


@register
class OnnxRuntimeBackend(Backend):
    kind = "onnxruntime"

    def __init__(self, manifest: dict[str, Any], model_dir: str | Path, *, device: str = "cpu",
                 threads: int | None = None) -> None:
        super().__init__(manifest, model_dir)
        path = verify_files(manifest, model_dir)
        self.session = make_session(path, device=device, threads=threads)
        self.providers = self.session.get_providers()
        self.output_names = list(manifest["outputs"])
        have = [o.name for o in self.session.get_outputs()]
        if have != self.output_names:
            raise ModelFileError(path, f"graph outputs {have} differ from manifest {self.output_names}")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return False, f"onnxruntime not importable: {e}"
        return True, ""

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {INPUT_NAME: x})
