"""Torch backend: the reference (the very module the ONNX file was exported from), CPU or CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.backbones import create
from export.backends import register
from export.backends.base import Backend
from export.errors import BackendUnavailableError


@register
class TorchBackend(Backend):
    kind = "torch"

    def __init__(self, manifest: dict[str, Any], model_dir: str | Path, *, device: str = "cpu",
                 threads: int | None = None) -> None:
        super().__init__(manifest, model_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch: CUDA requested but torch.cuda.is_available() is False")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = create(self.modality).to(self.device)

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            outs = self.model(torch.from_numpy(x).to(self.device))
        return [o.float().cpu().numpy() for o in outs]
