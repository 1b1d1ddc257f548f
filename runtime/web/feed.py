"""The web console's ZeroMQ side: what the agent says, turned into messages for browsers and Foxglove.

Three threads, each owning its sockets: predictions (SUB on the agent's predictions, every one
forwarded), camera thumbnails (the newest camera frame at most ``thumbnail_fps`` times a
second, downscaled and JPEG-encoded here, never in the agent) and status (the control socket,
``status_hz`` polls; ``tasks`` again when the model version changes). Commands from the page go
through the same control client, one at a time. Each thread publishes JSON text to a ``Hub``,
which keeps the newest message of each type (a page that connects sees everything at once) and
fans out to every browser through a bounded queue: a slow browser loses its oldest messages,
counted, and never slows the agent or the other browsers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections import Counter
from typing import Any

import msgpack
import numpy as np
import zmq

from common.threads import join_all, start_daemon
from runtime.console import ControlClient
from runtime.errors import ControlTimeoutError
from runtime.web.config import WebConfig
from runtime.web.plain import dumps
from sensors.curve import client_from
from sensors.errors import WireError
from sensors.jpeg import JpegDecoder
from sensors.receivers import LatestReceiver

log = logging.getLogger(__name__)
SNAPSHOT_ORDER = ("agent", "status", "tasks", "camera", "prediction")  # what a new page gets first
STATUS_KEYS = ("model_version", "classes", "tasks", "sensors", "latency_ms", "predictions", "job", "notices", "stale")


class Subscriber:
    """One browser: a bounded queue on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        self.dropped = 0

    def put(self, text: str) -> None:  # runs on the event loop
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(text)


class Hub:
    """Thread-safe fan-out of JSON messages to the browsers (and the newest of each type)."""

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._latest: dict[str, str] = {}
        self._subs: set[Subscriber] = set()
        self.published: Counter[str] = Counter()

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        text = dumps({"type": kind, **payload})
        with self._lock:
            self._latest[kind] = text
            subs = list(self._subs)
            self.published[kind] += 1
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub.put, text)
            except RuntimeError:  # its event loop has closed: the server is stopping
                self.unsubscribe(sub)

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Subscriber:
        sub = Subscriber(loop, self.queue_size)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subs.discard(sub)

    def snapshot(self) -> list[str]:
        with self._lock:
            return [self._latest[k] for k in SNAPSHOT_ORDER if k in self._latest]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"browsers": len(self._subs), "published": dict(self.published),
                    "dropped": sum(s.dropped for s in self._subs)}


class Thumbnailer:
    """Camera frames (rgb8, bgr8, mono8 or JPEG) to small JPEGs; OpenCV when installed, else Pillow."""

    def __init__(self, width: int, quality: int) -> None:
        self.width, self.quality = width, quality
        self._jpeg = JpegDecoder()
        try:
            import cv2

            self._cv2: Any = cv2
        except ImportError:
            self._cv2 = None

    def rgb(self, msg: Any) -> np.ndarray:
        if msg.encoding == "jpeg":
            return self._jpeg.decode(msg.data, msg.height, msg.width)
        data = np.asarray(msg.data)
        if msg.encoding == "mono8" or data.ndim == 2 or data.shape[-1] == 1:
            return np.repeat(data.reshape(data.shape[0], data.shape[1], 1), 3, axis=2)
        return data[..., ::-1] if msg.encoding == "bgr8" else data

    def encode(self, msg: Any) -> tuple[bytes, int, int]:
        """(JPEG bytes, height, width) of the thumbnail; ``WireError`` for a frame that cannot be read."""
        rgb = np.ascontiguousarray(self.rgb(msg))
        h, w = rgb.shape[:2]
        scale = min(1.0, self.width / max(w, 1))
        th, tw = max(1, round(h * scale)), max(1, round(w * scale))
        if self._cv2 is not None:
            cv2 = self._cv2
            small = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA) if scale < 1 else rgb
            ok, buf = cv2.imencode(".jpg", small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            if not ok:
                raise WireError("jpeg_decode", "OpenCV could not encode the thumbnail")
            return buf.tobytes(), th, tw
        import io

        from PIL import Image

        img = Image.fromarray(rgb)
        if scale < 1:
            img = img.resize((tw, th), Image.BILINEAR)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=self.quality)
        return out.getvalue(), th, tw


