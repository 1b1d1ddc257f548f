"""The common backbone interface: a frozen torch module with named, pooled feature taps.

A backbone's ``forward`` takes the *graph input* (see ``input_spec``: already validated and
converted by :func:`export.inputs.prepare_batch`) and returns one (B, dim) float32 tensor per
tap, ordered shallow -> deep. The same module is the torch reference backend and the source of
the ONNX export, so the two cannot drift.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from export.taps import InputSpec, TapSpec


@dataclass(frozen=True)
class GraphPart:
    """An extra graph exported beside the main one (e.g. the audio front end alone)."""

    module: nn.Module
    example: torch.Tensor
    output_names: tuple[str, ...]


class Backbone(nn.Module, ABC):
    """Frozen feature extractor. Subclasses set the class attributes and implement forward."""

    modality: ClassVar[str]
    name: ClassVar[str]
    source_packages: ClassVar[tuple[str, ...]] = ("torch",)
    version: ClassVar[int] = 1  # bump when the graph changes; part of the build key

    input_spec: InputSpec
    tap_specs: list[TapSpec]

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Graph input -> one pooled (B, dim) tensor per tap."""

    @abstractmethod
    def example_input(self, batch: int) -> torch.Tensor:
        """A deterministic graph input of batch size ``batch`` (for export tracing only)."""

    def preprocessing(self) -> dict[str, Any]:
        """What the graph does to its input before the network (recorded in the manifest)."""
        return {}

    def parts(self) -> dict[str, GraphPart]:
        """Extra graphs to export beside the main one (default: none)."""
        return {}

    def source_versions(self) -> dict[str, str]:
        out = {}
        for pkg in self.source_packages:
            try:
                out[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                out[pkg] = "missing"
        return out

    def weights_hash(self) -> str:
        """sha256 over the state dict (names, shapes, bytes): identifies the frozen weights."""
        h = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            t = value.detach().cpu().contiguous()
            h.update(key.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def frozen(self) -> Backbone:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


def pool(x: torch.Tensor) -> torch.Tensor:
    """Global average over every dim after the channel dim: (B, C, ...) -> (B, C)."""
    return x.flatten(2).mean(dim=2)
