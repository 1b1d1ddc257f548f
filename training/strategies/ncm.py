"""Nearest-class-mean strategy on frozen features: the strong no-training baseline.

Nearest class mean on frozen features: no training at all. Each backbone tap is L2-normalised,
the taps of all modalities concatenated (absent modality: zeros), and a class's mean is the
running mean over every sample of it ever seen; prediction is the cosine-nearest mean. It cannot
forget in class-incremental learning, so it is the strong baseline for pretrained backbones."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.registry import register
from training.strategies.base import Strategy
from training.taskdata import TaskData


def ncm_features(taps: dict[str, list[Tensor]], present: Tensor) -> Tensor:
    parts = []
    for k, levels in enumerate(taps.values()):
        for x in levels:
            parts.append(F.normalize(x.float(), dim=1) * present[:, k, None].float())
    return torch.cat(parts, dim=1)


@register("ncm")
class NCM(Strategy):
    trains = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None

    def end_task(self, data: TaskData) -> None:
        taps = {m: [torch.from_numpy(np.asarray(x, np.float32)) for x in lv] for m, lv in data.taps.items()}
        feats = ncm_features(taps, torch.from_numpy(data.present))
        c = self.model.num_classes
        sums, counts = torch.zeros(c, feats.shape[1]), torch.zeros(c)
        if self.sums is not None and self.counts is not None:
            sums[: len(self.sums)], counts[: len(self.counts)] = self.sums, self.counts
        labels = torch.from_numpy(data.labels)
        sums.index_add_(0, labels, feats)
        counts.index_add_(0, labels, torch.ones(len(labels)))
        self.sums, self.counts = sums, counts

    @torch.no_grad()
    def predict(self, taps: dict[str, list[Tensor]], present: Tensor) -> Tensor:
        feats = F.normalize(ncm_features(taps, present), dim=1)
        if self.sums is None or self.counts is None:
            return torch.zeros(feats.shape[0], 0)
        means = F.normalize(self.sums / self.counts.clamp(min=1)[:, None], dim=1)
        sims = feats @ means.T.to(feats.device)
        return torch.where(self.counts.to(feats.device)[None] > 0, sims, torch.full_like(sims, -2.0))

    def extra_state(self) -> dict[str, Any]:
        return {"sums": self.sums, "counts": self.counts}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sums, self.counts = state["sums"], state["counts"]
