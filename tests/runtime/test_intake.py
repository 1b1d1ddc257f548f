"""The agent's sensor intake on real sockets (127.0.0.1): JPEG frames decoded with bounded cost,
unusable messages counted by stable reason codes, the receive queues bounded in bytes under a
flood of big frames, and publishers written from the header fields alone (no ``session``)."""

from __future__ import annotations

import functools
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from PIL import Image as PILImage

from runtime.intake import IntakeConfig, SensorIntake
from sensors.transport import Publisher
from sensors.wire import Audio, Image, Imu
from tests.conftest import wait_for as _wait_for

TIMEOUT_S = 10.0


@contextmanager
def running(cfg: IntakeConfig, ctx: zmq.Context, **streams: Any) -> Iterator[SensorIntake]:
    intake = SensorIntake(cfg, ctx, **streams).start()
    try:
        yield intake
    finally:
        intake.stop()


wait_for = functools.partial(_wait_for, timeout_s=TIMEOUT_S)


def gradient(h: int, w: int) -> np.ndarray:
    """A smooth RGB test picture (JPEG keeps it within a few grey levels)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 255 // (h + w - 2)],
                    axis=2).astype(np.uint8)


def pillow_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def jpeg_image(data: bytes, h: int, w: int) -> Image:
    return Image(data=np.frombuffer(data, np.uint8), encoding="jpeg", height=h, width=w)


# --------------------------------------------------------------------------- JPEG
@pytest.mark.parametrize("decoder", ["opencv", "pillow"])
def test_jpeg_frames_through_zeromq_are_decoded_to_rgb(ctx: zmq.Context, decoder: str) -> None:
    rgb = gradient(120, 160)
    data = pillow_jpeg(rgb)
    with Publisher("tcp://127.0.0.1:0", context=ctx) as pub, \
            running(IntakeConfig(endpoints=[pub.endpoint], jpeg_decoder=decoder), ctx) as intake:
        assert pub.wait_for_subscribers(3, TIMEOUT_S)
        seq = pub.publish("camera", jpeg_image(data, 120, 160))
        frame = intake.wait_frame(after_seq=-1, timeout_s=TIMEOUT_S)
        assert frame is not None and frame.seq == seq and frame.image.shape == (120, 160, 3)
        assert frame.image.dtype == np.uint8 and frame.image.flags.writeable
        assert np.abs(frame.image.astype(int) - rgb).mean() < 3.0  # JPEG is lossy, the picture is RGB
        stats = intake.reader_stats()
        assert stats["jpeg"]["decoded"] == 1 and stats["rejected"] == {} and stats["invalid"] == {}
        assert intake.health()["image"].messages == 1


def test_bad_jpegs_are_counted_by_reason_and_good_frames_still_arrive(ctx: zmq.Context) -> None:
    rng = np.random.default_rng(0)
    big = pillow_jpeg(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))  # noise: ~40 kB
    wide = pillow_jpeg(gradient(80, 80), quality=20)  # small file, 6,400 pixels
    ok = pillow_jpeg(gradient(32, 32))
    sos = ok.index(b"\xff\xda")
    cases = {
        "jpeg_bytes": jpeg_image(big, 128, 128),
        "jpeg_pixels": jpeg_image(wide, 80, 80),
        "jpeg_header": jpeg_image(ok, 16, 16),  # the header's size is not the JPEG's
        "jpeg_decode": jpeg_image(ok[: sos + 40], 32, 32),  # truncated after the markers
    }
    no_sof = jpeg_image(b"\xff\xd8" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)), 32, 32)
    cfg = IntakeConfig(max_jpeg_bytes=len(big) - 1, max_jpeg_pixels=64 * 64)
    assert len(wide) < cfg.max_jpeg_bytes
    with Publisher("tcp://127.0.0.1:0", context=ctx) as pub, \
            running(IntakeConfig(**{**vars(cfg), "endpoints": [pub.endpoint]}), ctx) as intake:
        assert pub.wait_for_subscribers(3, TIMEOUT_S)
        for msg in (*cases.values(), no_sof):
            pub.publish("camera", msg)
            time.sleep(0.05)  # one at a time: the decoder decodes the newest, and these must all be tried
        want = {f"image:{r}": 1 for r in cases} | {"image:jpeg_header": 2}
        wait_for(lambda: intake.reader_stats()["rejected"] == want, f"rejections {want}")
        assert intake.wait_frame(after_seq=-1, timeout_s=0.2) is None  # nothing usable yet
        seq = pub.publish("camera", jpeg_image(ok, 32, 32))
        frame = intake.wait_frame(after_seq=-1, timeout_s=TIMEOUT_S)
        assert frame is not None and frame.seq == seq and frame.image.shape == (32, 32, 3)
        assert intake.reader_stats()["invalid"] == {}


def test_the_imagezmq_bridge_keeping_jpegs_feeds_the_intake(ctx: zmq.Context) -> None:
    imagezmq = pytest.importorskip("imagezmq")
    from sensors.bridge import ImageZmqBridge, ImageZmqBridgeConfig

    rgb = gradient(60, 80)
    data = pillow_jpeg(rgb)
    sender = imagezmq.ImageSender(connect_to="tcp://127.0.0.1:*", REQ_REP=False)
    src = sender.zmq_socket.getsockopt_string(zmq.LAST_ENDPOINT)
    stop = threading.Event()
    bcfg = ImageZmqBridgeConfig(connect=[src], publish="tcp://127.0.0.1:0", keep_jpeg=True)
    try:
        with ImageZmqBridge(bcfg, context=ctx) as bridge, \
                running(IntakeConfig(endpoints=[bridge.endpoint]), ctx) as intake:
            t = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
            t.start()
            assert bridge.publisher.wait_for_subscribers(3, TIMEOUT_S)

            def delivered() -> Any:
                sender.send_jpg("cam0", data)  # the bridge's own SUB is a slow joiner too: resend
                return intake.wait_frame(after_seq=-1, timeout_s=0.2)

            frame = wait_for(delivered, "a JPEG frame through the bridge")
            assert frame.image.shape == (60, 80, 3) and np.abs(frame.image.astype(int) - rgb).mean() < 3.0
            assert intake.reader_stats()["rejected"] == {}
            stop.set()
            t.join(timeout=5)
    finally:
        stop.set()
        sender.close()


# --------------------------------------------------------------------------- other rejections
def test_unusable_messages_are_counted_by_stable_codes(ctx: zmq.Context) -> None:
    imu = Imu(stamps_ns=np.array([1], np.int64), values=np.zeros((1, 10)))
    with Publisher("tcp://127.0.0.1:0", context=ctx) as pub, \
            running(IntakeConfig(endpoints=[pub.endpoint]), ctx) as intake:
        assert pub.wait_for_subscribers(3, TIMEOUT_S)
        pub.publish("camera", imu)  # an IMU batch on the camera topic
        pub.publish("mic", Image(data=np.zeros((2, 2, 3), np.uint8)))
        pub.publish("imu", Audio(data=np.zeros((4, 1), np.int16)))
        want = {"image:wrong_kind": 1, "audio:wrong_kind": 1, "imu:wrong_kind": 1}
        wait_for(lambda: intake.reader_stats()["rejected"] == want, f"rejections {want}")


# --------------------------------------------------------------------------- bounded in bytes
class _Gate:
    """A tap stream whose put() holds the intake thread until released: a stalled intake."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def put(self, msg: Audio) -> None:
        self.entered.set()
        self.release.wait(60)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_flood_of_big_frames_at_a_stalled_intake_stays_within_its_byte_budget(ctx: zmq.Context) -> None:
    frame = np.full((480, 640, 3), 7, np.uint8)  # 0.92 MB; zero-copy sends share this one buffer
    n = 300  # 276 MB if the intake queued them all (the old 10,000-message HWM did)
    cfg = dict(queue_bytes=4 << 20, max_message_bytes=1 << 20)  # ZeroMQ may hold 4 messages
    gate = _Gate()
    with Publisher("tcp://127.0.0.1:0", context=ctx, sndhwm=2) as pub, \
            running(IntakeConfig(endpoints=[pub.endpoint], **cfg), ctx, audio=gate) as intake:
        try:
            assert pub.wait_for_subscribers(3, TIMEOUT_S)
            pub.publish("mic", Audio(data=np.zeros((320, 1), np.int16)))
            assert gate.entered.wait(TIMEOUT_S)  # the intake thread is now stuck in put()
            rss0 = _rss_bytes()
            for _ in range(n):
                pub.publish("camera", Image(data=frame))
                time.sleep(0.001)  # let TCP carry what the receiver's queues take
            time.sleep(0.5)
            grown = _rss_bytes() - rss0
        finally:
            gate.release.set()
        counts = [-1]

        def settled() -> bool:  # what was held during the stall has come through
            time.sleep(0.3)
            now = intake.reader_stats()["received"].get("camera", 0)
            done, counts[0] = now == counts[0], now
            return done

        wait_for(settled, "the intake to drain what it held")
        held = counts[0]
        sent: list[int] = []

        def newest_arrived() -> bool:  # the publisher's queue may be full for a moment: publish again
            sent.append(pub.publish("camera", Image(data=frame)))
            end = time.monotonic() + 2.0  # a loaded machine may take more than one short wait to carry it
            while time.monotonic() < end:
                f = intake.wait_frame(-1, 0.2)
                if f is not None and f.seq == sent[-1]:
                    return True
            return False

        wait_for(newest_arrived, "the newest frame after the stall")
        last = sent[-1]
        st = intake.reader_stats()
    received, drops = st["received"]["camera"], st["drops"].get("camera", 0)
    assert grown < 64 << 20, f"the stalled intake grew by {grown / 1e6:.0f} MB"
    # what was held while stalled: ZeroMQ's 4 + the kernel's TCP buffers + the publisher's 2
    assert held <= 40, held
    assert received + drops == last + 1 and drops >= n - 40  # every frame received or counted as dropped
    assert st["peak_queued_bytes"] <= cfg["queue_bytes"] and st["queue_bytes"] == cfg["queue_bytes"]


