"""Ingress bridges from other image transports into the continua wire format.

    python -m sensors.bridge imagezmq --connect tcp://raspberrypi:5555 --publish tcp://*:5556 --topic camera
    python -m sensors.bridge imagezmq --connect tcp://cam1:5555 --connect tcp://cam2:5555 --publish tcp://*:5556 --keep-jpeg

``imagezmq``: an unmodified ``imagezmq.ImageSender(connect_to="tcp://*:5555", REQ_REP=False)``
binds a PUB socket and sends two-frame messages (checked in imagezmq 1.2.0):

- ``send_image(msg, image)``: ``[json {"msg": str, "dtype": "uint8", "shape": [h, w(, c)]}, raw buffer]``
- ``send_jpg(msg, jpg)``:    ``[json {"msg": str}, jpeg bytes]``

The bridge subscribes to it, turns each frame into an ``Image`` (OpenCV frames are BGR: they
become rgb8 unless ``--no-to-rgb``; JPEGs are decoded to rgb8 with OpenCV unless
``--keep-jpeg``), stamps it on receipt (imagezmq carries no time), uses the imagezmq text
as ``frame_id`` and republishes it with our ``Publisher`` (which assigns sequence numbers).
Malformed frames are counted by reason and skipped: the bridge never crashes on input.
``curve_secret_key``/``curve_allow_dir`` put CurveZMQ on the republished side (``sensors.curve``).
REQ/REP senders (the imagezmq default) are not supported: they block on a reply per frame.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from sensors.cli import run_tool
from sensors.curve import CurveServerConfig
from sensors.errors import WireError
from sensors.jpeg import jpeg_size
from sensors.transport import Publisher
from sensors.wire import MAX_FRAME_ID, MAX_IMAGE_SIDE, Image

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ImageZmqBridgeConfig(CurveServerConfig):
    connect: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5555"])
    publish: str = "tcp://*:5556"
    topic: str = "camera"
    to_rgb: bool = True  # imagezmq/OpenCV raw frames are BGR; publish rgb8
    keep_jpeg: bool = False  # forward JPEGs as "jpeg" Images instead of decoding to rgb8
    frame_id: str = ""  # "" = the sender's imagezmq text message
    sndhwm: int = 100
    max_frame_bytes: int = 64 * 1024 * 1024
    max_frames: int = 0  # stop after this many published frames; 0 = no limit
    seconds: float = 0.0  # 0 = until a signal
    log_every_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.connect:
            raise ValueError("connect must list at least one imagezmq sender endpoint")
        if not self.topic:
            raise ValueError("topic must not be empty")
        if self.sndhwm < 0 or self.max_frames < 0 or self.seconds < 0:
            raise ValueError(
                f"sndhwm, max_frames and seconds must be >= 0, got {self.sndhwm}, {self.max_frames}, {self.seconds}"
            )
        if self.max_frame_bytes <= 0 or self.log_every_s <= 0:
            raise ValueError("max_frame_bytes and log_every_s must be > 0")


def _frame_bytes(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)
    return memoryview(buf if buf is not None else frame).cast("B")


class ImageZmqBridge:
    """imagezmq PUB sender(s) -> wire ``Image`` on our Publisher. Context manager; ``run``
    may be called on another thread than the one that built it."""

    def __init__(self, cfg: ImageZmqBridgeConfig, *, context: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self._cv2: Any = None
        if not cfg.keep_jpeg:
            try:
                import cv2

                self._cv2 = cv2
            except ImportError:
                log.warning(
                    "OpenCV missing (pip install 'continua-robot[imagezmq]'): JPEG frames are forwarded as jpeg"
                )
        ctx = context if context is not None else zmq.Context.instance()
        self.publisher = Publisher(cfg.publish, sndhwm=cfg.sndhwm, context=ctx,
                                   curve=cfg.curve_server())
        self.endpoint = self.publisher.endpoint
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.MAXMSGSIZE, cfg.max_frame_bytes + 65536)
        for ep in cfg.connect:
            sub.connect(ep)
        self._sub: zmq.Socket | None = sub
        self.received = 0
        self.published = 0
        self.bad: Counter[str] = Counter()

    # ------------------------------------------------------------------ conversion
    def convert(self, frames: list[Any]) -> Image:
        """One imagezmq message -> wire Image; raises ``WireError(reason)`` for a bad one."""
        if len(frames) != 2:
            raise WireError("frame_count", f"imagezmq messages have 2 frames, got {len(frames)}")
        meta_raw, buf = _frame_bytes(frames[0]), _frame_bytes(frames[1])
        try:
            meta = json.loads(bytes(meta_raw))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise WireError("metadata_json", "first frame is not JSON") from None
        if not isinstance(meta, dict):
            raise WireError("metadata_json", f"metadata must be a JSON object, got {type(meta).__name__}")
        text = meta.get("msg", "")
        frame_id = self.cfg.frame_id or (text if isinstance(text, str) else json.dumps(text))
        frame_id = frame_id.replace("\x00", "")[:MAX_FRAME_ID]
        stamp = time.time_ns()
        if "dtype" in meta or "shape" in meta:
            return self._raw(meta, buf, frame_id, stamp)
        return self._jpeg(buf, frame_id, stamp)

    def _raw(self, meta: dict[str, Any], buf: memoryview, frame_id: str, stamp: int) -> Image:
        if meta.get("dtype") != "uint8":
            raise WireError("dtype", f"only uint8 images are supported, got dtype {meta.get('dtype')!r}")
        shape = meta.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) not in (2, 3)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in shape)
            or not all(1 <= x <= MAX_IMAGE_SIDE for x in shape[:2])
            or (len(shape) == 3 and shape[2] not in (1, 3, 4))
        ):
            raise WireError(
                "shape", f"shape must be [h, w] or [h, w, 1|3|4] within {MAX_IMAGE_SIDE}, got {shape!r}"
            )
        need = int(np.prod(shape))
        if buf.nbytes != need:
            raise WireError("payload_size", f"{shape} uint8 needs {need} bytes, got {buf.nbytes}")
        arr = np.frombuffer(buf, dtype=np.uint8).reshape(shape)
        if arr.ndim == 2 or arr.shape[2] == 1:
            return Image(
                data=arr.reshape(shape[0], shape[1], 1), encoding="mono8", frame_id=frame_id, stamp_ns=stamp
            )
        bgr = arr[:, :, :3]
        if self.cfg.to_rgb:
            return Image(
                data=np.ascontiguousarray(bgr[:, :, ::-1]), encoding="rgb8", frame_id=frame_id, stamp_ns=stamp
            )
        return Image(data=np.ascontiguousarray(bgr), encoding="bgr8", frame_id=frame_id, stamp_ns=stamp)

    def _jpeg(self, buf: memoryview, frame_id: str, stamp: int) -> Image:
        data = np.frombuffer(buf, dtype=np.uint8)
        if data.size < 4 or data[0] != 0xFF or data[1] != 0xD8:
            raise WireError("jpeg", "payload without dtype/shape is not a JPEG (no SOI marker)")
        if self._cv2 is None:
            size = jpeg_size(buf)
            if size is None:
                raise WireError("jpeg", "JPEG has no SOF marker (height/width unknown)")
            return Image(
                data=data, encoding="jpeg", height=size[0], width=size[1], frame_id=frame_id, stamp_ns=stamp
            )
        bgr = self._cv2.imdecode(data, self._cv2.IMREAD_COLOR)
        if bgr is None:
            raise WireError("jpeg_decode", "OpenCV could not decode the JPEG")
        return Image(
            data=np.ascontiguousarray(bgr[:, :, ::-1]), encoding="rgb8", frame_id=frame_id, stamp_ns=stamp
        )

    # ------------------------------------------------------------------ loop
    def run(self, stop: threading.Event) -> dict[str, Any]:
        """Bridge until ``stop``, ``max_frames`` or ``seconds``; returns the summary."""
        sub = self._sub
        if sub is None:
            raise RuntimeError("bridge is closed")
        t0 = last_log = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if self.cfg.seconds and now - t0 >= self.cfg.seconds:
                break
            if now - last_log >= self.cfg.log_every_s:
                log.info(
                    "bridge: %d received, %d published, bad %s", self.received, self.published, dict(self.bad)
                )
                last_log = now
            if not sub.poll(100, zmq.POLLIN):
                continue
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            self.received += 1
            try:
                img = self.convert(frames)
                self.publisher.publish(self.cfg.topic, img)
            except WireError as exc:
                self.bad[exc.reason] += 1
                if self.bad[exc.reason] <= 3:
                    log.warning("bad imagezmq frame skipped: %s", exc)
                continue
            self.published += 1
            if self.cfg.max_frames and self.published >= self.cfg.max_frames:
                break
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "published": self.published,
            "bad": dict(self.bad),
            "topic": self.cfg.topic,
        }

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        self.publisher.close()

    def __enter__(self) -> ImageZmqBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensors.bridge", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("imagezmq", help="accept imagezmq ImageSender(REQ_REP=False) frames")
    p.add_argument("--connect", action="append", default=None, help="imagezmq sender endpoint (repeatable)")
    p.add_argument("--publish", default=None, help="our wire-format PUB endpoint")
    p.add_argument("--topic", default=None)
    p.add_argument("--to-rgb", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--keep-jpeg", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--frame-id", default=None)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    return run_tool(parser, argv, ImageZmqBridgeConfig, "bridge", _bridge, flags=p)


def _bridge(cfg: ImageZmqBridgeConfig, stop: threading.Event) -> dict[str, Any]:
    with ImageZmqBridge(cfg) as bridge:
        log.info("bridging imagezmq %s -> %s topic %r", cfg.connect, bridge.endpoint, cfg.topic)
        return bridge.run(stop)


if __name__ == "__main__":
    sys.exit(main())
