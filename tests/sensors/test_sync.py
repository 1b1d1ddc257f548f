"""ApproximateTimeSynchronizer: matching rules, memory bounds, and properties over arbitrary
interleavings (sets always within slop, each message used once, nothing lost uncounted)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sensors.sync import ApproximateTimeSynchronizer, SyncStats
from sensors.wire import Audio

MS = 1_000_000


def _m(stamp_ns: int) -> Audio:
    return Audio(data=np.zeros((1, 1), np.int16), stamp_ns=stamp_ns)


def test_equal_stamps_match_at_once() -> None:
    sync = ApproximateTimeSynchronizer(["camera", "mic"], slop_ns=10 * MS)
    cam = _m(100 * MS)
    assert sync.add("camera", cam) == []
    mic = _m(100 * MS)
    out = sync.add("mic", mic)
    assert len(out) == 1 and out[0]["camera"] is cam and out[0]["mic"] is mic
    assert sync.stats == SyncStats(matched=1, unmatched={"camera": 0, "mic": 0})
    assert sync.queued() == {"camera": 0, "mic": 0}


def test_slop_is_inclusive_and_an_unmatchable_pivot_is_dropped() -> None:
    sync = ApproximateTimeSynchronizer(["a", "b"], slop_ns=10)
    sync.add("a", _m(0))
    assert len(sync.add("b", _m(10))) == 1  # exactly slop apart: a set
    sync.add("a", _m(100))
    assert sync.add("b", _m(111)) == []  # 11 > slop: "a"@100 can never match (b only gets later)
    assert sync.stats.unmatched == {"a": 1, "b": 0}
    assert sync.queued() == {"a": 0, "b": 1}
    assert len(sync.add("a", _m(115))) == 1


def test_superseded_pivot_gives_the_tighter_set() -> None:
    sync = ApproximateTimeSynchronizer(["camera", "mic"], slop_ns=200)
    sync.add("mic", _m(0))
    sync.add("mic", _m(90))
    out = sync.add("camera", _m(100))
    assert [(s["camera"].stamp_ns, s["mic"].stamp_ns) for s in out] == [(100, 90)]
    assert sync.stats.unmatched == {"camera": 0, "mic": 1}


def test_three_topics_and_sets_oldest_first() -> None:
    sync = ApproximateTimeSynchronizer(["camera", "mic", "imu"], queue_size=10, slop_ns=5 * MS)
    for t in (0, 33, 66):
        sync.add("camera", _m(t * MS))
        sync.add("mic", _m((t + 2) * MS))
    out = []
    for t in (1, 34, 67):
        out += sync.add("imu", _m(t * MS))
    assert [s["camera"].stamp_ns for s in out] == [0, 33 * MS, 66 * MS]
    assert all(
        max(m.stamp_ns for m in s.values()) - min(m.stamp_ns for m in s.values()) <= 5 * MS for s in out
    )


def test_out_of_order_arrival_within_a_topic_is_sorted() -> None:
    sync = ApproximateTimeSynchronizer(["a", "b"], slop_ns=5)
    sync.add("a", _m(50))
    sync.add("a", _m(10))
    out = sync.add("b", _m(11))
    assert [s["a"].stamp_ns for s in out] == [10]
    assert sync.queued() == {"a": 1, "b": 0}


def test_queue_overflow_drops_the_oldest_and_counts_it() -> None:
    sync = ApproximateTimeSynchronizer(["a", "b"], queue_size=3, slop_ns=5)
    for t in range(10):
        assert sync.add("a", _m(t * 100)) == []
    assert sync.queued() == {"a": 3, "b": 0}
    assert sync.stats.unmatched == {"a": 7, "b": 0}
    out = sync.add("b", _m(900))
    assert [s["a"].stamp_ns for s in out] == [900]


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ApproximateTimeSynchronizer(["a"])
    with pytest.raises(ValueError, match="distinct"):
        ApproximateTimeSynchronizer(["a", "a"])
    with pytest.raises(ValueError, match="queue_size"):
        ApproximateTimeSynchronizer(["a", "b"], queue_size=0)
    with pytest.raises(ValueError, match="slop_ns"):
        ApproximateTimeSynchronizer(["a", "b"], slop_ns=-1)
    with pytest.raises(ValueError, match="unknown topic"):
        ApproximateTimeSynchronizer(["a", "b"]).add("c", _m(0))


def test_camera_and_mic_at_different_rates_match_most_frames() -> None:
    rng = np.random.default_rng(0)
    sync = ApproximateTimeSynchronizer(["camera", "mic"], queue_size=10, slop_ns=20 * MS)
    events = [(t * 33_333_333 + int(rng.integers(0, 2 * MS)), "camera") for t in range(300)]
    events += [(t * 20 * MS + int(rng.integers(0, 2 * MS)), "mic") for t in range(500)]
    sets = []
    for stamp, topic in sorted(events):  # arrival in stamp order, as from live sensors
        sets += sync.add(topic, _m(stamp))
    assert len(sets) >= 0.95 * 300
    spans = [abs(s["camera"].stamp_ns - s["mic"].stamp_ns) for s in sets]
    assert max(spans) <= 20 * MS and float(np.median(spans)) <= 10 * MS


# --------------------------------------------------------------------------- properties
events_strategy = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1000)), max_size=200)


@given(
    events=events_strategy,
    queue_size=st.integers(1, 8),
    slop=st.integers(0, 200),
    n_topics=st.integers(2, 3),
)
def test_arbitrary_interleavings_stay_bounded_and_within_slop(
    events: list[tuple[int, int]], queue_size: int, slop: int, n_topics: int
) -> None:
    topics = ["camera", "mic", "imu"][:n_topics]
    sync = ApproximateTimeSynchronizer(topics, queue_size=queue_size, slop_ns=slop)
    added = dict.fromkeys(topics, 0)
    emitted = dict.fromkeys(topics, 0)
    used: set[int] = set()
    alive = []  # keeps every message alive so that id() stays unique
    for idx, stamp in events:
        topic = topics[idx % n_topics]
        added[topic] += 1
        alive.append(_m(stamp))
        out = sync.add(topic, alive[-1])
        assert all(n <= queue_size for n in sync.queued().values())
        mins = []
        for matched in out:
            assert set(matched) == set(topics)
            stamps = [m.stamp_ns for m in matched.values()]
            assert max(stamps) - min(stamps) <= slop
            mins.append(min(stamps))
            for t, m in matched.items():
                assert id(m) not in used  # each message at most once
                used.add(id(m))
                emitted[t] += 1
        assert mins == sorted(mins)  # oldest first
    stats = sync.stats
    assert stats.matched == len(used) // n_topics
    for t in topics:  # every message is matched, dropped-and-counted, or still queued
        assert emitted[t] + stats.unmatched[t] + sync.queued()[t] == added[t]


@given(
    gaps=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 50)), max_size=200),
    slop=st.integers(0, 60),
)
def test_in_order_streams_give_sets_in_time_order(gaps: list[tuple[int, int]], slop: int) -> None:
    sync = ApproximateTimeSynchronizer(["a", "b"], queue_size=5, slop_ns=slop)
    now = {"a": 0, "b": 0}
    last_min = -1
    for idx, gap in gaps:
        topic = "ab"[idx]
        now[topic] += gap
        for matched in sync.add(topic, _m(now[topic])):
            lo = min(m.stamp_ns for m in matched.values())
            assert lo >= last_min
            last_min = lo
