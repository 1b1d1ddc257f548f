"""Approximate time synchronisation of several topics, as ROS 2 message_filters does it.

One queue per topic, each sorted by ``stamp_ns`` and bounded by ``queue_size``. Whenever
every queue holds a message, the *pivot* is the oldest head:

- if the newest head is more than ``slop_ns`` after it, the pivot can never be matched
  (every other message of that topic is later still): it is dropped as unmatched;
- if the pivot's own successor is already queued and would make a tighter set with the
  other heads, the pivot is stale (superseded): it is dropped as unmatched;
- otherwise the heads form a set (all stamps within ``slop_ns``, inclusive) and are emitted.

Sets come out oldest first and each message is used at most once. Memory is bounded: when a
queue overflows its oldest message is dropped and counted as unmatched. Not thread-safe:
call ``add`` from one thread (the receive loop).

    sync = ApproximateTimeSynchronizer(["camera", "imu"], queue_size=10, slop_ns=20_000_000)
    for matched in sync.add("camera", msg):
        process(matched["camera"], matched["imu"])
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from sensors.wire import Message


@dataclass(frozen=True, slots=True)
class SyncStats:
    matched: int
    unmatched: dict[str, int]


class ApproximateTimeSynchronizer:
    def __init__(self, topics: Sequence[str], *, queue_size: int = 10, slop_ns: int = 50_000_000) -> None:
        topics = list(topics)
        if len(topics) < 2:
            raise ValueError(f"need at least 2 topics to synchronise, got {topics!r}")
        if len(set(topics)) != len(topics):
            raise ValueError(f"topics must be distinct, got {topics!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if slop_ns < 0:
            raise ValueError(f"slop_ns must be >= 0, got {slop_ns}")
        self.topics = topics
        self.queue_size = queue_size
        self.slop_ns = int(slop_ns)
        # Per topic: stamps and messages in stamp order (parallel lists keep bisect simple).
        self._stamps: dict[str, list[int]] = {t: [] for t in topics}
        self._msgs: dict[str, list[Message]] = {t: [] for t in topics}
        self._matched = 0
        self._unmatched: dict[str, int] = dict.fromkeys(topics, 0)

    def add(self, topic: str, msg: Message) -> list[dict[str, Message]]:
        """Queue ``msg``; return the sets it completes (oldest first, possibly none)."""
        if topic not in self._stamps:
            raise ValueError(f"unknown topic {topic!r}; this synchroniser has {self.topics}")
        stamps, msgs = self._stamps[topic], self._msgs[topic]
        i = bisect.bisect_right(stamps, msg.stamp_ns)
        stamps.insert(i, msg.stamp_ns)
        msgs.insert(i, msg)
        if len(stamps) > self.queue_size:
            self._drop_head(topic)
        return self._match()

    def _drop_head(self, topic: str) -> None:
        del self._stamps[topic][0]
        del self._msgs[topic][0]
        self._unmatched[topic] += 1

    def _match(self) -> list[dict[str, Message]]:
        out: list[dict[str, Message]] = []
        while all(self._stamps[t] for t in self.topics):
            heads = {t: self._stamps[t][0] for t in self.topics}
            pivot = min(self.topics, key=heads.__getitem__)
            lo, hi = heads[pivot], max(heads.values())
            if hi - lo > self.slop_ns:
                self._drop_head(pivot)
                continue
            pivot_queue = self._stamps[pivot]
            if len(pivot_queue) > 1:
                nxt = pivot_queue[1]
                others = [s for t, s in heads.items() if t != pivot]
                if max(hi, nxt) - min(*others, nxt) < hi - lo:
                    self._drop_head(pivot)
                    continue
            out.append({t: self._msgs[t][0] for t in self.topics})
            for t in self.topics:
                del self._stamps[t][0]
                del self._msgs[t][0]
            self._matched += 1
        return out

    def queued(self) -> dict[str, int]:
        """Messages waiting per topic (each <= queue_size)."""
        return {t: len(s) for t, s in self._stamps.items()}

    @property
    def stats(self) -> SyncStats:
        return SyncStats(matched=self._matched, unmatched=dict(self._unmatched))
