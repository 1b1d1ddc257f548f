"""What the dataset publishers show, and when: a class schedule with runtime overrides.

Why this module: the demo's streams (``demodata.publish``) follow a fixed class
schedule, but a scripted operator must be able to say "now show class c for S seconds", as a
person holding an object in front of the robot, after which the schedule resumes. Every
stream (camera, mic, IMU, truth) asks one :class:`Timeline` "which segment is shown at
offset t" (t = ns since the streamer's start, the offsets its stamps are made of), so they
all switch together and the truth labels are exact.

A segment's content is a function of its ``key`` and of the position from its ``origin_ns``
only, never of its length: :class:`SegmentTrack` builds a sample stream in fixed-size pieces
seeded per (segment key, piece index), so an override that later cuts a segment short (or
``resume`` cutting an override short) never changes a sample that was already sent, and a
base period interrupted by an override continues after it as if nothing had happened.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_SHOW_S = 3600.0  # longest override one request may ask for
BASE, SCENE = "base", "scene"  # sample pools: the schedule's and the overrides'


class ClassSchedule:
    """Deterministic class per dwell period: ``class_at(p)``."""

    def __init__(self, classes: list[int], order: str = "cycle", seed: int = 0) -> None:
        self.classes, self.order, self.seed = [int(c) for c in classes], order, seed

    def class_at(self, period: int) -> int:
        n = len(self.classes)
        cycle, i = divmod(period, n)
        if self.order == "shuffle":
            i = int(np.random.default_rng([self.seed, 7, cycle]).permutation(n)[i])
        return self.classes[i]


@dataclass(frozen=True, slots=True)
class Segment:
    """One stretch of the timeline: class ``class_id`` is shown during [start_ns, end_ns).

    ``key`` (``("p", period)`` for a base dwell period, ``("o", k)`` for the k-th override)
    seeds the content; ``origin_ns`` is where that content starts (the period's start even
    when an override clipped its beginning) and ``planned_ns`` the length it was planned
    with (dwell or requested duration). Neither changes when the segment is cut short.
    """

    start_ns: int
    end_ns: int
    class_id: int
    key: tuple[str, int]
    pool: str  # BASE | SCENE
    origin_ns: int
    planned_ns: int

    @property
    def override(self) -> bool:
        return self.key[0] == "o"


@dataclass(slots=True)
class _Override:
    start: int
    end: int
    class_id: int
    k: int
    planned: int
    pool: str = SCENE

    def segment(self) -> Segment:
        return Segment(self.start, self.end, self.class_id, ("o", self.k), self.pool, self.start, self.planned)


class Timeline:
    """The base schedule (one dwell period per class) plus overrides added at runtime.

    Thread-safe: a control thread adds overrides while the streaming loop reads. The loop
    calls :meth:`advance` with its offset before producing content; times before that floor
    may have been sent and are frozen: an override or a resume asked for an earlier time
    takes effect at the floor instead. Overrides win over the base schedule; a new override
    replaces any override still in force at its start (that one ends there) and any pending
    one it overlaps, so when it ends the base schedule resumes. Overrides that ended more
    than ``retain_s`` before the floor are forgotten (at most ``max_overrides`` are kept);
    ``segment`` then answers the base schedule for those old times.
    """

    def __init__(
        self, schedule: ClassSchedule, dwell_ns: int, *, retain_s: float = 600.0, max_overrides: int = 1024
    ) -> None:
        if dwell_ns <= 0:
            raise ValueError(f"dwell_ns={dwell_ns!r}: expected > 0")
        self.schedule, self.dwell_ns = schedule, int(dwell_ns)
        self.retain_ns, self.max_overrides = round(retain_s * 1e9), max_overrides
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Back to the bare schedule at offset 0 (a new run)."""
        with self._lock:
            self._ov: list[_Override] = []  # sorted by start, disjoint, non-empty
            self._starts: list[int] = []
            self._floor = 0
            self._next_k = 0

    @property
    def floor_ns(self) -> int:
        return self._floor

    def overrides(self) -> list[Segment]:
        """The stored overrides, in time order."""
        with self._lock:
            return [o.segment() for o in self._ov]

    def advance(self, now_ns: int) -> int:
        """Freeze the timeline before ``now_ns`` (content up to there may be sent); the floor."""
        with self._lock:
            self._floor = max(self._floor, int(now_ns))
            self._prune()
            return self._floor

    def segment(self, t_ns: int) -> Segment:
        """The segment shown at offset ``t_ns``."""
        t = int(t_ns)
        with self._lock:
            i = bisect.bisect_right(self._starts, t) - 1
            if i >= 0 and t < self._ov[i].end:
                return self._ov[i].segment()
            prev_end = self._ov[i].end if i >= 0 else None
            next_start = self._starts[i + 1] if i + 1 < len(self._starts) else None
        p = t // self.dwell_ns
        p0, p1 = p * self.dwell_ns, (p + 1) * self.dwell_ns
        start = p0 if prev_end is None else max(p0, prev_end)
        end = p1 if next_start is None else min(p1, next_start)
        return Segment(start, end, self.schedule.class_at(p), ("p", p), BASE, p0, self.dwell_ns)

    def show(self, class_id: int, seconds: float, at_ns: int, pool: str = SCENE) -> Segment:
        """Show ``class_id`` during [at, at + seconds), at = max(``at_ns``, floor); the override.
        ``pool``: which samples it shows (the scene's, or the schedule's: ``BASE``)."""
        if pool not in (BASE, SCENE):
            raise ValueError(f"pool={pool!r}: expected {BASE!r} or {SCENE!r}")
        dur = round(seconds * 1e9) if math.isfinite(seconds) else 0
        if not 0 < dur <= round(MAX_SHOW_S * 1e9):
            raise ValueError(f"seconds={seconds!r}: expected 0 < seconds <= {MAX_SHOW_S:g}")
        with self._lock:
            a = max(int(at_ns), self._floor)
            b = a + dur
            self._prune()
            if len(self._ov) >= self.max_overrides:
                raise ValueError(f"{len(self._ov)} overrides pending: at most {self.max_overrides}")
            self._cut(a, b)
            new = _Override(a, b, int(class_id), self._next_k, dur, pool)
            self._next_k += 1
            i = bisect.bisect_left(self._starts, a)
            self._ov.insert(i, new)
            self._starts.insert(i, a)
            return new.segment()

    def resume(self, now_ns: int) -> Segment | None:
        """Back to the base schedule from max(``now_ns``, floor): ends the override in force
        then (returned, cut) and drops pending ones."""
        with self._lock:
            n = max(int(now_ns), self._floor)
            i = bisect.bisect_right(self._starts, n) - 1
            active = self._ov[i] if i >= 0 and n < self._ov[i].end else None
            self._cut(n, None)  # cuts ``active`` in place (or drops it when it starts at n)
            return active.segment() if active is not None and active.start < n else None

    def _cut(self, a: int, b: int | None) -> None:
        """Clear [a, b) (b None: to the end): an override running at ``a`` ends there, those
        starting inside are dropped. Lock held."""
        keep = []
        for o in self._ov:
            if o.end > a and (b is None or o.start < b):
                if o.start >= a:
                    continue
                o.end = a
            keep.append(o)
        self._ov, self._starts = keep, [o.start for o in keep]

    def _prune(self) -> None:
        """Forget overrides that ended long ago, then the oldest ended ones beyond
        ``max_overrides - 1`` (ended ones come first: disjoint and sorted); lock held."""
        if not self._ov:
            return
        horizon = self._floor - self.retain_ns
        if self._ov[0].end > horizon and len(self._ov) < self.max_overrides:
            return
        ov = [o for o in self._ov if o.end > horizon]
        n_ended = sum(o.end <= self._floor for o in ov)
        ov = ov[min(n_ended, max(0, len(ov) - self.max_overrides + 1)) :]
        self._ov, self._starts = ov, [o.start for o in ov]


