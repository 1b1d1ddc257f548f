"""A stream of samples that fail in serving: every one counted, the log not flooded, serving goes on."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import zmq

from benchmarks.harness import free_port
from runtime.config import ServeConfig
from runtime.serving import Server


@dataclass
class _Frame:
    seq: int
    stamp_ns: int
    rx_ns: int
    image: np.ndarray


class _Frames:
    """The intake's serving side: a new camera frame per call, up to ``n``; no audio or IMU."""

    def __init__(self, n: int) -> None:
        self.n, self.given = n, 0
        self.lock = threading.Lock()

    def wait_frame(self, last_seq: int, timeout_s: float) -> _Frame | None:
        with self.lock:
            if self.given >= self.n:
                time.sleep(timeout_s)
                return None
            self.given += 1
        now = time.time_ns()
        return _Frame(seq=last_seq + 1, stamp_ns=now, rx_ns=now, image=np.zeros((8, 8, 3), np.uint8))

    def fresh(self, modality: str) -> bool:
        return False


class _BrokenImageBackbone:
    def extract(self, batch: np.ndarray) -> None:
        raise ValueError("this frame cannot be extracted")


def test_failing_samples_are_counted_and_logged_at_powers_of_two(caplog: pytest.LogCaptureFixture) -> None:
    n = 300
    intake = _Frames(n)
    ctx = zmq.Context()
    server = Server(ServeConfig(), intake=intake, image=_BrokenImageBackbone(), audio=None, imu=None,
                    dims={"image": [4], "audio": [4], "imu": [4]}, endpoint=f"tcp://127.0.0.1:{free_port()}",
                    context=ctx)
    try:
        with caplog.at_level(logging.ERROR, logger="runtime.serving"):
            server.start()
            deadline = time.monotonic() + 30
            while server.errors.get("ValueError", 0) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server._thread is not None and server._thread.is_alive()  # serving goes on
    finally:
        server.stop()
        ctx.destroy(0)
    assert server.errors == {"ValueError": n}
    logged = [r for r in caplog.records if "prediction failed" in r.getMessage()]
    # 1, 2, 4, ..., 256: nine lines with a traceback for 300 failures, each saying how many so far
    assert [int(r.getMessage().split("(")[1].split()[0]) for r in logged] == [2**k for k in range(9)]
    assert all(r.exc_info is not None for r in logged)