def test_intake_config_derives_a_byte_bounded_hwm_and_checks_its_fields() -> None:
    from sensors.receivers import derived_hwm

    assert derived_hwm(IntakeConfig().queue_bytes, IntakeConfig().max_message_bytes) == 4
    with pytest.raises(ValueError, match="max_message_bytes"):
        IntakeConfig(queue_bytes=1 << 20, max_message_bytes=2 << 20)
    with pytest.raises(ValueError, match="jpeg_decoder"):
        IntakeConfig(jpeg_decoder="turbo")
    with pytest.raises(ValueError, match="curve_publisher_keys"):
        IntakeConfig(endpoints=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"],
                     curve_publisher_keys={"tcp://127.0.0.1:1": "k"})


# --------------------------------------------------------------------------- publishers without a session
def test_a_hand_built_publisher_without_session_feeds_the_intake_and_its_restart_is_seen(ctx: zmq.Context) -> None:
    """A publisher written from docs/wire.md with plain pyzmq + msgpack, no ``session``."""
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    pixels = gradient(4, 6)

    def send(seq: int) -> None:
        header = {"v": 1, "kind": "image", "seq": seq, "stamp_ns": time.time_ns(), "frame_id": "cam",
                  "height": 4, "width": 6, "encoding": "rgb8", "step": 18}
        sock.send_multipart([b"camera", msgpack.packb(header), pixels.tobytes()])

    try:
        with running(IntakeConfig(endpoints=[endpoint]), ctx) as intake:
            subs: set[bytes] = set()
            deadline = time.monotonic() + TIMEOUT_S
            while len(subs) < 3 and time.monotonic() < deadline:
                if sock.poll(100):
                    subs.add(sock.recv())
            assert len(subs) == 3
            for seq in (0, 1, 2, 3, 0, 1):  # ... restarted
                send(seq)
                time.sleep(0.01)
            wait_for(lambda: intake.reader_stats()["received"].get("camera") == 6, "6 frames")
            st = intake.reader_stats()
            assert st["restarts"] == {"camera": 1} and st["drops"] == {} and st["invalid"] == {}
            frame = intake.wait_frame(after_seq=-1, timeout_s=TIMEOUT_S)
            assert frame is not None and frame.seq == 1 and np.array_equal(frame.image, pixels)
    finally:
        sock.close(linger=0)