class SegmentTrack:
    """A sample stream (mic PCM, IMU rows) over a timeline, built in fixed-size pieces.

    Sample ``n`` is taken at offset ``n * 1e9 // rate`` ns and belongs to the segment shown
    then; its position in that segment's content is ``n - first sample at origin + phase``,
    split into piece ``q`` and row ``r`` of ``make_piece(segment, q)`` (``piece_len`` rows,
    seeded by the segment key and ``q``). ``phase(segment)`` (default 0) shifts where the
    content starts, from ``planned_ns``: the mic keeps the middle of a word when a segment
    is planned shorter than a clip. Reading sample ``n`` is deterministic given the timeline.
    """

    def __init__(
        self,
        rate: int,
        timeline: Timeline,
        piece_len: int,
        make_piece: Callable[[Segment, int], np.ndarray],
        *,
        phase: Callable[[Segment], int] | None = None,
        cache: int = 16,
    ) -> None:
        self.rate, self.timeline, self.piece_len = int(rate), timeline, int(piece_len)
        self.make_piece, self.phase = make_piece, phase or (lambda seg: 0)
        self._cache: dict[tuple, np.ndarray] = {}
        self._cache_size = cache

    def time_of(self, n: int) -> int:
        """Offset (ns) of sample ``n``."""
        return n * 10**9 // self.rate

    def sample_at(self, t_ns: int) -> int:
        """The first sample taken at or after offset ``t_ns``."""
        return -((-t_ns * self.rate) // 10**9)

    def piece(self, seg: Segment, q: int) -> np.ndarray:
        key = (seg.key, seg.class_id, q)
        if key not in self._cache:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            out = self.make_piece(seg, q)
            if len(out) != self.piece_len:
                raise ValueError(f"make_piece gave {len(out)} rows: expected {self.piece_len}")
            self._cache[key] = out
        return self._cache[key]

    def read(self, n0: int, count: int) -> np.ndarray:
        """Samples n0 .. n0 + count - 1."""
        parts, n, stop = [], n0, n0 + count
        while n < stop:
            seg = self.timeline.segment(self.time_of(n))
            j = n - self.sample_at(seg.origin_ns) + self.phase(seg)
            q, r = divmod(j, self.piece_len)
            take = min(stop - n, self.sample_at(seg.end_ns) - n, self.piece_len - r)
            parts.append(self.piece(seg, q)[r : r + take])
            n += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
