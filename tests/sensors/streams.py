"""Test helpers shared by the sensors tests: bounded receiving from a real reader, IMU batch strategies.

Why here: the CLI tests of the drivers and of record/play receive the same way, and the wire
and MCAP round-trip properties draw IMU batches the same way (with different ranges).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

from sensors.transport import LosslessReader
from sensors.wire import Imu, Message


def recv_n(reader: LosslessReader, n: int, timeout_s: float = 10.0) -> list[tuple[str, Message, int]]:
    """Up to ``n`` items from ``reader`` (fewer if ``timeout_s`` passes first), polling every 200 ms."""
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        item = reader.recv(timeout_ms=200)
        if item is not None:
            got.append(item)
    return got


@st.composite
def imu_batches(
    draw: st.DrawFn,
    *,
    max_n: int,
    stamps: st.SearchStrategy[int],
    values: st.SearchStrategy[float],
    covariances: st.SearchStrategy[tuple[float, ...]],
    common: Callable[[st.DrawFn], dict[str, Any]],
) -> Imu:
    """An IMU batch of 1..max_n samples; ``common`` draws the stamp_ns / seq / frame_id keywords."""
    n = draw(st.integers(1, max_n))
    stamps_ns = np.array(draw(st.lists(stamps, min_size=n, max_size=n)), np.int64)
    vals = np.array(draw(st.lists(values, min_size=10 * n, max_size=10 * n)), np.float64).reshape(n, 10)
    return Imu(
        stamps_ns=stamps_ns,
        values=vals,
        orientation_covariance=draw(covariances),
        angular_velocity_covariance=draw(covariances),
        linear_acceleration_covariance=draw(covariances),
        **common(draw),
    )
