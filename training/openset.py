"""Open-set check over backbone taps: whether a sample lies near a class the learner was taught.

Why: the classifier's softmax is confident far from every learned class (camera noise frames
come out "trouser" at 0.999), so the agent needs a second, independent opinion that says
"none of these". This one is deliberately simple and numpy-only (the serving process never
imports torch):

- every sample's taps of one modality are embedded as a unit vector (:func:`embed`: each level
  L2-normalised, so a loud shallow level cannot drown the others, concatenated, / sqrt(L));
- each class has one prototype per modality, the unit-normalised mean embedding of its
  training samples (in practice the replay buffer's) in which that modality is present;
- a sample's distance in a modality is ``1 - cos`` to the nearest known prototype;
- a modality's threshold is ``margin * quantile`` of the distances of held-out samples of
  known classes (not the ones the prototypes were fitted on: those sit closer than new data);
- the novelty score combines ``distance / threshold`` over the present, calibrated modalities
  (their mean by default, or the largest: ``rule``), so ``score <= 1`` reads "near a learned
  class" (:meth:`OpenSet.is_known`).

A modality that is absent (``present`` False) is ignored: its taps are zeros by convention.
A present modality whose taps hold nan/inf is maximally novel (score inf), never "known".
A sample none of whose present modalities is calibrated scores 0.0: there is no evidence
against it, and the classifier decides alone.

    openset = OpenSet.fit(batch.taps, batch.present, batch.labels, num_classes, buffer.modalities)
    openset.calibrate(held.taps, held.present, held.labels)
    known = openset.is_known(taps, present)        # (N,) bool
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
RULES = ("mean", "max")
MIN_THRESHOLD = 1e-6  # a threshold never drops below this (calibration data identical to the prototypes)


def embed(levels: list[np.ndarray]) -> np.ndarray:
    """(N, sum(dims)) float32 rows: each level L2-normalised (a zero row stays zero), concatenated, / sqrt(L).

    Rows whose levels are all non-zero are unit vectors; a positive scale of any level of any
    row leaves its embedding unchanged. A row holding nan or inf embeds as nan.
    """
    if not isinstance(levels, list | tuple) or not levels:
        raise ValueError(f"embed needs a non-empty list of (N, dim) tap arrays, got {type(levels).__name__}")
    arrays = [np.asarray(x) for x in levels]
    n = arrays[0].shape[0] if arrays[0].ndim == 2 else None
    for b, x in enumerate(arrays):
        if x.ndim != 2 or x.shape[0] != n:
            want = "a 2-D (N, dim) array" if n is None else f"({n}, dim) like level 0"
            raise ValueError(f"embed: level {b} must be {want}, got shape {x.shape}")
    parts, finite = [], np.ones(n, bool)
    for level in arrays:
        ok = np.isfinite(level).all(axis=1)
        finite &= ok
        x = np.where(ok[:, None], level.astype(np.float64), 0.0)
        # divide by the row's max first: the norm of a huge or tiny row neither overflows nor underflows
        amax = np.abs(x).max(axis=1, keepdims=True) if x.shape[1] else np.zeros((n, 1))
        y = x / np.where(amax > 0, amax, 1.0)
        norm = np.linalg.norm(y, axis=1, keepdims=True)
        parts.append(y / np.where(norm > 0, norm, 1.0))
    out = np.concatenate(parts, axis=1) / math.sqrt(len(arrays))
    out[~finite] = np.nan
    return out.astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


@dataclass
class OpenSet:
    """Per-modality class prototypes, which classes each modality knows, and calibrated thresholds.

    ``modalities``: names in the order of ``present``'s columns; ``dims``: tap dims per modality
    (what every input must match); ``prototypes[m]``: (C, sum(dims[m])) float32 unit rows (zero
    for a class ``m`` does not know); ``known[m]``: (C,) bool; ``thresholds[m]``: distance
    threshold or None (not calibrated: ``m`` does not count in :meth:`score`);
    ``calibration_samples[m]``: held-out samples the threshold came from.
    """

    modalities: list[str]
    dims: dict[str, list[int]]
    prototypes: dict[str, np.ndarray]
    known: dict[str, np.ndarray]
    thresholds: dict[str, float | None]
    calibration_samples: dict[str, int] = field(default_factory=dict)
    rule: str = "mean"  # how present modalities combine: "mean" or "max" of distance / threshold

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"OpenSet.rule must be one of {RULES}, got {self.rule!r}")
        self.modalities = [str(m) for m in self.modalities]
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"OpenSet.modalities must be distinct names, at least one, got {self.modalities}")
        for name in ("dims", "prototypes", "known", "thresholds"):
            keys = list(getattr(self, name))
            if keys != self.modalities:
                raise ValueError(f"OpenSet.{name} names {keys}, expected {self.modalities} in that order")
        self.dims = {m: [int(d) for d in self.dims[m]] for m in self.modalities}
        self.prototypes = {m: np.asarray(p, np.float32) for m, p in self.prototypes.items()}
        self.known = {m: np.asarray(k, bool) for m, k in self.known.items()}
        c = self.num_classes
        for m in self.modalities:
            if not self.dims[m] or min(self.dims[m]) < 0:
                raise ValueError(f"OpenSet.dims[{m!r}] must list tap dims >= 0, got {self.dims[m]}")
            if self.prototypes[m].shape != (c, sum(self.dims[m])):
                raise ValueError(f"OpenSet.prototypes[{m!r}] must be ({c}, {sum(self.dims[m])}), "
                                 f"got {self.prototypes[m].shape}")
            if self.known[m].shape != (c,):
                raise ValueError(f"OpenSet.known[{m!r}] must be ({c},), got {self.known[m].shape}")
            t = self.thresholds[m]
            if t is not None:
                if isinstance(t, bool) or not isinstance(t, int | float | np.floating) or not (0 < float(t) < math.inf):
                    raise ValueError(f"OpenSet.thresholds[{m!r}] must be a finite float > 0 or None, got {t!r}")
                self.thresholds[m] = float(t)
        self.calibration_samples = {str(m): int(n) for m, n in self.calibration_samples.items()}

    @property
    def num_classes(self) -> int:
        return int(self.prototypes[self.modalities[0]].shape[0])

    # ---- input checks -------------------------------------------------------------------------
    @staticmethod
    def _check_taps(taps: dict[str, list[np.ndarray]], present: np.ndarray, modalities: list[str],
                    dims: dict[str, list[int]] | None) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
        """(taps as arrays, present (N, K) bool); ValueError naming what does not match."""
        if not isinstance(taps, dict):
            raise ValueError(f"taps must be a dict modality -> list of (N, dim) arrays, got {type(taps).__name__}")
        if list(taps) != list(modalities):
            raise ValueError(f"taps name modalities {list(taps)}, expected {list(modalities)} in that order")
        present = np.asarray(present)
        if present.dtype != bool:
            raise ValueError(f"present must be a bool array, got dtype {present.dtype}")
        n = None
        out: dict[str, list[np.ndarray]] = {}
        for m, levels in taps.items():
            if not isinstance(levels, list | tuple) or not levels:
                raise ValueError(f"taps[{m!r}] must be a non-empty list of (N, dim) arrays")
            want = dims[m] if dims is not None else None
            if want is not None and len(levels) != len(want):
                raise ValueError(f"taps[{m!r}] has {len(levels)} levels, expected {len(want)} (dims {want})")
            arrs = []
            for b, level in enumerate(levels):
                x = np.asarray(level)
                if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
                    raise ValueError(f"taps[{m!r}][{b}] must be a numeric (N, dim) array, got {x.shape} {x.dtype}")
                if want is not None and x.shape[1] != want[b]:
                    raise ValueError(f"taps[{m!r}][{b}] has dim {x.shape[1]}, expected {want[b]} (dims {want})")
                n = x.shape[0] if n is None else n
                if x.shape[0] != n:
                    raise ValueError(f"taps[{m!r}][{b}] has {x.shape[0]} rows, other taps have {n}")
                arrs.append(x)
            out[m] = arrs
        if present.shape != (n, len(modalities)):
            raise ValueError(f"present must be ({n}, {len(modalities)}) for modalities {list(modalities)}, "
                             f"got {present.shape}")
        return out, present

    @staticmethod
    def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be ({n},) integers, got {labels.shape} {labels.dtype}")
        if n and labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        return labels.astype(np.int64)

    # ---- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, taps: dict[str, list[np.ndarray]], present: np.ndarray, labels: np.ndarray, num_classes: int,
            modalities: list[str]) -> OpenSet:
        """Prototypes of every class and modality from training samples (no thresholds yet: :meth:`calibrate`)."""
        modalities = list(modalities)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
            raise ValueError(f"OpenSet.fit: num_classes must be an int >= 1, got {num_classes!r}")
        c = int(num_classes)
        taps, present = cls._check_taps(taps, present, modalities, None)
        labels = cls._check_labels(labels, len(present))
        if len(labels) and labels.max() >= c:
            raise ValueError(f"OpenSet.fit: labels must be < num_classes={c}, got {int(labels.max())}")
        dims = {m: [int(x.shape[1]) for x in levels] for m, levels in taps.items()}
        protos, known = {}, {}
        for k, m in enumerate(modalities):
            rows = present[:, k]
            e = embed(taps[m]).astype(np.float64)[rows]
            if not np.isfinite(e).all():
                raise ValueError(f"OpenSet.fit: taps[{m!r}] hold non-finite values in present rows")
            onehot = np.zeros((len(e), c))
            onehot[np.arange(len(e)), labels[rows]] = 1.0
            sums = onehot.T @ e
            known[m] = np.linalg.norm(sums, axis=1) > 0
            protos[m] = _unit_rows(sums).astype(np.float32)
        out = cls(modalities=modalities, dims=dims, prototypes=protos, known=known,
                  thresholds={m: None for m in modalities})
        log.debug("open set fitted: %s", {m: int(known[m].sum()) for m in modalities})
        return out

    def distances(self, taps: dict[str, list[np.ndarray]], present: np.ndarray) -> np.ndarray:
        """(N, K) ``1 - cos`` to the nearest known prototype of each modality, in [0, 2].

        nan where the modality is absent or knows no class; inf where a present modality's taps
        are not finite.
        """
        taps, present = self._check_taps(taps, present, self.modalities, self.dims)
        out = np.full(present.shape, np.nan)
        for k, m in enumerate(self.modalities):
            rows = present[:, k]
            if not rows.any() or not self.known[m].any():
                continue
            e = embed([x[rows] for x in taps[m]]).astype(np.float64)
            cos = e @ self.prototypes[m][self.known[m]].astype(np.float64).T
            d = np.clip(1.0 - cos.max(axis=1), 0.0, 2.0)
            out[rows, k] = np.where(np.isfinite(e).all(axis=1), d, np.inf)
        return out

    def calibrate(self, taps: dict[str, list[np.ndarray]], present: np.ndarray, labels: np.ndarray, *,
                  quantile: float = 0.99, margin: float = 1.25, min_samples: int = 10) -> OpenSet:
        """Set each modality's threshold from held-out samples of known classes; returns ``self``.

        threshold = ``margin`` * ``quantile`` of their distances; None for a modality with fewer than
        ``min_samples`` such samples (it then does not count in :meth:`score`). Samples of classes
        a modality does not know are left out. The samples must not be the ones the prototypes
        were fitted on (those sit closer than new data: the threshold would come out too tight).
        """
        if not (0.0 < quantile <= 1.0):
            raise ValueError(f"OpenSet.calibrate: quantile must be in (0, 1], got {quantile!r}")
        if not (0.0 < margin < math.inf):
            raise ValueError(f"OpenSet.calibrate: margin must be a finite float > 0, got {margin!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int | np.integer) or min_samples < 1:
            raise ValueError(f"OpenSet.calibrate: min_samples must be an int >= 1, got {min_samples!r}")
        d = self.distances(taps, present)
        labels = self._check_labels(labels, len(d))
        in_range = labels < self.num_classes
        clipped = np.where(in_range, labels, 0)
        thresholds: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        for k, m in enumerate(self.modalities):
            rows = np.asarray(present)[:, k] & in_range & self.known[m][clipped]
            dm = d[rows, k]
            if not np.isfinite(dm).all():
                raise ValueError(f"OpenSet.calibrate: taps[{m!r}] hold non-finite values in present rows")
            counts[m] = int(len(dm))
            if len(dm) < min_samples:
                thresholds[m] = None
                log.info("open set: %s not calibrated (%d held-out samples < min_samples=%d)", m, len(dm), min_samples)
                continue
            thresholds[m] = max(float(margin * np.quantile(dm, quantile)), MIN_THRESHOLD)
            log.info("open set: %s threshold %.4f from %d held-out samples (q%.3g x %.3g)", m,
                     thresholds[m], len(dm), quantile, margin)
        self.thresholds, self.calibration_samples = thresholds, counts  # all or nothing
        return self

    # ---- serving ------------------------------------------------------------------------------
    def score(self, taps: dict[str, list[np.ndarray]], present: np.ndarray) -> np.ndarray:
        """(N,) novelty: the mean (``rule="max"``: the max) over present calibrated modalities of
        distance / threshold; 0.0 where there is none.

        Why the mean by default: an unfamiliar voice or motion recording of a learned class moves
        one modality past its threshold while the others stay close (live, with other speakers
        than at teaching time, "max" called 14-33 % of learned-class frames unknown); a sample
        far from every class in the modalities present - noise frames, a new object in every
        sensor - still scores far above 1, and a camera-only sample is judged by the camera alone.
        """
        d = self.distances(taps, present)
        thr = np.array([np.nan if self.thresholds[m] is None else self.thresholds[m] for m in self.modalities])
        ratio = d / thr[None, :]
        if not ratio.shape[1]:
            return np.zeros(len(d))
        used = ~np.isnan(ratio)
        if self.rule == "max":
            out = np.where(used, ratio, -np.inf).max(axis=1)
        else:
            with np.errstate(invalid="ignore"):
                out = np.where(used, ratio, 0.0).sum(axis=1) / used.sum(axis=1)
        return np.where(used.any(axis=1), out, 0.0)

    def is_known(self, taps: dict[str, list[np.ndarray]], present: np.ndarray) -> np.ndarray:
        """(N,) bool: ``score <= 1`` (near a learned class, or no calibrated modality present)."""
        return self.score(taps, present) <= 1.0

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON values and numpy arrays only (a checkpoint writes the arrays as .npy, the rest as JSON)."""
        return {"format": FORMAT, "modalities": list(self.modalities),
                "dims": {m: list(d) for m, d in self.dims.items()},
                "prototypes": {m: p.copy() for m, p in self.prototypes.items()},
                "known": {m: k.copy() for m, k in self.known.items()},
                "thresholds": dict(self.thresholds), "calibration_samples": dict(self.calibration_samples),
                "rule": self.rule}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> OpenSet:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"open set state format {got!r}, expected {FORMAT}")
        try:
            return cls(modalities=list(state["modalities"]), dims=dict(state["dims"]),
                       prototypes={m: np.array(p) for m, p in state["prototypes"].items()},
                       known={m: np.array(k) for m, k in state["known"].items()},
                       thresholds=dict(state["thresholds"]),
                       calibration_samples=dict(state.get("calibration_samples", {})),
                       rule=str(state.get("rule", "max")))
        except KeyError as exc:
            raise ValueError(f"open set state lacks {exc}") from None

    def __repr__(self) -> str:
        parts = [f"{m}: {int(self.known[m].sum())}/{self.num_classes} classes, threshold "
                 f"{'-' if self.thresholds[m] is None else format(self.thresholds[m], '.4f')}" for m in self.modalities]
        return f"OpenSet({'; '.join(parts)})"
