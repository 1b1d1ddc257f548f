"""Temporal smoothing of the agent's predictions, with abstention ("unknown").

Why: one frame's softmax flickers between classes and is confident on things it never learned.
The label the robot acts on is therefore the average of the class probabilities over the last
``window_s`` seconds of stamps, taken only over the predictions the open-set check
(:mod:`training.openset`) called known, and it is "unknown" (index -1) when

- more than ``unknown_share`` of the window's entries were not known, or
- the averaged top probability is below ``abstain_below`` (no known entry at all counts as 0).

Stamps are the sensor's (ns): the window follows the data, not the wall clock, so a replayed
log smooths exactly as it did live. An entry older than the window, measured from the newest
stamp seen, is dropped; a stamp more than a window *behind* the newest (a sensor restart, a
rewound log) clears the window instead of being dropped forever. A change of the number of
classes (a new model) clears it too. numpy only: the serving process never imports torch.

    smoother = Smoother(window_s=0.5)
    out = smoother.update(stamp_ns, probs, known=bool(openset.is_known(taps, present)[0]))
    label = "unknown" if out.index < 0 else classes[out.index]
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

UNKNOWN = -1


@dataclass(frozen=True)
class Smoothed:
    """One smoothed answer: ``index`` (-1: unknown), ``confidence`` (averaged top probability of the
    window's known entries, 0.0 if none: reported even when abstaining), ``n`` (entries in the
    window), ``unknown_share`` (share of them that were not known)."""

    index: int
    confidence: float
    n: int
    unknown_share: float

    @property
    def is_unknown(self) -> bool:
        return self.index == UNKNOWN


class Smoother:
    """Window average of class probabilities over known entries; answers :data:`UNKNOWN` when unsure.

    ``window_s`` > 0: entries whose stamps lie within this of the newest stamp are kept (inclusive);
    ``abstain_below`` in [0, 1]: abstain when the averaged top probability is lower;
    ``unknown_share`` in [0, 1]: abstain when the share of not-known entries is higher;
    ``max_entries`` >= 1: a bound on the window (the oldest arrivals go first), so that a source
    with frozen stamps cannot grow it without end.
    """

    def __init__(self, *, window_s: float = 0.5, abstain_below: float = 0.5, unknown_share: float = 0.5,
                 max_entries: int = 1024) -> None:
        if isinstance(window_s, bool) or not isinstance(window_s, int | float) or not (0 < window_s < math.inf):
            raise ValueError(f"Smoother.window_s must be a finite number of seconds > 0, got {window_s!r}")
        for name, v in (("abstain_below", abstain_below), ("unknown_share", unknown_share)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not (0.0 <= v <= 1.0):
                raise ValueError(f"Smoother.{name} must be a number in [0, 1], got {v!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"Smoother.max_entries must be an int >= 1, got {max_entries!r}")
        self.window_s = float(window_s)
        self.window_ns = round(window_s * 1e9)
        self.abstain_below = float(abstain_below)
        self.unknown_share = float(unknown_share)
        self.max_entries = max_entries
        self._entries: deque[tuple[int, np.ndarray, bool]] = deque(maxlen=max_entries)
        self._newest: int | None = None
        self._classes: int | None = None

    def reset(self) -> None:
        """Forget the window (call it when the model, and so the class list, changes)."""
        self._entries.clear()
        self._newest = None
        self._classes = None

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, stamp_ns: int, probs: np.ndarray, known: bool) -> Smoothed:
        """Add one prediction (``probs``: (C,) class probabilities) and answer for the window it ends."""
        if isinstance(stamp_ns, bool) or not isinstance(stamp_ns, int | np.integer):
            raise ValueError(f"Smoother.update: stamp_ns must be an int (ns), got {stamp_ns!r}")
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 1 or p.size == 0 or not np.isfinite(p).all():
            raise ValueError(f"Smoother.update: probs must be a non-empty finite (C,) vector, got shape {p.shape}"
                             + ("" if p.ndim != 1 or p.size == 0 else " with non-finite values"))
        stamp = int(stamp_ns)
        if self._classes is not None and p.size != self._classes:
            log.info("smoother: %d classes now (was %d); window cleared", p.size, self._classes)
            self.reset()
        if self._newest is not None and stamp < self._newest - self.window_ns:
            log.info("smoother: stamp went back %.3f s (> window %.3f s); window cleared",
                     (self._newest - stamp) / 1e9, self.window_s)
            self.reset()
        self._classes = p.size
        self._newest = stamp if self._newest is None else max(self._newest, stamp)
        self._entries.append((stamp, p.copy(), bool(known)))
        oldest = self._newest - self.window_ns
        if any(s < oldest for s, _, _ in self._entries):
            self._entries = deque((e for e in self._entries if e[0] >= oldest), maxlen=self.max_entries)
        return self._answer()

    def _answer(self) -> Smoothed:
        n = len(self._entries)
        kept = [q for _, q, k in self._entries if k]
        share = (n - len(kept)) / n
        if kept:
            mean = np.mean(kept, axis=0)
            top = int(np.argmax(mean))
            confidence = float(mean[top])
        else:
            top, confidence = UNKNOWN, 0.0
        if share > self.unknown_share or confidence < self.abstain_below:
            top = UNKNOWN
        return Smoothed(index=top, confidence=confidence, n=n, unknown_share=share)

    def __repr__(self) -> str:
        return (f"Smoother(window_s={self.window_s}, abstain_below={self.abstain_below}, "
                f"unknown_share={self.unknown_share}, entries={len(self._entries)})")
