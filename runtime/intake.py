"""Sensor intake of the agent: every message in, the newest camera frame out.

Why lossless here and "newest" at the output: audio and IMU come in small chunks, and their
taps need every chunk (a dropped chunk is a hole in the window), while camera frames are whole
samples and inference only ever wants the newest one. So one thread reads everything from the
sensor sockets (``LosslessReader``), hands audio and IMU messages to their tap streams
(``runtime.streams``: incremental taps computed in their own threads), keeps only the newest
camera frame and wakes the serving loop on it (``wait_frame``: event driven, no polling), and
tracks when each modality was last heard from. A modality silent for ``stale_s`` is reported
stale and left out of predictions (its learned "absent" token takes its place), so a dead
sensor degrades the prediction instead of stopping it.

Bounded in bytes: each endpoint's reader holds at most ``queue_bytes`` (oldest dropped and
counted in ``overflow``) and ZeroMQ at most ``queue_bytes`` more (its HWM is derived from
``queue_bytes // max_message_bytes``; a full queue pushes back on the publisher, whose drops
show as ``drops``). JPEG camera frames (``encoding = "jpeg"``) are checked against
``max_jpeg_bytes``/``max_jpeg_pixels`` on arrival and decoded by a thread of their own, newest
first (a frame superseded before its turn is never decoded), so the serving thread never
decodes and a decode never holds up audio and IMU. Unusable messages are counted in
``rejected`` as ``<modality>:<reason>`` with ``REJECT_REASONS`` (docs/wire.md lists them).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zmq

from common.threads import join_all, start_daemon
from sensors.curve import client_from
from sensors.errors import WireError
from sensors.jpeg import DECODERS, JPEG_REASONS, JpegDecoder
from sensors.transport import LosslessReader
from sensors.wire import Audio, Image, Imu

log = logging.getLogger(__name__)

MODALITIES = ("image", "audio", "imu")
# What the intake counts in ``rejected`` (well-formed on the wire, unusable here), besides JPEG_REASONS.
REJECT_REASONS: dict[str, str] = {
    "wrong_kind": "the topic's modality got another kind of message (an imu message on the camera topic)",
    "unusable": "the right kind, but not what the backbone takes (audio not 16 kHz mono, a bad IMU batch)",
    **JPEG_REASONS,
}


@dataclass(kw_only=True)
class IntakeConfig:
    """The agent's sensor intake. ``endpoints``, ``stale_s`` and the topics come from the agent's
    ``[agent]``/``[serve]`` tables; the rest from an optional ``[intake]`` table."""

    endpoints: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5556"])
    camera_topic: str = "camera"
    mic_topic: str = "mic"
    imu_topic: str = "imu"
    stale_s: float = 1.0
    # per endpoint: the reader's own queue holds at most queue_bytes (oldest dropped, counted in
    # "overflow"); ZeroMQ queues at most rcvhwm messages of at most max_message_bytes each ahead of it
    queue_bytes: int = 64 << 20
    max_message_bytes: int = 16 << 20  # a larger message is dropped unread (invalid "message_size")
    rcvhwm: int = 0  # 0 = queue_bytes // max_message_bytes
    # malformed messages handled per second and endpoint at most; beyond it the endpoint is paused and
    # its queue pushes back on the sender: a flood costs a bounded share of a core (3,000 junk/s on
    # one endpoint: p99 28 -> 33 ms) and never delays the other endpoints
    max_invalid_hz: float = 2000.0
    max_jpeg_bytes: int = 8 << 20  # compressed camera frames above this are rejected unread
    max_jpeg_pixels: int = 3840 * 2160  # and those whose SOF declares more pixels, before decoding
    jpeg_decoder: str = "auto"  # "auto" (OpenCV, else Pillow) | "opencv" | "pillow"
    # CurveZMQ (sensors.curve), off when empty: endpoint -> the publisher public key file(s) accepted there
    curve_publisher_keys: dict[str, Any] = field(default_factory=dict)
    curve_secret_key: str = ""  # the intake's own key pair ("" = a fresh one per start)

    def __post_init__(self) -> None:
        if self.stale_s <= 0:
            raise ValueError(f"stale_s must be > 0, got {self.stale_s}")
        if not self.endpoints:
            raise ValueError("endpoints must name at least one sensor endpoint")
        if self.queue_bytes <= 0 or not 0 < self.max_message_bytes <= self.queue_bytes:
            raise ValueError(f"need 0 < max_message_bytes ({self.max_message_bytes}) <= queue_bytes "
                             f"({self.queue_bytes})")
        for name in ("rcvhwm", "max_invalid_hz"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.max_jpeg_bytes <= 0 or self.max_jpeg_pixels <= 0:
            raise ValueError(f"max_jpeg_bytes and max_jpeg_pixels must be > 0, got {self.max_jpeg_bytes}, "
                             f"{self.max_jpeg_pixels}")
        if self.jpeg_decoder not in DECODERS:
            raise ValueError(f"jpeg_decoder={self.jpeg_decoder!r} must be one of {DECODERS}")
        if self.curve_publisher_keys:
            unknown = sorted(set(self.curve_publisher_keys) - set(self.endpoints))
            missing = sorted(set(self.endpoints) - set(self.curve_publisher_keys))
            if unknown or missing:
                raise ValueError(f"curve_publisher_keys must name exactly the sensor endpoints {self.endpoints}: "
                                 f"missing {missing}, unknown {unknown}")
        elif self.curve_secret_key:
            raise ValueError("curve_secret_key needs curve_publisher_keys (endpoint -> publisher key file)")


@dataclass(kw_only=True)
class Sample:
    """One fused sample: the newest camera frame plus the latest audio and IMU windows."""

    stamp_ns: int  # sensor stamp of the newest data in the sample (latency is measured from it)
    image: np.ndarray | None  # (H, W, 3) uint8 RGB
    audio: np.ndarray | None  # (16000,) float32
    imu: np.ndarray | None  # (6, 100) float32: acc xyz, gyro xyz
    frame_seq: int = -1
    frame_stamp_ns: int = 0  # camera stamp (matches the demo's truth topic)

    @property
    def present(self) -> dict[str, bool]:
        return {"image": self.image is not None, "audio": self.audio is not None, "imu": self.imu is not None}


@dataclass(frozen=True)
class Frame:
    """The newest camera frame: rgb8 pixels (own copy), sequence number, sensor stamp."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    seq: int
    stamp_ns: int
    rx_ns: int = 0  # wall clock when the intake received it


