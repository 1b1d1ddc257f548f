"""imagezmq ingress: an unmodified ``imagezmq.ImageSender(REQ_REP=False)`` -> bridge -> our
receiver, on real sockets. Raw (BGR ndarray) and JPEG frames; bad frames are counted."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import imagezmq
import numpy as np
import pytest
import zmq

from sensors.bridge import ImageZmqBridge, ImageZmqBridgeConfig, main
from sensors.transport import LosslessReader
from sensors.wire import Image
from tests.fakes import synthetic_frame


@contextmanager
def _sender() -> Iterator[tuple[imagezmq.ImageSender, str]]:
    sender = imagezmq.ImageSender(connect_to="tcp://127.0.0.1:*", REQ_REP=False)
    try:
        yield sender, sender.zmq_socket.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        sender.close()


@contextmanager
def _running(bridge: ImageZmqBridge) -> Iterator[threading.Event]:
    stop = threading.Event()
    t = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(timeout=5)


def _warm_up(send: object, reader: LosslessReader, timeout_s: float = 10.0) -> int:
    """Send warm-up frames until one comes out of the bridge (both slow joiners done);
    returns the seq of the last warm-up frame seen."""
    deadline = time.monotonic() + timeout_s
    frame = np.zeros((2, 2, 3), np.uint8)
    while time.monotonic() < deadline:
        send("warmup", frame)  # type: ignore[operator]
        got = reader.recv(timeout_ms=50)
        if got is not None:
            last = got[1].seq
            while (more := reader.recv(timeout_ms=100)) is not None:  # drain warm-ups in flight
                last = more[1].seq
            return last
    raise AssertionError("bridge never delivered a warm-up frame")


def _collect(reader: LosslessReader, n: int, timeout_s: float = 10.0) -> list[Image]:
    out: list[Image] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        got = reader.recv(timeout_ms=100)
        if got is not None and got[1].frame_id != "warmup":
            assert isinstance(got[1], Image)
            out.append(got[1])
    return out


def test_raw_and_jpeg_frames_from_an_unmodified_image_sender() -> None:
    frames = [synthetic_frame(24, 32, i) for i in range(4)]  # RGB
    with _sender() as (sender, ep):
        cfg = ImageZmqBridgeConfig(connect=[ep], publish="tcp://127.0.0.1:0", topic="camera")
        with (
            ImageZmqBridge(cfg) as bridge,
            LosslessReader(bridge.endpoint, ["camera"]) as reader,
            _running(bridge),
        ):
            last_warm = _warm_up(sender.send_image, reader)
            before = time.time_ns()
            for i, rgb in enumerate(frames[:2]):
                sender.send_image(f"raw{i}", np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV apps send BGR
            sender.send_image("grey", np.ascontiguousarray(frames[0][:, :, 0]))
            for i, rgb in enumerate(frames[2:]):
                ok, jpg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                assert ok
                sender.send_jpg(f"jpg{i}", jpg.tobytes())
            got = _collect(reader, 5)
    assert [m.frame_id for m in got] == ["raw0", "raw1", "grey", "jpg0", "jpg1"]
    assert [m.seq for m in got] == list(range(last_warm + 1, last_warm + 6))
    assert all(before <= m.stamp_ns <= time.time_ns() for m in got)
    for m, rgb in zip(got[:2], frames[:2], strict=True):
        assert m.encoding == "rgb8" and m.data.shape == (24, 32, 3)
        np.testing.assert_array_equal(m.data, rgb)  # raw: exact, BGR turned back into RGB
    assert got[2].encoding == "mono8" and got[2].data.shape == (24, 32, 1)
    np.testing.assert_array_equal(got[2].data[:, :, 0], frames[0][:, :, 0])
    for m, rgb in zip(got[3:], frames[2:], strict=True):
        assert m.encoding == "rgb8" and m.data.shape == (24, 32, 3)
        err = np.abs(m.data.astype(int) - rgb.astype(int)).mean()
        swapped = np.abs(m.data[:, :, ::-1].astype(int) - rgb.astype(int)).mean()
        assert err < 4 and swapped > 20  # JPEG q95 decoded to RGB, not left as BGR
    assert bridge.bad == {}


def test_keep_jpeg_forwards_the_exact_bytes() -> None:
    ok, jpg = cv2.imencode(".jpg", synthetic_frame(20, 30, 3))
    assert ok
    with _sender() as (sender, ep):
        cfg = ImageZmqBridgeConfig(connect=[ep], publish="tcp://127.0.0.1:0", keep_jpeg=True, topic="cam")
        with (
            ImageZmqBridge(cfg) as bridge,
            LosslessReader(bridge.endpoint, ["cam"]) as reader,
            _running(bridge),
        ):
            _warm_up(sender.send_image, reader)
            sender.send_jpg("j", jpg.tobytes())
            (m,) = _collect(reader, 1)
    assert (m.encoding, m.height, m.width) == ("jpeg", 20, 30)
    assert m.data.tobytes() == jpg.tobytes()


def test_bad_frames_are_counted_and_the_bridge_keeps_going() -> None:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    ok_meta = json.dumps({"msg": "ok", "dtype": "uint8", "shape": [2, 3, 3]}).encode()
    bad = [
        [b"only one frame"],
        [b"not json", b"x"],
        [b"[1, 2]", b"x"],
        [json.dumps({"msg": "f", "dtype": "float64", "shape": [2, 2]}).encode(), bytes(32)],
        [json.dumps({"msg": "s", "dtype": "uint8", "shape": [2, 2, 7]}).encode(), bytes(28)],
        [json.dumps({"msg": "n", "dtype": "uint8", "shape": [2, 3, 3]}).encode(), bytes(5)],
        [json.dumps({"msg": "j"}).encode(), b"not a jpeg"],
        [json.dumps({"msg": "j2"}).encode(), b"\xff\xd8\xff\xe0garbage"],
        [b"[" * 100_000, b"x"],
    ]
    try:
        cfg = ImageZmqBridgeConfig(connect=[f"tcp://127.0.0.1:{port}"], publish="tcp://127.0.0.1:0")
        with (
            ImageZmqBridge(cfg) as bridge,
            LosslessReader(bridge.endpoint, ["camera"]) as reader,
            _running(bridge),
        ):
            _warm_up(
                lambda msg, img: pub.send_multipart([ok_meta.replace(b'"ok"', b'"warmup"'), bytes(18)]),
                reader,
            )
            for frames in bad:
                pub.send_multipart(frames)
            pub.send_multipart([ok_meta, bytes(range(18))])
            (m,) = _collect(reader, 1)
    finally:
        pub.close(linger=0)
    assert m.frame_id == "ok" and m.data.shape == (2, 3, 3)
    np.testing.assert_array_equal(m.data, np.arange(18, dtype=np.uint8).reshape(2, 3, 3)[:, :, ::-1])
    assert dict(bridge.bad) == {
        "frame_count": 1,
        "metadata_json": 3,
        "dtype": 1,
        "shape": 1,
        "payload_size": 1,
        "jpeg": 1,
        "jpeg_decode": 1,
    }


def test_cli_main_bridges_until_max_frames(capsys: pytest.CaptureFixture[str]) -> None:
    with _sender() as (sender, ep):
        rc: list[int] = []
        argv = [
            "imagezmq",
            "--connect",
            ep,
            "--publish",
            "tcp://127.0.0.1:0",
            "--max-frames",
            "3",
            "--seconds",
            "20",
        ]
        t = threading.Thread(target=lambda: rc.append(main([*argv, "--log-level", "WARNING"])))
        t.start()
        deadline = time.monotonic() + 20
        while t.is_alive() and time.monotonic() < deadline:
            sender.send_image("f", np.zeros((4, 4, 3), np.uint8))
            t.join(timeout=0.05)
    assert rc == [0]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["published"] == 3 and summary["bad"] == {} and summary["topic"] == "camera"
