"""``python -m sensors.inspect`` against a real Publisher on 127.0.0.1: counts, invalid
reasons, drops, restarts, rate and latency in the JSON line; it stops by itself."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from sensors.inspect import main
from sensors.transport import Publisher
from sensors.wire import Image, Imu, encode


def _imu(seq: int, session: int) -> Imu:
    now = time.time_ns()
    return Imu(stamps_ns=np.array([now]), values=np.zeros((1, 10)), stamp_ns=now, seq=seq, session=session)


def _feed(pub: Publisher, started: threading.Event) -> None:
    assert pub.wait_for_subscribers(1, timeout_s=10)
    started.set()
    good = encode("camera", Image(data=np.zeros((2, 2, 3), np.uint8), stamp_ns=1))
    pub.send_raw([b"camera", b"\xc1", b"x"])  # header_msgpack
    pub.send_raw([b"camera"])  # frame_count
    pub.send_raw([good[0], good[1], b"short"])  # payload_size
    pub.send_raw([good[0], good[1], b"short"])
    for seq, session in ((0, 111), (1, 111), (4, 111), (0, 222)):  # a gap of 2, then a restart
        pub.send_raw(encode("imu", _imu(seq, session)))
    for i in range(10):
        pub.publish("camera", Image(data=np.full((4, 6, 3), i, np.uint8)))
        time.sleep(0.02)


def test_inspect_json_counts_invalid_drops_restarts_rate_latency(capsys: pytest.CaptureFixture[str]) -> None:
    with Publisher("tcp://127.0.0.1:0") as pub:
        started = threading.Event()
        feeder = threading.Thread(target=_feed, args=(pub, started), daemon=True)
        feeder.start()
        t0 = time.monotonic()
        rc = main(
            [
                "--connect",
                pub.endpoint,
                "--count",
                "14",
                "--seconds",
                "20",
                "--json",
                "--echo",
                "--log-level",
                "WARNING",
            ]
        )
        elapsed = time.monotonic() - t0
        feeder.join(timeout=5)
    assert rc == 0 and started.is_set() and elapsed < 10
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert set(result) == {"camera", "imu", "invalid", "skipped", "overflow"}
    assert result["invalid"] == {"header_msgpack": 1, "frame_count": 1, "payload_size": 2}
    assert result["skipped"] == {} and result["overflow"] == {}
    cam, imu = result["camera"], result["imu"]
    assert (cam["count"], cam["drops"], cam["restarts"], cam["kind"], cam["last_seq"]) == (
        10,
        0,
        0,
        "image",
        9,
    )
    assert (imu["count"], imu["drops"], imu["restarts"], imu["kind"], imu["last_seq"]) == (4, 2, 1, "imu", 0)
    assert cam["bytes"] == 10 * 4 * 6 * 3
    assert 10 <= cam["rate_hz"] <= 100  # 10 frames 20 ms apart
    assert 0 <= cam["latency_ms"]["p50"] <= cam["latency_ms"]["p99"] < 1000
    assert sum(line.startswith("camera seq=") for line in out) == 10  # --echo
    assert any(line.startswith("invalid: 4") for line in out)


def test_inspect_stops_after_seconds_without_any_publisher(capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    rc = main(["--connect", "tcp://127.0.0.1:9", "--seconds", "0.3", "--json", "--log-level", "WARNING"])
    elapsed = time.monotonic() - t0
    assert rc == 0 and 0.25 <= elapsed < 3
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"invalid": {}, "skipped": {}, "overflow": {}}
    assert "(no valid messages)" in out


def test_inspect_refuses_a_run_without_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--connect", "tcp://127.0.0.1:9", "--seconds", "0"]) == 2
    assert "stops by itself" in capsys.readouterr().err
