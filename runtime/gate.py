"""The learn gate and the holdout split: pure functions, so what decides a swap is tested alone.

Why time blocks: live frames 33 ms apart are near duplicates, and the audio and IMU windows of
neighbouring frames share most of their samples (1 s windows, a new frame every 33 ms). A random
split puts near copies of every held-out sample into training and the gate sees accuracy the
robot will not have. So each label's samples are ordered by camera stamp, the *last* ``share``
of the label's capture time is held out as one contiguous block, and samples within
``guard_s`` before that block (whose windows overlap it) go to neither side. Samples without
stamps (dataset sources: independent draws) are split at random.

Why a separate old-task check set: accuracy on the replay buffer measures samples the candidate
has just trained on. The agent keeps a small held-out reservoir per class that training never
sees (the time-block holdouts of earlier tasks); ``decide`` compares the serving model and the
candidate on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    min_new_task_acc: float = 0.5  # held-out accuracy the new task must reach
    max_old_task_drop: float = 0.10  # largest accepted drop of old-task accuracy on the reservoir

    def __post_init__(self) -> None:
        for name in ("min_new_task_acc", "max_old_task_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"GateConfig.{name}={getattr(self, name)!r} must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class GateDecision:
    accepted: bool
    reasons: tuple[str, ...] = ()
    new_task_acc: float = 0.0
    old_acc_before: float | None = None  # serving model on the held-out reservoir (old classes)
    old_acc_after: float | None = None  # candidate on the same samples
    old_drop: float = 0.0

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def decide(*, new_task_acc: float, old_acc_before: float | None, old_acc_after: float | None,
           config: GateConfig) -> GateDecision:
    """Accept the candidate unless the new task is not learned or the old tasks dropped too much.

    ``old_acc_*`` are None when no old task has held-out samples (the first task)."""
    if not 0.0 <= new_task_acc <= 1.0 or np.isnan(new_task_acc):
        raise ValueError(f"new_task_acc={new_task_acc!r} must be in [0, 1]")
    if (old_acc_before is None) != (old_acc_after is None):
        raise ValueError("old_acc_before and old_acc_after must both be given or both be None")
    for name, acc in (("old_acc_before", old_acc_before), ("old_acc_after", old_acc_after)):
        if acc is not None and not 0.0 <= acc <= 1.0:  # NaN too: a NaN drop would pass the gate
            raise ValueError(f"{name}={acc!r} must be in [0, 1] or None")
    # rounded: accuracies are k/n fractions, and 0.8 - 0.7 = 0.10000000000000009 must not fail a 0.1 limit
    drop = 0.0 if old_acc_before is None or old_acc_after is None else \
        round(float(old_acc_before - old_acc_after), 9)
    reasons = []
    if new_task_acc < config.min_new_task_acc:
        reasons.append(f"new-task accuracy {new_task_acc:.3f} < {config.min_new_task_acc}")
    if drop > config.max_old_task_drop:
        reasons.append(f"old-task accuracy dropped {drop:.3f} > {config.max_old_task_drop} "
                       f"({old_acc_before:.3f} -> {old_acc_after:.3f} on held-out samples)")
    return GateDecision(accepted=not reasons, reasons=tuple(reasons), new_task_acc=float(new_task_acc),
                        old_acc_before=old_acc_before, old_acc_after=old_acc_after, old_drop=round(drop, 6))


@dataclass(frozen=True, kw_only=True)
class Split:
    """Boolean masks over the samples: train, held out, and dropped (the guard before a block)."""

    train: np.ndarray
    holdout: np.ndarray
    how: dict[str, str] = field(default_factory=dict)  # label -> "time-block" | "random"

    @property
    def dropped(self) -> np.ndarray:
        return ~(self.train | self.holdout)


def holdout_split(names: Sequence[str], stamps_ns: np.ndarray | Sequence[int], *, share: float = 0.2,
                  guard_s: float = 1.0, min_train: int = 3, seed: int = 0) -> Split:
    """Per label: the last ``share`` of its capture time held out (time-block), or a random
    ``share`` of its samples when any of them has no stamp (0). At least one sample is held
    out and ``min_train`` are trained on; the guard shrinks (down to none) to keep them."""
    names = np.asarray([str(n) for n in names])
    stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
    if stamps.shape != names.shape:
        raise ValueError(f"stamps_ns has {stamps.size} entries for {names.size} samples")
    if not 0.0 < share < 0.9:
        raise ValueError(f"share={share!r} must be in (0, 0.9)")
    if guard_s < 0:
        raise ValueError(f"guard_s={guard_s!r} must be >= 0")
    train = np.zeros(len(names), bool)
    hold = np.zeros(len(names), bool)
    how: dict[str, str] = {}
    rng = np.random.default_rng(seed)
    for label in dict.fromkeys(names.tolist()):
        idx = np.flatnonzero(names == label)
        if len(idx) < min_train + 1:
            raise ValueError(f"label {label!r} has {len(idx)} samples; need >= {min_train + 1} to hold one out")
        n_hold = min(max(1, int(round(len(idx) * share))), len(idx) - min_train)
        if (stamps[idx] == 0).any():
            perm = rng.permutation(idx)
            hold[perm[:n_hold]] = True
            train[perm[n_hold:]] = True
            how[label] = "random"
            continue
        order = idx[np.argsort(stamps[idx], kind="stable")]
        t = stamps[order]
        cut = t[0] + (t[-1] - t[0]) * (1.0 - share)
        n_hold = int(min(max(1, (t >= cut).sum()), len(order) - min_train))
        held = order[len(order) - n_hold:]
        start = stamps[held[0]]
        rest = order[: len(order) - n_hold]
        guard_ns = int(guard_s * 1e9)
        while guard_ns > 0 and (stamps[rest] < start - guard_ns).sum() < min_train:
            guard_ns //= 2
        keep = rest[stamps[rest] < start - guard_ns] if guard_ns > 0 else rest
        hold[held] = True
        train[keep] = True
        how[label] = "time-block"
    return Split(train=train, holdout=hold, how=how)
