"""Recording and inspecting the demo publishers' real stream: the ground-truth side topic
(``truth``, not wire format) is skipped by name and reported apart, so nothing counts as invalid."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from demodata.publish import DatasetStreamer, StreamerConfig
from sensors.inspect import InspectConfig, inspect
from sensors.mcap_io import read_messages
from sensors.record import RecordConfig, record
from sensors.transport import Publisher


@pytest.fixture(scope="module")
def streamer() -> DatasetStreamer:
    return DatasetStreamer(StreamerConfig(endpoint="tcp://127.0.0.1:0", image_size=32, classes=[0, 1], dwell_s=0.5))


@contextmanager
def demo_stream(streamer: DatasetStreamer, subscribers: int) -> Iterator[tuple[str, Callable[[], None]]]:
    """The demo publishers on a free port; ``start()`` streams once ``subscribers`` have subscribed."""
    stop = threading.Event()
    with Publisher("tcp://127.0.0.1:0", sndhwm=0) as pub:
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(streamer.run(stop, publisher=pub)), daemon=True)

        def start() -> None:
            assert pub.wait_for_subscribers(subscribers, 10.0)
            t.start()

        try:
            yield pub.endpoint, start
        finally:
            stop.set()
            if t.is_alive():
                t.join(timeout=10)


def _run(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(result=fn()), daemon=True)
    t.start()
    return t, out


def test_recording_the_demo_publishers_counts_no_invalid_and_reports_truth_apart(
        streamer: DatasetStreamer, tmp_path: Path) -> None:
    out = tmp_path / "demo.mcap"
    with demo_stream(streamer, 1) as (endpoint, start):
        t, res = _run(lambda: record(RecordConfig(connect=[endpoint], out=str(out), seconds=2.0), threading.Event()))
        start()
        t.join(timeout=30)
    summary = res["result"]
    per_topic, skipped = summary["per_topic"], summary["skipped"]
    assert summary["invalid"] == {}  # was {"frame_count": <one per camera frame>}
    assert set(per_topic) == {"camera", "mic", "imu"} and per_topic["camera"] >= 20
    assert set(skipped) == {"truth"} and abs(skipped["truth"] - per_topic["camera"]) <= 1  # one per frame
    assert summary["overflow"] == {} and summary["drops"] == {}
    assert {t for t, _ in read_messages(out)} == {"camera", "mic", "imu"}  # truth is not in the recording


def test_inspecting_the_demo_publishers_reports_truth_as_skipped(streamer: DatasetStreamer) -> None:
    with demo_stream(streamer, 1) as (endpoint, start):
        t, res = _run(lambda: inspect(InspectConfig(connect=[endpoint], seconds=1.5), threading.Event()))
        start()
        t.join(timeout=30)
    result = res["result"]
    assert result["invalid"] == {} and result["skipped"]["truth"] >= 10
    assert {"camera", "mic", "imu"} <= set(result)


def test_skipping_can_be_turned_off_then_truth_is_invalid_again(streamer: DatasetStreamer, tmp_path: Path) -> None:
    with demo_stream(streamer, 1) as (endpoint, start):
        cfg = RecordConfig(connect=[endpoint], out=str(tmp_path / "x.mcap"), seconds=1.0, skip_topics=[])
        t, res = _run(lambda: record(cfg, threading.Event()))
        start()
        t.join(timeout=30)
    assert res["result"]["skipped"] == {} and res["result"]["invalid"]["frame_count"] >= 5
