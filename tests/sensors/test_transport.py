"""Transport tests on real pyzmq sockets (loopback TCP and IPC). Subscriptions are awaited
through the XPUB socket (never sleep-and-hope); every loop and wait is bounded."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq

from sensors.transport import LatestReceiver, LosslessReader, Publisher, ReceiverStats
from sensors.wire import Audio, Image, Imu, encode

TIMEOUT_S = 5.0


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "tcp":
        yield "tcp://127.0.0.1:0"  # the publisher binds a free port; use pub.endpoint
        return
    d = tempfile.mkdtemp(prefix="zmq", dir="/tmp")  # short: ipc paths are limited to ~100 bytes
    yield f"ipc://{d}/s"
    shutil.rmtree(d, ignore_errors=True)


def _frame(i: int, shape: tuple[int, ...] = (48, 64, 3)) -> np.ndarray:
    a = np.full(shape, i % 256, dtype=np.uint8)
    a.reshape(-1)[:8] = np.frombuffer(np.int64(i).tobytes(), np.uint8)  # unique per i
    return a


def _imu(n: int = 10, t0: int = 1_000_000_000) -> Imu:
    rng = np.random.default_rng(n)
    return Imu(stamps_ns=t0 + np.arange(n, dtype=np.int64) * 10_000_000, values=rng.normal(size=(n, 10)))


def _raw(topic: str, msg: Image | Audio | Imu) -> list[bytes]:
    return [f if isinstance(f, bytes) else np.ascontiguousarray(f).tobytes() for f in encode(topic, msg)]


# --------------------------------------------------------------------------- basics
def test_publish_and_receive_all_kinds(ctx: zmq.Context, endpoint: str) -> None:
    image = Image(data=_frame(1, (480, 640, 3)), frame_id="cam0")
    audio = Audio(data=(np.arange(320, dtype=np.int16) * 3).reshape(320, 1), sample_rate=16000)
    imu = _imu()
    with (
        Publisher(endpoint, context=ctx) as pub,
        LatestReceiver(pub.endpoint, ["camera", "mic", "imu"], context=ctx) as rx,
    ):
        assert pub.wait_for_subscribers(3, TIMEOUT_S)
        before = time.time_ns()
        assert [pub.publish(t, m) for t, m in (("camera", image), ("mic", audio), ("imu", imu))] == [0, 0, 0]
        got = {t: rx.wait_for(t, TIMEOUT_S) for t in ("camera", "mic", "imu")}
        assert all(m is not None for m in got.values())
        assert isinstance(got["camera"], Image) and got["camera"].frame_id == "cam0"
        np.testing.assert_array_equal(got["camera"].data, image.data)
        np.testing.assert_array_equal(got["mic"].data, audio.data)
        np.testing.assert_array_equal(got["imu"].values, imu.values)
        np.testing.assert_array_equal(got["imu"].stamps_ns, imu.stamps_ns)
        for m in got.values():
            assert m.session == pub.session and m.seq == 0 and m.stamp_ns >= before
            assert not (m.data if not isinstance(m, Imu) else m.values).flags.writeable  # zero-copy view
        _, rx_ns = rx.latest("camera")
        assert rx_ns >= got["camera"].stamp_ns
        stats = rx.stats()
        assert isinstance(stats, ReceiverStats)
        assert stats.received == {"camera": 1, "mic": 1, "imu": 1}
        assert stats.invalid == {} and stats.drops == {} and stats.restarts == {}
        assert set(stats.last_rx_ns) == {"camera", "mic", "imu"}
        assert pub.stats.sent == {"camera": 1, "mic": 1, "imu": 1}


def test_lossless_reader_receives_all_kinds(ctx: zmq.Context, endpoint: str) -> None:
    with Publisher(endpoint, context=ctx) as pub, LosslessReader(pub.endpoint, context=ctx) as reader:
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        pub.publish("camera", Image(data=_frame(7)))
        pub.publish("mic", Audio(data=np.ones((320, 2), np.float32)))
        pub.publish("imu", _imu(3))
        got = [reader.recv(int(TIMEOUT_S * 1000)) for _ in range(3)]
        assert [g[0] for g in got if g is not None] == ["camera", "mic", "imu"]
        assert got[1][1].data.shape == (320, 2)
        assert reader.stats().received == {"camera": 1, "mic": 1, "imu": 1}


def test_topics_match_exactly_not_by_prefix(ctx: zmq.Context, endpoint: str) -> None:
    with (
        Publisher(endpoint, context=ctx) as pub,
        LosslessReader(pub.endpoint, ["cam"], context=ctx) as reader,
    ):
        assert pub.wait_for_subscribers(1, TIMEOUT_S, topic="cam")
        pub.publish("camera", Image(data=_frame(0)))  # ZeroMQ's prefix filter lets this through
        pub.publish("cam", Image(data=_frame(1)))
        got = reader.recv(int(TIMEOUT_S * 1000))
        assert got is not None and got[0] == "cam"
        assert reader.recv(50) is None
        assert reader.stats().received == {"cam": 1}


def test_wait_for_subscribers_times_out_and_counts_per_topic(ctx: zmq.Context) -> None:
    with Publisher("tcp://127.0.0.1:0", context=ctx) as pub:
        t0 = time.monotonic()
        assert not pub.wait_for_subscribers(1, 0.1)
        assert 0.09 <= time.monotonic() - t0 < 2.0
        with LosslessReader(pub.endpoint, ["mic"], context=ctx):
            assert pub.wait_for_subscribers(1, TIMEOUT_S, topic="mic")
            assert not pub.wait_for_subscribers(1, 0.05, topic="camera")
            assert pub.stats.subscriptions == 1


def test_receive_timeouts_return_none(ctx: zmq.Context) -> None:
    # Nothing listens on this endpoint: every receive must come back on time with None.
    with LosslessReader("tcp://127.0.0.1:9", context=ctx) as reader:
        t0 = time.monotonic()
        assert reader.recv(100) is None
        assert 0.09 <= time.monotonic() - t0 < 2.0
        assert reader.recv(0) is None
    with LatestReceiver("tcp://127.0.0.1:9", ["camera"], context=ctx, poll_ms=10) as rx:
        t0 = time.monotonic()
        assert rx.wait_for("camera", 0.1) is None
        assert 0.09 <= time.monotonic() - t0 < 2.0
        assert rx.latest("camera") is None
        assert rx.stats().received == {}


# --------------------------------------------------------------------------- latest-only
def test_latest_only_under_a_burst(ctx: zmq.Context, endpoint: str) -> None:
    n = 300
    with (
        Publisher(endpoint, context=ctx, sndhwm=4) as pub,
        LatestReceiver(pub.endpoint, ["camera"], context=ctx, rcvhwm=4) as rx,
    ):
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        frames = [_frame(i, (240, 320, 3)) for i in range(n)]
        for f in frames:  # a burst that we never read while it happens
            pub.publish("camera", Image(data=f))
        # The tail of a burst may be dropped at a full queue: publish until the newest arrives.
        for _ in range(50):
            last = pub.publish("camera", Image(data=frames[-1]))
            msg = rx.wait_for("camera", 0.5, newer_than_seq=last - 1)
            if msg is not None and msg.seq == last:
                break
        else:
            pytest.fail("the newest frame never arrived")
        got, _ = rx.latest("camera")
        assert got.seq == last
        np.testing.assert_array_equal(got.data, frames[-1])
        stats = rx.stats()
        # every seq up to the newest was either received or counted as dropped
        assert stats.received["camera"] + stats.drops.get("camera", 0) == last + 1
        assert stats.restarts == {} and stats.invalid == {}
        assert stats.rate_hz["camera"] > 0


def test_drops_counted_from_seq_gaps(ctx: zmq.Context, endpoint: str) -> None:
    seqs = [0, 1, 2, 5, 6, 10]
    with (
        Publisher(endpoint, context=ctx) as pub,
        LatestReceiver(pub.endpoint, ["mic"], context=ctx) as rx,
        LosslessReader(pub.endpoint, ["mic"], context=ctx) as reader,
    ):
        assert pub.wait_for_subscribers(2, TIMEOUT_S)
        for s in seqs:
            pub.send_raw(_raw("mic", Audio(data=np.zeros((320, 1), np.int16), seq=s, session=42, stamp_ns=1)))
        got = [reader.recv(int(TIMEOUT_S * 1000)) for _ in seqs]
        assert [g[1].seq for g in got if g is not None] == seqs
        assert rx.wait_for("mic", TIMEOUT_S, newer_than_seq=9) is not None
        for stats in (rx.stats(), reader.stats()):
            assert stats.drops == {"mic": 5} and stats.received == {"mic": 6} and stats.restarts == {}


def test_hwm_refusals_counted_with_nodrop(ctx: zmq.Context, endpoint: str) -> None:
    n = 500
    with (
        Publisher(endpoint, context=ctx, sndhwm=1, nodrop=True) as pub,
        LosslessReader(pub.endpoint, ["camera"], context=ctx, rcvhwm=1),  # never read: queues fill
    ):
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        frame = _frame(0, (480, 640, 3))
        for _ in range(n):
            pub.publish("camera", Image(data=frame))  # must never block
        stats = pub.stats
        assert stats.dropped_hwm.get("camera", 0) > 0
        assert stats.sent["camera"] + stats.dropped_hwm["camera"] == n


# --------------------------------------------------------------------------- restarts
def test_publisher_restart_is_a_restart_not_drops(ctx: zmq.Context, endpoint: str) -> None:
    pub = Publisher(endpoint, context=ctx)
    with LatestReceiver(pub.endpoint, ["imu"], context=ctx) as rx:
        try:
            assert pub.wait_for_subscribers(1, TIMEOUT_S)
            for _ in range(5):
                pub.publish("imu", _imu(2))
            first = rx.wait_for("imu", TIMEOUT_S, newer_than_seq=3)
            assert first is not None and first.seq == 4
        finally:
            pub.close()
        with Publisher(pub.endpoint, context=ctx) as pub2:  # same endpoint, new session
            assert pub2.session != pub.session
            assert pub2.wait_for_subscribers(1, TIMEOUT_S)  # the SUB reconnects and resubscribes
            assert pub2.publish("imu", _imu(2)) == 0
            msg = rx.wait_for("imu", TIMEOUT_S, newer_than_seq=first.seq)
            assert msg is not None and msg.session == pub2.session and msg.seq == 0
            pub2.publish("imu", _imu(2))
            assert rx.wait_for("imu", TIMEOUT_S, newer_than_seq=0) is not None
        stats = rx.stats()
        assert stats.restarts == {"imu": 1} and stats.drops == {} and stats.received == {"imu": 7}


# --------------------------------------------------------------------------- bad input
def _bad_messages() -> dict[str, list[bytes]]:
    good = _raw("camera", Image(data=_frame(3), seq=0, session=9, stamp_ns=1))
    header = msgpack.unpackb(good[1])
    return {
        "frame_count": [b"camera"],
        "header_msgpack": [b"camera", b"\xc1\xc1", b"x"],
        "payload_size": [good[0], good[1], good[2][:-1]],
        "version": [good[0], msgpack.packb({**header, "v": 99}), good[2]],
        "field_type": [good[0], msgpack.packb({**header, "height": True}), good[2]],
    }


def test_bad_messages_are_counted_by_reason_and_good_ones_arrive(ctx: zmq.Context, endpoint: str) -> None:
    bad = _bad_messages()
    with (
        Publisher(endpoint, context=ctx) as pub,
        LatestReceiver(pub.endpoint, ["camera"], context=ctx) as rx,
        LosslessReader(pub.endpoint, ["camera"], context=ctx) as reader,
    ):
        assert pub.wait_for_subscribers(2, TIMEOUT_S)
        for frames in bad.values():
            pub.send_raw(frames)
        pub.publish("camera", Image(data=_frame(1)))
        repeat = _raw("camera", Image(data=_frame(2), seq=0, session=pub.session, stamp_ns=5))
        pub.send_raw(repeat)  # same session and seq as the published one: out of order
        pub.publish("camera", Image(data=_frame(3)))
        # Messages on one connection arrive in order: once seq 1 is here, all before it were seen.
        assert rx.wait_for("camera", TIMEOUT_S, newer_than_seq=0).seq == 1
        got = [reader.recv(int(TIMEOUT_S * 1000)) for _ in range(2)]
        assert [g[1].seq for g in got if g is not None] == [0, 1]
        assert reader.recv(50) is None
        expected = dict.fromkeys(bad, 1) | {"seq_order": 1}
        for stats in (rx.stats(), reader.stats()):
            assert stats.invalid == expected
            assert stats.received == {"camera": 2}


def test_lossless_reader_survives_a_flood_of_garbage_with_bounded_recv(ctx: zmq.Context) -> None:
    with (
        Publisher("tcp://127.0.0.1:0", context=ctx, sndhwm=0) as pub,
        LosslessReader(pub.endpoint, context=ctx) as reader,
    ):
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        for i in range(2000):
            pub.send_raw([b"camera", b"\xc1", bytes([i % 256])])
        t0 = time.monotonic()
        assert reader.recv(20) is None  # only garbage: returns on time
        assert time.monotonic() - t0 < 2.0
        for _ in range(200):  # bounded drain of the rest
            if reader.recv(20) is None and reader.stats().invalid.get("header_msgpack") == 2000:
                break
        assert reader.stats().invalid == {"header_msgpack": 2000}


# --------------------------------------------------------------------------- lossless
def test_lossless_reader_receives_every_message_in_order(ctx: zmq.Context, endpoint: str) -> None:
    n = 3000
    with (
        Publisher(endpoint, context=ctx, sndhwm=0) as pub,  # capture: publisher queue unlimited too
        LosslessReader(pub.endpoint, ["mic", "imu"], context=ctx) as reader,
    ):
        assert pub.wait_for_subscribers(2, TIMEOUT_S)
        for i in range(n):
            pub.publish("mic", Audio(data=np.full((320, 1), i % 30000, np.int16)))
            if i % 10 == 0:
                pub.publish("imu", _imu(10, t0=i))
        seen: dict[str, list[int]] = {"mic": [], "imu": []}
        for _ in range(n + n // 10):
            got = reader.recv(int(TIMEOUT_S * 1000))
            assert got is not None, f"lost messages after {seen['mic'][-1:]}"
            topic, msg, rx_ns = got
            seen[topic].append(msg.seq)
            if topic == "mic":
                assert int(msg.data[0, 0]) == msg.seq % 30000
            assert rx_ns >= msg.stamp_ns
        assert seen["mic"] == list(range(n)) and seen["imu"] == list(range(n // 10))
        assert reader.recv(50) is None
        stats = reader.stats()
        assert stats.drops == {} and stats.invalid == {}
        assert stats.received == {"mic": n, "imu": n // 10}


# --------------------------------------------------------------------------- lifecycle
def test_threads_stop_and_closed_objects_refuse_work(ctx: zmq.Context) -> None:
    pub = Publisher("tcp://127.0.0.1:0", context=ctx)
    rx = LatestReceiver(pub.endpoint, ["camera"], context=ctx, poll_ms=20).start()
    with pytest.raises(RuntimeError):
        rx.start()
    thread = rx._thread
    t0 = time.monotonic()
    rx.stop()
    assert thread is not None and not thread.is_alive()
    assert time.monotonic() - t0 < 2.0
    rx.stop()  # idempotent
    pub.close()
    pub.close()
    with pytest.raises(RuntimeError):
        pub.publish("camera", Image(data=_frame(0)))
    reader = LosslessReader("tcp://127.0.0.1:9", context=ctx)
    reader.close()
    with pytest.raises(RuntimeError):
        reader.recv(10)


# --------------------------------------------------------------------------- publishers without a session
def test_a_hand_built_sessionless_publisher_is_received_and_its_restart_counted(ctx: zmq.Context) -> None:
    """A publisher written from docs/wire.md with pyzmq + msgpack only: no ``session`` field."""
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"

    def send(seq: int) -> None:
        header = {"v": 1, "kind": "imu", "seq": seq, "stamp_ns": 1_000 + seq, "frame_id": "imu_link", "count": 1,
                  "orientation_covariance": [-1.0] + [0.0] * 8, "angular_velocity_covariance": [0.01] * 9,
                  "linear_acceleration_covariance": [0] * 9}
        values = np.arange(10, dtype="<f8") + seq
        sock.send_multipart([b"imu", msgpack.packb(header), np.array([1_000 + seq], "<i8").tobytes(), values.tobytes()])

    try:
        with LosslessReader(endpoint, ["imu"], context=ctx) as reader, \
                LatestReceiver(endpoint, ["imu"], context=ctx) as rx:
            assert sock.poll(int(TIMEOUT_S * 1000)) and sock.poll(int(TIMEOUT_S * 1000))
            seqs = [0, 1, 2, 3, 4, 0, 1, 2]  # the publisher restarted after seq 4
            for s in seqs:
                send(s)
            got = [reader.recv(int(TIMEOUT_S * 1000)) for _ in seqs]
            assert [g[1].seq for g in got if g is not None] == seqs
            assert all(g[1].session == 0 and g[1].frame_id == "imu_link" for g in got if g is not None)
            assert got[-1][1].values[0].tolist() == (np.arange(10) + 2.0).tolist()
            assert rx.wait_for("imu", TIMEOUT_S, newer_than_seq=4) is not None  # seq 2 after a restart is newer
            # that returns at the new session's seq 0: its thread may not have taken seq 1 and 2 yet
            end = time.monotonic() + TIMEOUT_S
            while rx.stats().received != {"imu": 8} and time.monotonic() < end:
                time.sleep(0.01)
            for stats in (reader.stats(), rx.stats()):
                assert stats.received == {"imu": 8} and stats.restarts == {"imu": 1}
                assert stats.drops == {} and stats.invalid == {}
    finally:
        sock.close(linger=0)


# --------------------------------------------------------------------------- byte bounds, side topics
def test_lossless_reader_keeps_its_queue_within_max_bytes_dropping_the_oldest(ctx: zmq.Context) -> None:
    n, frame = 200, _frame(0, (100, 340, 3))  # 102 kB each, 20 MB in all
    budget = 1 << 20  # ten frames
    with (
        Publisher("tcp://127.0.0.1:0", context=ctx, sndhwm=0) as pub,  # the publisher holds what we do not
        LosslessReader(pub.endpoint, ["camera"], context=ctx, max_bytes=budget, max_message_bytes=256 << 10) as reader,
    ):
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        for _ in range(n):
            pub.publish("camera", Image(data=frame))
        seen: list[int] = []
        while (got := reader.recv(500)) is not None:  # a slow consumer (a recorder on a slow disk)
            seen.append(got[1].seq)
            assert reader.stats().queued_bytes <= budget
            time.sleep(0.002)
        stats = reader.stats()
    assert seen == sorted(seen) and seen[-1] == n - 1  # in order, and the newest is never the one dropped
    overflow = stats.overflow.get("camera", 0)
    assert overflow > 0 and len(seen) + overflow == n  # every frame read or counted as overflow
    assert stats.received == {"camera": n} and stats.drops == {}  # dropped here, not lost upstream
    assert 0 < stats.peak_queued_bytes <= budget and stats.queued_bytes == 0


def test_a_message_above_max_message_bytes_is_dropped_counted_and_the_link_stays(ctx: zmq.Context) -> None:
    with (
        Publisher("tcp://127.0.0.1:0", context=ctx) as pub,
        LosslessReader(pub.endpoint, ["camera"], context=ctx, max_bytes=1 << 20, max_message_bytes=64 << 10) as reader,
    ):
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        pub.publish("camera", Image(data=_frame(1, (200, 200, 3))))  # 120 kB > 64 kB
        pub.publish("camera", Image(data=_frame(2)))  # 9 kB: still delivered (no ZeroMQ MAXMSGSIZE cut-off)
        got = reader.recv(int(TIMEOUT_S * 1000))
        assert got is not None and got[1].seq == 1 and got[1].data.shape == (48, 64, 3)
        stats = reader.stats()
    assert stats.invalid == {"message_size": 1} and stats.received == {"camera": 1}
    assert stats.link.get("disconnected", 0) == 0 and stats.link.get("connected", 0) >= 1


def test_side_topics_are_skipped_by_name_not_counted_invalid(ctx: zmq.Context) -> None:
    with (
        Publisher("tcp://127.0.0.1:0", context=ctx) as pub,
        LosslessReader(pub.endpoint, context=ctx, skip_topics=["truth"]) as reader,
    ):
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        for i in range(3):
            pub.send_raw([b"truth", msgpack.packb({"stamp_ns": i, "label": 1, "name": "trouser"})])
        pub.send_raw([b"truthy", b"x"])  # only the exact name is skipped
        pub.publish("camera", Image(data=_frame(1)))
        got = reader.recv(int(TIMEOUT_S * 1000))
        assert got is not None and got[0] == "camera"
        stats = reader.stats()
    assert stats.skipped == {"truth": 3} and stats.invalid == {"frame_count": 1} and stats.received == {"camera": 1}
