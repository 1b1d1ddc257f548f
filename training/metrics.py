"""Continual-learning metrics over an accuracy matrix R, R[i][j] = accuracy on task j after learning task i.

With T tasks (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"; Chaudhry et al. 2018, "Riemannian
Walk"):

- ACC = 1/T sum_j R[T-1][j]                                   (final average accuracy)
- BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])             (negative = forgetting)
- FWT = 1/(T-1) sum_{j>=1} (R[j-1][j] - b_j)                  b_j: accuracy of a randomly
                                                              initialised model on task j
- forgetting = 1/(T-1) sum_{j<T-1} max_{l in [j, T-2]} (R[l][j] - R[T-1][j])

Accuracies are fractions in [0, 1]. With a single task BWT, FWT and forgetting are 0 by convention.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def _square(r: Any) -> np.ndarray:
    m = np.asarray(r, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty T x T array, got shape {m.shape}")
    return m


def average_accuracy(r: Any) -> float:
    m = _square(r)
    return float(m[-1].mean())


def backward_transfer(r: Any) -> float:
    m = _square(r)
    t = m.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([m[-1, j] - m[j, j] for j in range(t - 1)]))


def forward_transfer(r: Any, b: Sequence[float]) -> float:
    m = _square(r)
    t = m.shape[0]
    base = np.asarray(b, dtype=np.float64)
    if base.shape != (t,):
        raise ValueError(f"b must hold one random-init accuracy per task ({t}), got shape {base.shape}")
    if t < 2:
        return 0.0
    return float(np.mean([m[j - 1, j] - base[j] for j in range(1, t)]))


def average_forgetting(r: Any) -> float:
    m = _square(r)
    t = m.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([m[j : t - 1, j].max() - m[t - 1, j] for j in range(t - 1)]))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass(kw_only=True)
class ContinualMetrics:
    """Everything one run of one strategy on one scenario reports."""

    matrix: list[list[float]]
    random_init: list[float]
    acc: float
    bwt: float
    fwt: float
    forgetting: float
    task_seconds: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0
    buffer_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(r: Any, b: Sequence[float], *, task_seconds: Sequence[float] = (), peak_rss: int = 0,
              buffer_bytes: int = 0) -> ContinualMetrics:
    m = _square(r)
    return ContinualMetrics(matrix=m.tolist(), random_init=[float(x) for x in b], acc=average_accuracy(m),
                            bwt=backward_transfer(m), fwt=forward_transfer(m, b), forgetting=average_forgetting(m),
                            task_seconds=[float(s) for s in task_seconds], peak_rss_bytes=int(peak_rss),
                            buffer_bytes=int(buffer_bytes))


# Two-sided 95 % Student t critical values by degrees of freedom (df > 30: the normal 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student t, sample std); nan for
    fewer than 2 values: one seed says nothing about the spread."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan")
    t = _T95[len(v) - 2] if len(v) - 1 <= len(_T95) else 1.96
    return float(t * v.std(ddof=1) / math.sqrt(len(v)))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of the per-seed differences a - b with its 95 % interval; ``excludes_zero`` is the
    test this project uses for "A beats B" (a difference inside the interval is no difference)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = ci95(d)
    mean = float(d.mean()) if len(d) else float("nan")
    return {"mean": mean, "ci95": half, "low": mean - half, "high": mean + half,
            "excludes_zero": bool(math.isfinite(half) and (mean - half > 0 or mean + half < 0)), "n": int(len(d))}


SCALARS = ("acc", "bwt", "fwt", "forgetting", "mean_task_seconds", "peak_rss_bytes", "buffer_bytes")


def aggregate(runs: Sequence[ContinualMetrics]) -> dict[str, Any]:
    """Mean, (population) std, 95 % interval half-width and the per-seed values of every scalar
    metric over seeds, plus the mean accuracy matrix."""
    if not runs:
        raise ValueError("aggregate needs at least one run")
    out: dict[str, Any] = {"seeds": len(runs)}
    for key in SCALARS:
        vals = [float(np.mean(r.task_seconds)) if key == "mean_task_seconds" else float(getattr(r, key))
                for r in runs]
        out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "ci95": ci95(vals),
                    "per_seed": vals}
    out["matrix_mean"] = np.mean([r.matrix for r in runs], axis=0).tolist()
    out["random_init_mean"] = np.mean([r.random_init for r in runs], axis=0).tolist()
    return out


def fmt_mean_std(d: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean +- half-width of the 95 % interval`` (the std where the interval is undefined)."""
    if not math.isfinite(d["mean"]):
        return "n/a"
    spread = d.get("ci95", float("nan"))
    spread = spread if math.isfinite(spread) else d["std"]
    return f"{d['mean'] * scale:.{digits}f} +- {spread * scale:.{digits}f}"
