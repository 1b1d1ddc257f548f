"""TaskData: what every strategy trains on and is evaluated with (taps, present mask, labels, task id).

Kept apart from :mod:`benchmarks.scenarios` so that the runtime, which builds TaskData from live
samples, imports neither the offline datasets nor torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TaskData:
    """One task's samples.

    ``taps``: modality -> list of (N, dim_b) float32 arrays (shallow -> deep); ``present``: (N, K)
    bool, columns in ``taps`` order (an absent modality's taps may hold anything, zeros by
    convention); ``labels``: (N,) int64 global class ids; ``task``: the task id. ``soft``: optional
    (N, k) teacher logits over the global classes ``soft_classes`` (k,), e.g. a fleet peer's on the
    exemplars it shared: strategies distil from them (``Strategy.step``).
    """

    taps: dict[str, list[np.ndarray]]
    present: np.ndarray
    labels: np.ndarray
    task: int
    name: str = ""
    soft: np.ndarray | None = None
    soft_classes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.labels)
        self.present = np.asarray(self.present, dtype=bool)
        if self.present.shape != (n, len(self.taps)):
            raise ValueError(f"TaskData.present must be ({n}, {len(self.taps)}), got {self.present.shape}")
        if not self.taps:
            raise ValueError("TaskData.taps must hold at least one modality")
        for m, levels in self.taps.items():
            if not levels:
                raise ValueError(f"TaskData.taps[{m!r}] must hold at least one tap")
            for b, x in enumerate(levels):
                if x.ndim != 2 or x.shape[0] != n:
                    raise ValueError(f"TaskData.taps[{m!r}][{b}] must be ({n}, dim), got {x.shape}")
        if n and self.labels.min() < 0:
            raise ValueError(f"TaskData.labels must be >= 0, got min {self.labels.min()}")
        if (self.soft is None) != (self.soft_classes is None):
            raise ValueError("TaskData.soft and soft_classes come together")
        if self.soft is not None:
            self.soft = np.asarray(self.soft, dtype=np.float32)
            self.soft_classes = np.asarray(self.soft_classes, dtype=np.int64).reshape(-1)
            if self.soft.shape != (n, len(self.soft_classes)):
                raise ValueError(f"TaskData.soft must be ({n}, {len(self.soft_classes)}), got {self.soft.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modalities(self) -> list[str]:
        return list(self.taps)

    @property
    def tap_dims(self) -> dict[str, list[int]]:
        return {m: [int(x.shape[1]) for x in levels] for m, levels in self.taps.items()}

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def subset(self, idx: np.ndarray | Sequence[int]) -> TaskData:
        idx = np.asarray(idx)
        return TaskData(taps={m: [x[idx] for x in lv] for m, lv in self.taps.items()}, present=self.present[idx],
                        labels=self.labels[idx], task=self.task, name=self.name,
                        soft=None if self.soft is None else self.soft[idx], soft_classes=self.soft_classes)

    @classmethod
    def concat(cls, parts: Sequence[TaskData], task: int | None = None, name: str = "") -> TaskData:
        if not parts:
            raise ValueError("TaskData.concat needs at least one part")
        mods = parts[0].modalities
        if any(p.modalities != mods for p in parts):
            raise ValueError("TaskData.concat: parts name different modalities")
        taps = {m: [np.concatenate([p.taps[m][b] for p in parts]) for b in range(len(parts[0].taps[m]))]
                for m in mods}
        return cls(taps=taps, present=np.concatenate([p.present for p in parts]),
                   labels=np.concatenate([p.labels for p in parts]),
                   task=parts[-1].task if task is None else task, name=name or parts[-1].name)


@dataclass
class Scenario:
    """Train/test TaskData per task, plus what a report needs to say what was run."""

    name: str
    kind: str
    train: list[TaskData]
    test: list[TaskData]
    class_names: list[str]
    plan_hash: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return len(self.train)

    @property
    def modalities(self) -> list[str]:
        return self.train[0].modalities

    @property
    def tap_dims(self) -> dict[str, list[int]]:
        return self.train[0].tap_dims

    @property
    def num_classes(self) -> int:
        return int(max(int(t.labels.max()) for t in self.train)) + 1
