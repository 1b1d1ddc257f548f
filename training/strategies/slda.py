"""Deep Streaming LDA (Hayes & Kanan, CVPR-W 2020) on frozen taps: class means + one shared covariance.

Why: like NCM it never trains and cannot forget, but the shared covariance whitens the frozen
features, which is what made SLDA a strong streaming baseline on pretrained backbones.

Features are :func:`training.strategies.ncm.ncm_features` (each tap L2-normalised, all
modalities concatenated, an absent modality zeros). State: per-class counts and means and the
pooled within-class scatter ``S`` (float64, on the CPU). Prediction, with ``Sigma = S / N``::

    Lambda = ((1 - eps) Sigma + eps I)^-1      eps = params["shrinkage"] (1e-4, the paper's)
    logits_c = x . (Lambda mu_c) - 0.5 mu_c^T Lambda mu_c

``W = Lambda mu`` and ``b`` are cached (float32) after each task, so ``predict`` is one matmul
and exports to ONNX; a class not seen yet gets ``UNSEEN`` (-1e4) instead of a score.

Differences from the paper: (1) the update is per task, batch-exact (Chan's merge of per-class
count/mean/scatter), which equals the one-sample-at-a-time Welford update of the within-class
scatter; the authors' code weights each sample's outer product by ``N/(N+1)`` (total count)
instead of the class's ``n_c/(n_c+1)``, an approximation the exact form does not need. (2) No
separate "base initialisation" phase: the first task is just the first update.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.registry import register
from training.strategies.base import Strategy
from training.strategies.ncm import ncm_features
from training.taskdata import TaskData

UNSEEN = -1e4


def task_features(data: TaskData) -> np.ndarray:
    """``ncm_features`` of a TaskData as float64 numpy (N, D)."""
    taps = {m: [torch.from_numpy(np.asarray(x, np.float32)) for x in lv] for m, lv in data.taps.items()}
    return ncm_features(taps, torch.from_numpy(data.present)).double().numpy()


@register("slda")
class SLDA(Strategy):
    trains = False
    defaults = {"shrinkage": 1e-4}

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        # statistics as numpy (float64): kept out of the ONNX predictor, which registers tensors
        self.counts: np.ndarray = np.zeros(0)
        self.means: np.ndarray | None = None  # (C, D)
        self.scatter: np.ndarray | None = None  # (D, D), sum over classes of within-class scatter
        self.weight: Tensor | None = None  # (C, D) float32, Lambda mu_c
        self.bias: Tensor | None = None  # (C,) float32

    def end_task(self, data: TaskData) -> None:
        x = task_features(data)
        c, d = self.model.num_classes, x.shape[1]
        counts, means = np.zeros(c), np.zeros((c, d))
        if self.means is not None:
            counts[: len(self.counts)], means[: len(self.means)] = self.counts, self.means
        scatter = np.zeros((d, d)) if self.scatter is None else self.scatter.copy()
        for k in np.unique(data.labels):
            xb = x[data.labels == k]
            nb, mb = len(xb), xb.mean(0)
            na, ma = counts[k], means[k]
            diff = xb - mb
            delta = mb - ma
            scatter += diff.T @ diff + (na * nb / (na + nb)) * np.outer(delta, delta)
            means[k] = ma + delta * nb / (na + nb)
            counts[k] = na + nb
        self.counts, self.means, self.scatter = counts, means, scatter
        self._solve()

    def _solve(self) -> None:
        """Cache ``W = Lambda mu`` and ``b`` (Cholesky solve in float64; Lambda is never formed)."""
        assert self.means is not None and self.scatter is not None
        eps = float(self.p["shrinkage"])
        n = max(float(self.counts.sum()), 1.0)
        d = self.scatter.shape[0]
        with torch.no_grad():
            a = (1 - eps) * torch.from_numpy(self.scatter) / n + eps * torch.eye(d, dtype=torch.float64)
            mu = torch.from_numpy(self.means)
            w = torch.cholesky_solve(mu.T.contiguous(), torch.linalg.cholesky(a)).T  # (C, D)
            b = -0.5 * (mu * w).sum(1)
            seen = torch.from_numpy(self.counts > 0)
            self.weight = w.float().contiguous()
            self.bias = torch.where(seen, b, torch.full_like(b, UNSEEN)).float()

    @torch.no_grad()
    def predict(self, taps: dict[str, list[Tensor]], present: Tensor) -> Tensor:
        feats = ncm_features(taps, present)
        if self.weight is None or self.bias is None:
            return torch.zeros(feats.shape[0], 0, device=feats.device)
        return feats @ self.weight.T.to(feats.device) + self.bias.to(feats.device)

    def extra_state(self) -> dict[str, Any]:
        return {"counts": self.counts, "means": self.means, "scatter": self.scatter}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.counts = np.asarray(state["counts"], np.float64)
        self.means, self.scatter = (None if state[k] is None else np.asarray(state[k], np.float64)
                                    for k in ("means", "scatter"))
        self.weight = self.bias = None
        if self.means is not None:
            self._solve()
