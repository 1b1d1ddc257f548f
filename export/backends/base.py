"""The one backend interface: ``extract(batch) -> Taps``, identical across torch, ORT, TensorRT."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from export.errors import ModelFileError
from export.inputs import prepare_batch
from export.taps import InputSpec, Taps, TapSpec


class Backend(ABC):
    """Runs one modality's frozen backbone. Subclasses implement ``_run`` on a prepared batch."""

    kind: ClassVar[str]

    def __init__(self, manifest: dict[str, Any], model_dir: str | Path) -> None:
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.modality: str = manifest["modality"]
        self.tap_specs = [TapSpec(t["name"], int(t["dim"])) for t in manifest["taps"]]
        self.input_spec = InputSpec.from_dict(manifest["input"])

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(usable here, reason when not)."""
        return True, ""

    def prepare(self, batch: object, *, sample_rate: int | None = None) -> np.ndarray:
        return prepare_batch(self.modality, self.input_spec, batch, sample_rate=sample_rate)

    def extract(self, batch: np.ndarray, *, sample_rate: int | None = None) -> Taps:
        """Validate ``batch`` (InputSpecError names the expected spec) and return its taps."""
        x = self.prepare(batch, sample_rate=sample_rate)
        outs = self._run(x)
        return self._wrap(outs, x.shape[0])

    @abstractmethod
    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        """Graph input -> one (B, dim) array per tap, in tap order."""

    def _wrap(self, outs: list[np.ndarray], batch: int) -> Taps:
        if len(outs) != len(self.tap_specs):
            raise ModelFileError(self.manifest.get("onnx"), f"{len(outs)} outputs, manifest lists {len(self.tap_specs)} taps")
        values = {}
        for spec, out in zip(self.tap_specs, outs, strict=True):
            arr = np.asarray(out, dtype=np.float32)
            if arr.shape != (batch, spec.dim):
                raise ModelFileError(self.manifest.get("onnx"), f"tap {spec.name} has shape {arr.shape}, expected {(batch, spec.dim)}")
            values[spec.name] = arr
        return Taps(self.modality, values)

    def close(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """Release sessions/engines (default: nothing)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(modality={self.modality!r}, kind={self.kind!r})"
