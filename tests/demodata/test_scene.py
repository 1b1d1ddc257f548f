"""Scene control of the dataset publishers: timeline overrides, content consistency, pools,
and the REP control socket against a real streaming ``DatasetStreamer``."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from demodata import store
from demodata.content import split_pool
from demodata.publish import DatasetStreamer, StreamerConfig, main
from demodata.scene import ClassSchedule, Segment, Timeline
from demodata.scene_control import SceneClient, SceneError, SceneServer

S = 1_000_000_000  # ns per second


def _find(chunk: np.ndarray, clips: np.ndarray) -> bool:
    """Is ``chunk`` a contiguous piece of one of ``clips`` (rows)?"""
    n, width = len(chunk), clips.shape[1] - len(chunk) + 1
    hit = np.ones((len(clips), width), dtype=bool)
    j0 = min(int(np.argmax(np.abs(chunk))), n - 8)  # candidates: 8 samples at the loudest match
    for j in range(max(0, j0), min(n, j0 + 8)):
        hit &= clips[:, j : j + width] == chunk[j]
    return any(np.array_equal(clips[r, i : i + n], chunk) for r, i in zip(*np.nonzero(hit), strict=True))


# --------------------------------------------------------------------------- timeline
def test_timeline_override_clips_base_period_and_schedule_resumes() -> None:
    tl = Timeline(ClassSchedule([0, 1, 2]), dwell_ns=1000)
    assert tl.segment(1500) == Segment(1000, 2000, 1, ("p", 1), "base", 1000, 1000)
    ov = tl.show(7, 2e-6, at_ns=1500)
    assert ov == Segment(1500, 3500, 7, ("o", 0), "scene", 1500, 2000) and ov.override
    assert tl.segment(1499) == Segment(1000, 1500, 1, ("p", 1), "base", 1000, 1000)  # clipped, same key
    assert tl.segment(1500) == tl.segment(3499) == ov
    assert tl.segment(2500) == ov  # the whole of period 2 is covered
    after = tl.segment(3500)  # period 3 resumes where the override ends, its origin unchanged
    assert after == Segment(3500, 4000, 0, ("p", 3), "base", 3000, 1000) and not after.override
    assert tl.segment(4000).key == ("p", 4) and tl.segment(4000).start_ns == 4000

    # a new show replaces the one in progress; resume ends it and drops pending ones
    tl.advance(2000)
    second = tl.show(5, 1e-6, at_ns=2200)
    assert second.key == ("o", 1) and (second.start_ns, second.end_ns) == (2200, 3200)
    assert tl.segment(2199).end_ns == 2200 and tl.segment(2199).key == ("o", 0)
    assert tl.segment(3200).key == ("p", 3)  # not the old override's tail
    tl.show(6, 1e-6, at_ns=9000)  # pending
    ended = tl.resume(2700)
    assert ended is not None and (ended.key, ended.end_ns) == (("o", 1), 2700)
    assert [s.key for s in tl.overrides()] == [("o", 0), ("o", 1)] and tl.segment(9000).key == ("p", 9)
    assert tl.resume(2800) is None


def test_timeline_floor_bounds_and_invalid_seconds() -> None:
    tl = Timeline(ClassSchedule([0, 1]), dwell_ns=1000)
    assert tl.advance(5000) == 5000 and tl.advance(10) == 5000  # the floor never goes back
    late = tl.show(3, 1e-6, at_ns=100)  # the past has been sent: it starts at the floor
    assert (late.start_ns, late.end_ns) == (5000, 6000)
    for bad in (0.0, -1.0, 3601.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="seconds="):
            tl.show(3, bad, at_ns=6000)

    small = Timeline(ClassSchedule([0]), dwell_ns=1000, max_overrides=4, retain_s=1e-6)
    for i in range(50):  # each ends before the next: old ones are forgotten
        small.advance(i * 10_000)
        small.show(1, 5e-6, at_ns=i * 10_000)
        assert len(small.overrides()) <= 2
    assert small.overrides()[-1].key == ("o", 49)
    capped = Timeline(ClassSchedule([0]), dwell_ns=1000, max_overrides=4)  # retains 600 s
    for i in range(20):
        capped.advance(i * 100)
        capped.show(1, 5e-8, at_ns=i * 100)
        assert len(capped.overrides()) <= 4
    assert [s.key[1] for s in capped.overrides()] == [16, 17, 18, 19]
    for i in range(3):  # pending ones are never dropped: a full timeline refuses
        capped.show(2, 5e-8, at_ns=10_000 + i * 100)
    with pytest.raises(ValueError, match="pending"):
        capped.show(2, 5e-8, at_ns=20_000)


UNIT = 1000  # ns per model cell
CELLS = 100


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("show"), st.integers(0, 60), st.integers(1, 30), st.integers(0, 9)),
            st.tuples(st.just("resume"), st.integers(0, 70)),
            st.tuples(st.just("advance"), st.integers(0, 60)),
        ),
        max_size=12,
    )
)
def test_timeline_is_a_partition_where_overrides_win(ops: list[tuple]) -> None:
    sched = ClassSchedule([0, 1, 2], "shuffle", seed=1)
    tl = Timeline(sched, dwell_ns=10 * UNIT)
    cells: list[int | None] = [None] * CELLS  # reference model: the override shown per cell
    classes: dict[int, int] = {}
    floor, k = 0, 0
    for op in ops:
        if op[0] == "show":
            _, at, dur, c = op
            seg = tl.show(c, dur * UNIT / S, at_ns=at * UNIT)
            a = max(at, floor)
            assert (seg.start_ns, seg.end_ns, seg.key, seg.class_id) == (
                a * UNIT,
                (a + dur) * UNIT,
                ("o", k),
                c,
            )
            for oid in {cells[i] for i in range(a, a + dur)} - {None}:  # replaced overrides
                first = cells.index(oid)
                for i in range(first if first >= a else a, CELLS):
                    if cells[i] == oid:
                        cells[i] = None
            cells[a : a + dur] = [k] * dur
            classes[k], k = c, k + 1
        elif op[0] == "resume":
            n = max(op[1], floor)
            tl.resume(n * UNIT)
            cells[n:] = [None] * (CELLS - n)
        else:
            tl.advance(op[1] * UNIT)
            floor = max(floor, op[1])
    keys = [("p", i // 10) if cells[i] is None else ("o", cells[i]) for i in range(CELLS)]
    for i in range(CELLS):
        for t in (i * UNIT, i * UNIT + 1, i * UNIT + UNIT - 1):
            seg = tl.segment(t)
            assert seg.start_ns <= t < seg.end_ns and seg.key == keys[i]
            if cells[i] is None:
                assert (seg.class_id, seg.pool) == (sched.class_at(i // 10), "base")
            else:
                assert (seg.class_id, seg.pool) == (classes[cells[i]], "scene")
    seg, walked = tl.segment(0), 0  # contiguous, maximal segments: one per run of keys
    while seg.start_ns < CELLS * UNIT:
        nxt = tl.segment(seg.end_ns)
        assert tl.segment(seg.start_ns) == tl.segment(seg.end_ns - 1) == seg
        assert nxt.start_ns == seg.end_ns and nxt.key != seg.key
        seg, walked = nxt, walked + 1
    assert walked == 1 + sum(keys[i] != keys[i - 1] for i in range(1, CELLS))


# --------------------------------------------------------------------------- content
@pytest.fixture(scope="module")
def plain() -> DatasetStreamer:
    return DatasetStreamer(StreamerConfig(classes=[0, 1], dwell_s=1.0, mic_noise_dbfs=-300.0))


@pytest.fixture(scope="module")
def shared() -> DatasetStreamer:
    cfg = StreamerConfig(classes=[0, 1], dwell_s=1.0, scene_share=0.5, camera_resample="frame", seed=4)
    return DatasetStreamer(cfg)


@pytest.fixture
def fresh(plain: DatasetStreamer) -> Iterator[DatasetStreamer]:
    plain.timeline.reset()
    yield plain
    plain.timeline.reset()


def _stream(streamer: DatasetStreamer, seconds: float) -> dict[str, Any]:
    """Everything the loop would send in ``seconds``: frames, truth labels, mic, imu."""
    offs = [round(k * S / streamer.cfg.fps) for k in range(int(seconds * streamer.cfg.fps))]
    frames = [streamer.frame(k, off) for k, off in enumerate(offs)]
    return {
        "offs": offs,
        "labels": [label for label, _ in frames],
        "images": [img for _, img in frames],
        "mic": streamer.mic.read(0, int(seconds * 16000)),
        "imu": streamer.imu.read(0, int(seconds * 100)),
    }


def test_override_switches_every_stream_exactly_within_its_span(fresh: DatasetStreamer) -> None:
    s = fresh
    base = _stream(s, 3.3)
    ov = s.timeline.show(7, 0.75, at_ns=round(1.3 * S))
    start, end = ov.start_ns, ov.end_ns
    got = _stream(s, 3.3)
    assert [s.label_at(t) for t in (start - 1, start, end - 1, end)] == [1, 7, 7, 0]
    fm = store.load("fashion_mnist")
    inside = 0
    for off, label, img, old_label, old_img in zip(
        got["offs"], got["labels"], got["images"], base["labels"], base["images"], strict=True
    ):
        if start <= off < end:  # camera and truth show class 7, from a class-7 image
            small = img[::8, ::8, 0]
            hits = np.flatnonzero((fm["x_test"] == small).all(axis=(1, 2)))
            assert label == 7 and len(hits) and (fm["y_test"][hits] == 7).any()
            inside += 1
        else:  # the schedule, unchanged before and resumed after
            assert label == old_label == [0, 1, 0, 1][off // S] and np.array_equal(img, old_img)
    assert inside == sum(start <= o < end for o in got["offs"]) >= 20

    n0, n1 = s.mic.sample_at(start), s.mic.sample_at(end)
    assert np.array_equal(got["mic"][:n0], base["mic"][:n0]) and np.array_equal(
        got["mic"][n1:], base["mic"][n1:]
    )
    speech = store.speech_split(store.load("speech"), "test")
    voiced = 0
    for c0 in range(n0, n1 - 320, 320):
        chunk = got["mic"][c0 : c0 + 320]
        if np.abs(chunk).max() > 500:
            voiced += 1
            assert _find(chunk, speech["audio"][speech["y"] == 7])
            assert not _find(chunk, speech["audio"][speech["y"] <= 1])
    assert voiced >= 5

    i0, i1 = s.imu.sample_at(start), s.imu.sample_at(end)
    assert (i0, i1) == (130, 205)
    assert np.array_equal(got["imu"][:i0], base["imu"][:i0]) and np.array_equal(
        got["imu"][i1:], base["imu"][i1:]
    )
    bm = store.load("basic_motions")
    recs = {a: bm["x_test"][bm["y_test"] == a].transpose(0, 2, 1).reshape(-1, 6) for a in range(4)}
    for row in got["imu"][i0:i1]:
        r = np.concatenate([row[7:10], row[4:7]]).astype(np.float32)
        assert (recs[3] == r).all(axis=1).any() and not (recs[0] == r).all(axis=1).any()
    assert not np.array_equal(got["imu"][i0:i1], base["imu"][i0:i1])


def test_truncating_a_segment_never_changes_sent_samples(fresh: DatasetStreamer) -> None:
    s = fresh
    s.timeline.advance(round(1.4 * S))  # everything before 1.4 s has been "sent"
    sent = _stream(s, 1.4)
    ov = s.timeline.show(9, 2.0, at_ns=round(0.5 * S))  # asked for the past: starts at 1.4 s
    assert ov.start_ns == round(1.4 * S)
    again = _stream(s, 1.4)
    assert again["labels"] == sent["labels"] and all(map(np.array_equal, again["images"], sent["images"]))
    assert np.array_equal(again["mic"], sent["mic"]) and np.array_equal(again["imu"], sent["imu"])

    # resume cuts the override short: what it had sent stays, read in any chunking
    s.timeline.advance(round(2.1 * S))
    before = _stream(s, 2.1)
    assert s.timeline.resume(round(2.1 * S)) is not None
    after = _stream(s, 3.0)
    assert np.array_equal(after["mic"][: len(before["mic"])], before["mic"])
    assert np.array_equal(after["imu"][: len(before["imu"])], before["imu"])
    assert after["labels"][: len(before["labels"])] == before["labels"]
    assert after["labels"][-1] == 0 and 9 in before["labels"]  # period 2 (class 0) resumed
    sizes = [320, 7, 16000, 1, 999]
    pieces, n = [], 0
    while n < len(after["mic"]):
        take = min(sizes[len(pieces) % len(sizes)], len(after["mic"]) - n)
        pieces.append(s.mic.read(n, take))
        n += take
    assert np.array_equal(np.concatenate(pieces), after["mic"])  # sample n is deterministic


def test_scene_share_splits_pools_and_keeps_them_disjoint(
    shared: DatasetStreamer, plain: DatasetStreamer
) -> None:
    s = shared
    fm = store.load("fashion_mnist")
    all_7 = np.flatnonzero(fm["y_test"] == 7)
    scene, base = s.pools["camera"]["scene"][7], s.pools["camera"]["base"][7]
    assert np.array_equal(scene, all_7[: round(0.5 * len(all_7))]) and np.array_equal(
        base, all_7[len(scene) :]
    )
    assert plain.pools["mic"]["scene"][3] is plain.pools["mic"]["base"][3]  # share 0: one pool
    assert [len(x) for x in split_pool(np.arange(3), 0.9)] == [2, 1]  # at least one each side
    assert [len(x) for x in split_pool(np.arange(10), 0.01)] == [1, 9]

    s.timeline.reset()
    drawn: dict[tuple[str, str, int], set[int]] = {}
    for i in range(40):  # shows of every class, interleaved with the schedule
        seg = s.timeline.show(i % 4, 0.5, at_ns=i * S)
        for where in (seg, s.timeline.segment(i * S + S // 2 + 1)):
            c = where.class_id
            for m in ("camera", "mic", "imu"):
                for q in range(3):
                    key = (m, where.pool, c % 4 if m == "imu" else c)
                    drawn.setdefault(key, set()).add(s.sample_index(m, where, q))
    for m in ("camera", "mic", "imu"):
        for c in range(2):
            cls = c % 4 if m == "imu" else c
            shown, scheduled = drawn[(m, "scene", cls)], drawn[(m, "base", cls)]
            assert len(shown) >= 2 and len(scheduled) >= 2 and not shown & scheduled
            assert shown <= set(s.pools[m]["scene"][cls].tolist())
    ov = s.timeline.segment(0)  # the content really comes from the drawn index
    label, img = s.frame(0, 0)
    assert label == 0 and np.array_equal(img[::8, ::8, 0], s.images[s.sample_index("camera", ov, 0)])
    s.timeline.reset()
    # a show from the schedule's pool (a scripted test of what was taught) never shows a teaching sample
    for i in range(20):
        seg = s.timeline.show(i % 2, 0.5, at_ns=i * S, pool="base")
        assert seg.override and seg.pool == "base"
        for m in ("camera", "mic", "imu"):
            cls = (i % 2) % 4 if m == "imu" else i % 2
            got = {s.sample_index(m, seg, q) for q in range(3)}
            assert got <= set(s.pools[m]["base"][cls].tolist()) and not got & set(s.pools[m]["scene"][cls].tolist())
    with pytest.raises(ValueError, match="pool"):
        s.timeline.show(0, 0.5, at_ns=21 * S, pool="elsewhere")
    s.timeline.reset()


def test_config_validation_and_show_when_not_streaming(plain: DatasetStreamer) -> None:
    for value in (-0.1, 0.95, math.nan):
        with pytest.raises(ValueError, match="scene_share="):
            StreamerConfig(scene_share=value)
    for value in ("localhost:5557", "tcp://*:5556"):  # not an endpoint / the data endpoint
        with pytest.raises(ValueError, match="scene_endpoint="):
            StreamerConfig(scene_endpoint=value)
    assert StreamerConfig(scene_endpoint="tcp://127.0.0.1:5557", scene_share=0.9).scene_share == 0.9
    with pytest.raises(SceneError, match="not streaming"):
        plain.show(3, 1.0)
    with pytest.raises(SceneError, match="class=12"):
        plain.show(12, 1.0)
    with pytest.raises(SceneError, match="seconds=0"):
        plain.show(3, 0)


# --------------------------------------------------------------------------- control socket
def _collect_truth(sub: zmq.Socket, until_ns: int, deadline_s: float) -> list[dict]:
    out: list[dict] = []
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end and (not out or out[-1]["stamp_ns"] < until_ns):
        if sub.poll(100):
            out.append(msgpack.unpackb(sub.recv_multipart()[1]))
    return out


def test_control_socket_while_streaming() -> None:
    dwell = 0.5
    cfg = StreamerConfig(
        endpoint="tcp://127.0.0.1:*", scene_endpoint="tcp://127.0.0.1:*", classes=[0, 1], dwell_s=dwell
    )
    streamer = DatasetStreamer(cfg)
    stop = threading.Event()
    worker = threading.Thread(target=streamer.run, args=(stop,), daemon=True)
    worker.start()
    ctx = zmq.Context.instance()
    try:
        assert streamer.ready.wait(10) and streamer.scene_endpoint and streamer.start_ns
        w0 = streamer.start_ns

        def scheduled(stamp: int) -> int:
            return cfg.classes[(stamp - w0) // round(dwell * S) % 2]

        with ctx.socket(zmq.SUB) as sub, SceneClient(streamer.scene_endpoint, timeout_s=5.0) as scene:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"truth")
            sub.connect(streamer.endpoint)
            assert _collect_truth(sub, 0, 5.0)  # subscribed: truth flows

            status = scene.status()
            assert status["ok"] and not status["override"] and status["class"] == scheduled(status["now_ns"])
            shown = scene.show(7, 0.6)
            assert shown["ok"] and (shown["class"], shown["name"]) == (7, streamer.class_names[7])
            assert shown["end_ns"] - shown["start_ns"] == round(0.6 * S)
            assert 0 <= shown["start_ns"] - status["now_ns"] < 1 * S
            now = scene.status()
            assert now["override"] and now["class"] == 7 and now["until_ns"] == shown["end_ns"]
            truth = _collect_truth(sub, shown["end_ns"] + round(0.4 * S), 5.0)
            inside = [t for t in truth if shown["start_ns"] <= t["stamp_ns"] < shown["end_ns"]]
            assert len(inside) >= 12 and all(t["label"] == 7 and t["name"] == "Sneaker" for t in inside)
            after = [t for t in truth if t["stamp_ns"] >= shown["end_ns"]]
            assert after and all(t["label"] == scheduled(t["stamp_ns"]) for t in after)

            bad_requests: list[Any] = [
                b"\xc1",  # never valid msgpack
                msgpack.packb([1, 2]),
                {"cmd": "dance"},
                {"class": 3},
                {"cmd": "show", "class": 12, "seconds": 1.0},
                {"cmd": "show", "class": True, "seconds": 1.0},
                {"cmd": "show", "class": 3, "seconds": 0},
                {"cmd": "show", "class": 3, "seconds": 3601},
                {"cmd": "show", "class": 3, "seconds": "1"},
                {"cmd": "show", "class": 3},
                {"cmd": "status", "extra": 1},
            ]
            errors = [scene.request(r) for r in bad_requests]
            assert all(e["ok"] is False and isinstance(e["error"], str) and e["error"] for e in errors)
            assert "not msgpack" in errors[0]["error"] and "map" in errors[1]["error"]
            assert "cmd='dance'" in errors[2]["error"] and "class=12" in errors[4]["error"]
            assert "seconds=3601" in errors[7]["error"] and "missing keys ['seconds']" in errors[9]["error"]
            with ctx.socket(zmq.REQ) as raw:  # two frames: still answered
                raw.setsockopt(zmq.LINGER, 0)
                raw.connect(streamer.scene_endpoint)
                raw.send_multipart([b"a", b"b"])
                assert raw.poll(5000)
                assert msgpack.unpackb(raw.recv())["ok"] is False
            assert streamer.scene_errors == len(bad_requests) + 1
            with pytest.raises(SceneError, match="class=42"):
                scene.show(42, 1.0)
            assert streamer.scene_errors == len(bad_requests) + 2

            long = scene.show(9, 100.0)
            time.sleep(0.3)
            resumed = scene.resume()
            assert (
                resumed["ok"] and resumed["resumed"] and long["start_ns"] < resumed["end_ns"] < long["end_ns"]
            )
            assert not scene.status()["override"] and scene.resume()["resumed"] is False
            truth = _collect_truth(sub, resumed["end_ns"] + round(0.4 * S), 5.0)
            nines = [t for t in truth if long["start_ns"] <= t["stamp_ns"] < resumed["end_ns"]]
            later = [t for t in truth if t["stamp_ns"] >= resumed["end_ns"]]
            assert nines and all(t["label"] == 9 for t in nines)
            assert len(later) >= 8 and all(t["label"] == scheduled(t["stamp_ns"]) for t in later)
    finally:
        stop.set()
        worker.join(5.0)
    assert not worker.is_alive() and streamer.scene_endpoint is None


class _Target:
    """A stand-in for the streamer behind a real REP socket."""

    def __init__(self) -> None:
        self.shown: list[tuple[Any, Any]] = []

    def show(self, class_id: Any, seconds: Any, pool: Any = "scene") -> dict[str, Any]:
        if class_id == 13:
            raise RuntimeError("boom")
        self.shown.append((class_id, seconds))
        return {"ok": True, "start_ns": 1, "end_ns": 2, "class": class_id, "name": "x"}

    def resume(self) -> dict[str, Any]:
        raise SceneError("nothing to resume")

    def status(self) -> dict[str, Any]:
        return {"ok": True, "class": 0, "name": "x", "override": False, "until_ns": 5}


def test_client_times_out_recovers_and_server_survives_target_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with SceneClient(endpoint, timeout_s=0.3) as client:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=f"no reply from scene control {endpoint}"):
            client.status()
        assert time.monotonic() - t0 < 2.0
        target = _Target()
        with SceneServer(endpoint, target) as server:
            client.timeout_s = 5.0
            assert client.status()["until_ns"] == 5  # a fresh REQ: the timed-out one is gone
            assert client.show(3, 2.5)["class"] == 3 and target.shown == [(3, 2.5)]
            broken = client.request({"cmd": "show", "class": 13, "seconds": 1.0})
            assert broken == {"ok": False, "error": "internal error: RuntimeError: boom"}
            with pytest.raises(SceneError, match="nothing to resume"):
                client.resume()
            assert client.status()["ok"] and (server.errors, server.served) == (2, 5)
        with pytest.raises(RuntimeError, match="cannot bind"), SceneServer("tcp://256.0.0.1:1", target):
            pass


def test_publish_main_with_scene_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    args = ["--endpoint", "tcp://127.0.0.1:*", "--seconds", "0.3", "--classes", "1,2"]
    assert main([*args, "--scene-endpoint", "tcp://127.0.0.1:*", "--scene-share", "0.25"]) == 0
    assert '"scene_endpoint": "tcp://127.0.0.1:*"' in caplog.text and '"scene_share": 0.25' in caplog.text
    assert "scene control on tcp://127.0.0.1:" in caplog.text and "stopped after" in caplog.text
    assert main([*args, "--scene-share", "0.95"]) == 2 and "scene_share=0.95" in caplog.text