class Feed:
    """Owns the agent-facing sockets and threads of the web console."""

    def __init__(self, cfg: WebConfig, hub: Hub, foxglove: Any = None) -> None:
        self.cfg, self.hub, self.foxglove = cfg, hub, foxglove
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._control_lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._client = ControlClient(cfg.control, keys_dir=None if cfg.insecure else cfg.keys_dir,
                                     key_name=cfg.key_name, insecure=cfg.insecure, timeout_s=cfg.timeout_s,
                                     context=self._ctx)
        curve = client_from(cfg.curve_publisher_keys, cfg.curve_secret_key, cfg.sensors)
        self._camera = LatestReceiver(cfg.sensors, [cfg.camera_topic], context=self._ctx, curve=curve)
        self._thumbs = Thumbnailer(cfg.thumbnail_width, cfg.jpeg_quality)
        self._connected: bool | None = None
        self._tasks_key: tuple[Any, ...] | None = None  # (model version, task names) of the last tasks message

    def start(self) -> Feed:
        self._camera.start()
        self._threads += [start_daemon(self._predictions, "web-predictions"),
                          start_daemon(self._camera_loop, "web-camera"),
                          start_daemon(self._status_loop, "web-status")]
        return self

    def stop(self) -> None:
        self._stop.set()
        join_all(self._threads)
        self._camera.stop()
        with self._control_lock:
            self._client.close()
        self._ctx.term()

    # ------------------------------------------------------------------ commands
    def command(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        """The agent's whole reply map; a timeout becomes ``{"ok": false, "error": {"code": "timeout"}}``."""
        try:
            with self._control_lock:
                reply = self._client.call(cmd, args)
        except ControlTimeoutError as exc:
            self.counts["command_timeout"] += 1
            return {"ok": False, "error": {"code": "timeout", "message": str(exc)}}
        self.counts["commands" if reply.get("ok") else "command_errors"] += 1
        if cmd in ("learn-new-task", "rollback") and reply.get("ok"):
            self._poll_status()  # the page sees the job (or the rollback) at once
        return reply

    # ------------------------------------------------------------------ threads
    def _predictions(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.rcvhwm = 1000
        sock.setsockopt(zmq.SUBSCRIBE, b"prediction")
        sock.connect(self.cfg.predictions)
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart()
                try:
                    msg = msgpack.unpackb(frames[-1], raw=False)
                    if len(frames) != 2 or not isinstance(msg, dict) or not isinstance(msg.get("stamp_ns"), int):
                        raise ValueError("not a [b'prediction', map with stamp_ns] message")
                except Exception as exc:  # anything on the wire: count it, keep serving the page
                    self.counts["bad_prediction"] += 1
                    if self.counts["bad_prediction"] & (self.counts["bad_prediction"] - 1) == 0:
                        log.warning("bad prediction message skipped (%d so far): %s", self.counts["bad_prediction"], exc)
                    continue
                msg["stamp_ms"] = msg["stamp_ns"] / 1e6
                self.counts["predictions"] += 1
                self.hub.publish("prediction", msg)
                if self.foxglove is not None:
                    self.foxglove.prediction(msg)
                    if isinstance(msg.get("latency_ms"), int | float):
                        self.foxglove.latency(float(msg["latency_ms"]), msg["stamp_ns"])
        finally:
            sock.close(0)

    def _camera_loop(self) -> None:
        period = 1.0 / self.cfg.thumbnail_fps
        last_seq: int | None = None
        while not self._stop.is_set():
            t0 = time.monotonic()
            msg = self._camera.wait_for(self.cfg.camera_topic, timeout_s=0.5, newer_than_seq=last_seq)
            if msg is None:
                continue
            last_seq = msg.seq
            try:
                jpeg, h, w = self._thumbs.encode(msg)
            except (WireError, ValueError) as exc:
                self.counts["bad_camera_frame"] += 1
                log.debug("camera frame skipped: %s", exc)
                continue
            self.counts["thumbnails"] += 1
            self.hub.publish("camera", {"jpeg": base64.b64encode(jpeg).decode(), "stamp_ms": msg.stamp_ns / 1e6,
                                        "width": w, "height": h})
            if self.foxglove is not None:
                self.foxglove.camera(jpeg, msg.stamp_ns, msg.frame_id or "camera")
            self._stop.wait(max(0.0, period - (time.monotonic() - t0)))

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            job_running = self._poll_status()
            rate = self.cfg.status_hz * (2 if job_running else 1)  # job progress a little smoother
            self._stop.wait(1.0 / rate)

    def _poll_status(self) -> bool:
        """One status (and tasks when it changed) to the hub; True while a job runs."""
        reply = self.command_quiet("status")
        if reply is None:
            return False
        status = {k: reply.get(k) for k in STATUS_KEYS}
        self.hub.publish("status", status)
        key = (status["model_version"], tuple(status["tasks"] or ()))
        if key != self._tasks_key:
            tasks = self.command_quiet("tasks")
            if tasks is not None:
                self.hub.publish("tasks", {"tasks": tasks.get("tasks", [])})
                self._tasks_key = key
        if self.foxglove is not None and isinstance(status.get("sensors"), dict):
            self.foxglove.health(status["sensors"], time.time_ns())
        job = status.get("job") or {}
        return job.get("state") == "running"

    def command_quiet(self, cmd: str) -> dict[str, Any] | None:
        """A read-only request for the feed; reachability goes to the hub as an ``agent`` message."""
        reply = self.command(cmd, {})
        connected, error = bool(reply.get("ok")), None
        if not connected:
            err = reply.get("error") or {}
            error = f"{err.get('code')}: {err.get('message')}"
        if connected != self._connected or error:
            if connected != self._connected:
                log.log(logging.INFO if connected else logging.WARNING, "agent %s%s", self.cfg.control,
                        " reachable" if connected else f" unreachable: {error}")
            self._connected = connected
            self.hub.publish("agent", {"connected": connected, "error": error, "endpoint": self.cfg.control})
        return reply.get("result") if connected else None

    def stats(self) -> dict[str, Any]:
        return {**dict(self.counts), "hub": self.hub.stats()}
