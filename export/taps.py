"""Tap and input specs, and the one output dataclass every backend returns (NanoOWL style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Tensor names, defined once: ONNX export, ONNX Runtime and TensorRT all use these.
INPUT_NAME = "input"


def tap_output_name(tap: str) -> str:
    """Graph output name of a tap."""
    return f"tap_{tap}"


@dataclass(frozen=True)
class TapSpec:
    """One pooled feature tap: (batch, dim) float32."""

    name: str
    dim: int

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"TapSpec.name must be alphanumeric/underscore, got {self.name!r}")
        if self.dim <= 0:
            raise ValueError(f"TapSpec.dim must be > 0, got {self.dim}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "shape": ["batch", self.dim], "dtype": "float32"}


@dataclass(frozen=True)
class InputSpec:
    """What a backbone's graph takes. ``shape`` uses None for dynamic dims (batch always dynamic).

    ``host_dtypes`` are the dtypes ``extract`` accepts (converted to ``dtype`` before the graph).
    ``opt_shape``/``max_shape`` size TensorRT optimisation profiles.
    """

    shape: tuple[int | None, ...]
    dtype: str
    host_dtypes: tuple[str, ...]
    description: str
    opt_shape: tuple[int, ...] = ()
    max_shape: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        dims = ", ".join("B" if i == 0 else ("*" if d is None else str(d)) for i, d in enumerate(self.shape))
        return f"({dims}) {'/'.join(self.host_dtypes)}: {self.description}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": INPUT_NAME,
            "shape": ["batch" if i == 0 else d for i, d in enumerate(self.shape)],
            "dtype": self.dtype,
            "host_dtypes": list(self.host_dtypes),
            "description": self.description,
            "opt_shape": list(self.opt_shape),
            "max_shape": list(self.max_shape),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        known = {"name", "shape", "dtype", "host_dtypes", "description", "opt_shape", "max_shape"}
        return cls(
            shape=tuple(None if (i == 0 or s is None) else int(s) for i, s in enumerate(d["shape"])),
            dtype=d["dtype"],
            host_dtypes=tuple(d["host_dtypes"]),
            description=d["description"],
            opt_shape=tuple(d.get("opt_shape", ())),
            max_shape=tuple(d.get("max_shape", ())),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass
class Taps:
    """Backbone features of one batch: tap name -> (B, dim) float32, ordered shallow -> deep."""

    modality: str
    values: dict[str, np.ndarray]

    @property
    def batch_size(self) -> int:
        return next(iter(self.values.values())).shape[0]

    def as_list(self) -> list[np.ndarray]:
        return list(self.values.values())
