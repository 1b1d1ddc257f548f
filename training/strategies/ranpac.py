"""RanPAC (McDonnell et al., NeurIPS 2023) on frozen taps: random ReLU projection + ridge classifier.

Why: a closed-form classifier over a fixed random expansion of frozen features; it never trains
by gradient, cannot forget and does not depend on the order tasks arrive in (G and C are sums).

Features ``f`` are :func:`training.strategies.ncm.ncm_features` (each tap L2-normalised, all
modalities concatenated, an absent modality zeros); ``h = ReLU(f W_rand)`` with ``W_rand`` a
fixed Gaussian (D, M) matrix drawn from ``config.seed`` (M = params["proj_dim"], 2048: the
paper uses 10,000; 2048 keeps one task's Gram update and the lambda search to about a second on
two cores). Accumulated over every task: ``G = sum h h^T``, ``C = sum h y^T`` (one-hot), and
``W_o = (G + lambda I)^-1 C``; logits ``h W_o``, a class not seen yet ``UNSEEN`` (-1e4).

lambda, per task, as in the authors' code (``optimise_ridge_parameter``): the current task's
samples split 80/20 (we shuffle with the seed first, the code takes them in order), ridge fit on
the 80 % for each lambda in 10^-8 .. 10^8 (decades), MSE of the one-hot targets on the 20 %,
the best lambda then used on the full G, C. One eigendecomposition serves the whole grid (of
the n x n kernel matrix when the split has fewer samples than M: the same fit, far cheaper).
``params["ridge"] > 0`` fixes lambda instead (tests, ablations).

Difference from the paper: no first-session parameter-efficient adaptation of the backbone
(phase 1 of RanPAC); our backbones are frozen by design, so this is RanPAC's phase 2 only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.registry import register
from training.strategies.base import Strategy
from training.strategies.ncm import ncm_features
from training.taskdata import TaskData

UNSEEN = -1e4
RIDGES = 10.0 ** np.arange(-8, 9)


def best_ridge(h: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
    """lambda of ``RIDGES`` with the least held-out MSE (80/20 split of ``h``, ``y`` one-hot)."""
    n = len(h)
    n_fit = int(0.8 * n)
    if n_fit < 1 or n_fit == n:
        return 1.0  # too few samples to hold any out (a dry run): a neutral choice
    order = rng.permutation(n)
    hf, hv, yf, yv = h[order[:n_fit]], h[order[n_fit:]], y[order[:n_fit]], y[order[n_fit:]]
    if n_fit < h.shape[1]:  # dual form (push-through identity): an n_fit x n_fit eigenproblem, not M x M
        s, u = np.linalg.eigh(hf @ hf.T)
        left, right = hv @ hf.T @ u, u.T @ yf
    else:
        s, u = np.linalg.eigh(hf.T @ hf)
        left, right = hv @ u, u.T @ (hf.T @ yf)
    s = np.maximum(s, 0.0)
    losses = [float(np.mean((left @ (right / (s + lam)[:, None]) - yv) ** 2)) for lam in RIDGES]
    return float(RIDGES[int(np.argmin(losses))])


@register("ranpac")
class RanPAC(Strategy):
    trains = False
    defaults = {"proj_dim": 2048, "ridge": 0.0}

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        d = sum(sum(ds) for ds in self.model.config.tap_dims.values())
        gen = torch.Generator().manual_seed(int(self.config.seed))
        self.w_rand: Tensor = torch.randn(d, int(self.p["proj_dim"]), generator=gen)  # (D, M), fixed
        # statistics as numpy float64 (kept out of the ONNX predictor, which registers tensors)
        self.gram: np.ndarray | None = None  # (M, M)
        self.cross: np.ndarray | None = None  # (M, C)
        self.counts: np.ndarray = np.zeros(0)
        self.ridges: list[float] = []  # lambda chosen per task
        self.w_out: Tensor | None = None  # (M, C) float32
        self.bias: Tensor | None = None  # (C,) 0 for seen classes, UNSEEN otherwise

    def hidden(self, taps: dict[str, list[Tensor]], present: Tensor) -> Tensor:
        feats = ncm_features(taps, present)
        return F.relu(feats @ self.w_rand.to(feats.device))

    def end_task(self, data: TaskData) -> None:
        taps = {m: [torch.from_numpy(np.asarray(x, np.float32)) for x in lv] for m, lv in data.taps.items()}
        with torch.no_grad():
            h = self.hidden(taps, torch.from_numpy(data.present)).double().numpy()
        c, m = self.model.num_classes, h.shape[1]
        y = np.eye(c)[data.labels]
        cross, counts = np.zeros((m, c)), np.zeros(c)
        if self.cross is not None:
            cross[:, : self.cross.shape[1]], counts[: len(self.counts)] = self.cross, self.counts
        self.gram = (np.zeros((m, m)) if self.gram is None else self.gram) + h.T @ h
        self.cross, self.counts = cross + h.T @ y, counts + y.sum(0)
        fixed = float(self.p["ridge"])
        self.ridges.append(fixed if fixed > 0 else best_ridge(h, y, np.random.default_rng(self.config.seed)))
        self._solve()

    def _solve(self) -> None:
        assert self.gram is not None and self.cross is not None
        g = torch.from_numpy(self.gram) + self.ridges[-1] * torch.eye(self.gram.shape[0], dtype=torch.float64)
        self.w_out = torch.cholesky_solve(torch.from_numpy(self.cross), torch.linalg.cholesky(g)).float()
        self.bias = torch.where(torch.from_numpy(self.counts > 0), 0.0, UNSEEN).float()

    @torch.no_grad()
    def predict(self, taps: dict[str, list[Tensor]], present: Tensor) -> Tensor:
        h = self.hidden(taps, present)
        if self.w_out is None or self.bias is None:
            return torch.zeros(h.shape[0], 0, device=h.device)
        return h @ self.w_out.to(h.device) + self.bias.to(h.device)

    def extra_state(self) -> dict[str, Any]:
        return {"w_rand": self.w_rand, "gram": self.gram, "cross": self.cross, "counts": self.counts,
                "ridges": list(self.ridges)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.w_rand = torch.as_tensor(state["w_rand"], dtype=torch.float32)
        self.gram, self.cross = (None if state[k] is None else np.asarray(state[k], np.float64)
                                 for k in ("gram", "cross"))
        self.counts = np.asarray(state["counts"], np.float64)
        self.ridges = [float(r) for r in state["ridges"]]
        self.w_out = self.bias = None
        if self.gram is not None:
            self._solve()