@dataclass
class ModalityHealth:
    healthy: bool
    age_s: float | None
    messages: int


class _Rejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SensorIntake:
    """Owns the receive thread (and the JPEG decode thread); thread-safe ``wait_frame()`` and ``health()``."""

    def __init__(self, cfg: IntakeConfig, context: zmq.Context | None = None, *, audio: Any = None,
                 imu: Any = None) -> None:
        """``audio``/``imu``: tap streams (``runtime.streams``) that get every message of their topic."""
        self.cfg = cfg
        self._ctx = context
        self._topic_of = {cfg.camera_topic: "image", cfg.mic_topic: "audio", cfg.imu_topic: "imu"}
        self._streams = {"audio": audio, "imu": imu}
        self._curve = client_from(cfg.curve_publisher_keys, cfg.curve_secret_key, cfg.endpoints)
        self._jpeg = JpegDecoder(max_bytes=cfg.max_jpeg_bytes, max_pixels=cfg.max_jpeg_pixels, backend=cfg.jpeg_decoder)
        self._lock = threading.Lock()
        self._frame: Image | None = None
        self._frame_rx_ns = 0
        self._frame_new = threading.Condition(self._lock)
        self._jpeg_in: tuple[Image, int] | None = None  # newest JPEG frame waiting for the decoder
        self._jpeg_new = threading.Condition(self._lock)
        self._jpeg_counts = {"decoded": 0, "superseded": 0}
        self._last_rx: dict[str, float] = {}
        self._last_stamp: dict[str, int] = {}
        self._counts: dict[str, int] = dict.fromkeys(MODALITIES, 0)
        self._rejected: dict[str, int] = {}  # "<modality>:<reason>" -> count
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._readers: list[_Paced] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SensorIntake:
        # One socket per endpoint, each with its own budget for invalid messages: a sensor (or an
        # attacker) flooding junk on one endpoint is paused, the others keep flowing. With one
        # socket for all, camera frames queued behind the junk (p99 +45 ms under 3,000 junk/s).
        cfg = self.cfg
        for ep in cfg.endpoints:
            reader = LosslessReader(ep, list(self._topic_of), context=self._ctx, rcvhwm=cfg.rcvhwm or None,
                                    max_bytes=cfg.queue_bytes, max_message_bytes=cfg.max_message_bytes,
                                    curve=self._curve)
            self._readers.append(_Paced(reader, cfg.max_invalid_hz))
        self._threads += [start_daemon(self._run, "intake"), start_daemon(self._decode_jpegs, "intake-jpeg")]
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._frame_new.notify_all()
            self._jpeg_new.notify_all()
        join_all(self._threads)
        for r in self._readers:
            r.reader.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            active = [r for r in self._readers if r.paused_until <= now]
            wait_ms = 100 if len(active) == len(self._readers) else max(1, int(
                1000 * (min(r.paused_until for r in self._readers) - now)) + 1)
            if not active:
                time.sleep(min(wait_ms, 100) / 1000)
                continue
            # a reader may already hold messages in its own queue: then do not wait on its socket
            timeout = 0 if any(r.reader.pending for r in active) else min(wait_ms, 100)
            poller = zmq.Poller()
            for r in active:
                poller.register(r.reader.socket, zmq.POLLIN)
            ready = {sock for sock, _ in poller.poll(timeout)}
            for r in active:
                if r.reader.pending or r.reader.socket in ready:
                    self._drain(r)

    def _drain(self, r: _Paced, burst: int = 32) -> None:
        """Up to ``burst`` messages of one endpoint; stops early when its junk budget is spent."""
        for _ in range(burst):
            before = r.reader.invalid_total
            got = r.reader.recv(timeout_ms=0)
            if r.spend(r.reader.invalid_total - before):
                return
            if got is None:
                if r.reader.invalid_total == before:
                    return  # nothing queued
                continue
            topic, msg, rx_ns = got
            modality = self._topic_of.get(topic)
            if modality is None:
                continue
            try:
                self._ingest(modality, msg, rx_ns)
            except _Rejected as exc:
                self._reject(modality, exc.reason, topic, exc)
            except TypeError as exc:  # a tap stream refusing the kind
                self._reject(modality, "wrong_kind", topic, exc)
            except ValueError as exc:  # a tap stream refusing the format (rate, channels, batch)
                self._reject(modality, "unusable", topic, exc)

    def _reject(self, modality: str, reason: str, topic: str, exc: Exception) -> None:
        key = f"{modality}:{reason}"
        with self._lock:
            n = self._rejected[key] = self._rejected.get(key, 0) + 1
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th...: a flood of them does not flood the log
            log.warning("dropping %s message on %r (%s, %d so far): %s", modality, topic, reason, n, exc)

    def _ingest(self, modality: str, msg: Image | Audio | Imu, rx_ns: int = 0) -> None:
        now = time.monotonic()
        if modality == "image":
            if not isinstance(msg, Image):
                raise _Rejected("wrong_kind", f"camera topic needs an image, got {type(msg).__name__}")
            if msg.encoding == "jpeg":
                try:
                    self._jpeg.check(msg.data, msg.height, msg.width)  # microseconds: markers only
                except WireError as exc:
                    raise _Rejected(exc.reason, exc.detail) from None
                with self._lock:
                    if self._jpeg_in is not None:
                        self._jpeg_counts["superseded"] += 1
                    self._jpeg_in = (msg, rx_ns)
                    self._record(modality, now, msg.stamp_ns)
                    self._jpeg_new.notify()
                return
            with self._lock:
                self._frame, self._frame_rx_ns = msg, rx_ns
                self._record(modality, now, msg.stamp_ns)
                self._frame_new.notify_all()
            return
        stream = self._streams[modality]
        if stream is not None:
            stream.put(msg)  # ValueError/TypeError: counted as rejected by the caller
        elif modality == "audio" and not isinstance(msg, Audio) or modality == "imu" and not isinstance(msg, Imu):
            raise _Rejected("wrong_kind", f"{modality} topic got a {type(msg).__name__}")
        stamp = int(msg.stamps_ns[-1]) if isinstance(msg, Imu) else msg.stamp_ns
        with self._lock:
            self._record(modality, now, stamp)

    def _decode_jpegs(self) -> None:
        """Decode the newest waiting JPEG frame, then publish it as the newest frame."""
        while not self._stop.is_set():
            with self._lock:
                while self._jpeg_in is None and not self._stop.is_set():
                    self._jpeg_new.wait(0.5)
                if self._jpeg_in is None:
                    return
                (msg, rx_ns), self._jpeg_in = self._jpeg_in, None
            try:
                rgb = self._jpeg.decode(msg.data, msg.height, msg.width)  # GIL released in OpenCV/Pillow
            except WireError as exc:
                self._reject("image", exc.reason, self.cfg.camera_topic, exc)
                continue
            frame = Image(data=rgb, encoding="rgb8", seq=msg.seq, stamp_ns=msg.stamp_ns, frame_id=msg.frame_id,
                          session=msg.session)
            with self._lock:
                self._jpeg_counts["decoded"] += 1
                if self._frame is None or rx_ns >= self._frame_rx_ns:  # a raw frame may have come since
                    self._frame, self._frame_rx_ns = frame, rx_ns
                    self._frame_new.notify_all()

    def _record(self, modality: str, now: float, stamp_ns: int) -> None:
        self._last_rx[modality] = now
        self._last_stamp[modality] = stamp_ns
        self._counts[modality] += 1

    # ------------------------------------------------------------------ queries
    def _fresh(self, modality: str, now: float) -> bool:
        t = self._last_rx.get(modality)
        return t is not None and now - t <= self.cfg.stale_s

    def fresh(self, modality: str) -> bool:
        with self._lock:
            return self._fresh(modality, time.monotonic())

    def last_stamp(self, modality: str) -> int | None:
        with self._lock:
            return self._last_stamp.get(modality)

    def wait_frame(self, after_seq: int, timeout_s: float) -> Frame | None:
        """The newest fresh camera frame other than ``after_seq``, waiting up to ``timeout_s``
        for one to arrive (woken by the intake thread); None on timeout or when stopping."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not self._stop.is_set():
                f = self._frame
                if f is not None and f.seq != after_seq and self._fresh("image", time.monotonic()):
                    return Frame(image=_to_rgb(f), seq=f.seq, stamp_ns=f.stamp_ns, rx_ns=self._frame_rx_ns)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._frame_new.wait(remaining)
        return None

    def health(self) -> dict[str, ModalityHealth]:
        now = time.monotonic()
        with self._lock:
            return {
                m: ModalityHealth(
                    healthy=self._fresh(m, now),
                    age_s=None if m not in self._last_rx else round(now - self._last_rx[m], 3),
                    messages=self._counts[m],
                )
                for m in MODALITIES
            }

    def reader_stats(self) -> dict:
        """Receive counters summed over the endpoints (``paused``: times an endpoint's junk budget ran out;
        ``overflow``: dropped oldest at ``queue_bytes``; ``peak_queued_bytes``: the most one endpoint held)."""
        stats: dict[str, Any] = {}
        for r in self._readers:
            for key, value in asdict(r.reader.stats()).items():
                if isinstance(value, dict):
                    into = stats.setdefault(key, {})
                    for k, v in value.items():
                        into[k] = max(into.get(k, 0), v) if key in ("last_rx_ns", "rate_hz") else into.get(k, 0) + v
                else:
                    stats[key] = max(stats.get(key, 0), value) if key.startswith("peak") else stats.get(key, 0) + value
        with self._lock:
            stats["rejected"] = dict(self._rejected)
            stats["jpeg"] = dict(self._jpeg_counts)
        stats["paused"] = sum(r.pauses for r in self._readers)
        stats["queue_bytes"] = self.cfg.queue_bytes
        return stats


class _Paced:
    """One endpoint's reader and its token bucket for invalid messages (``max_invalid_hz``)."""

    def __init__(self, reader: LosslessReader, rate_hz: float) -> None:
        self.reader, self.rate = reader, rate_hz
        self.tokens, self.t = rate_hz / 10, time.monotonic()
        self.paused_until, self.pauses = 0.0, 0

    def spend(self, invalid: int) -> bool:
        """Account ``invalid`` new junk messages; True when the endpoint must pause (budget spent)."""
        if not invalid or not self.rate:
            return False
        now = time.monotonic()
        self.tokens = min(self.rate / 10, self.tokens + (now - self.t) * self.rate) - invalid
        self.t = now
        if self.tokens >= 0:
            return False
        self.paused_until = now - self.tokens / self.rate
        self.pauses += 1
        return True


def _to_rgb(msg: Image) -> np.ndarray:
    if msg.encoding == "rgb8":
        return np.array(msg.data)  # own copy: the caller may keep it beyond the next frame
    if msg.encoding == "bgr8":
        return np.ascontiguousarray(msg.data[:, :, ::-1])
    return np.repeat(msg.data, 3, axis=2)
