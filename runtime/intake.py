"""Sensor intake of the agent: every message in, the newest sample out.

Why lossless here and "newest" at the output: audio and IMU come in small chunks, and a
1 s window needs every chunk (a dropped chunk is a hole in the window), while camera
frames are whole samples, and inference only ever wants the newest one. So one thread reads
everything from the sensor sockets (``LosslessReader``), appends audio and IMU chunks to
bounded ``StreamWindow`` rings, keeps only the newest camera frame, and tracks when each
modality was last heard from; the inference loop asks for a ``Sample`` whenever it is free.
A modality that has been silent for ``stale_s`` is reported stale and left out of the
sample (its learned "absent" token takes its place), so a dead sensor degrades the
prediction instead of stopping it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from sensors.transport import LosslessReader
from sensors.window import StreamWindow
from sensors.wire import Audio, Image, Imu

log = logging.getLogger(__name__)

MODALITIES = ("image", "audio", "imu")


@dataclass(kw_only=True)
class IntakeConfig:
    endpoints: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5556"])
    camera_topic: str = "camera"
    mic_topic: str = "mic"
    imu_topic: str = "imu"
    stale_s: float = 1.0
    audio_window: int = 16000  # 1 s at 16 kHz
    imu_window: int = 100  # 1 s at 100 Hz
    rcvhwm: int = 10_000  # messages ZeroMQ may queue ahead of the intake thread: a flood cannot grow memory
    max_invalid_hz: float = 2000.0  # malformed messages handled per second at most: a flood cannot starve serving

    def __post_init__(self) -> None:
        if self.stale_s <= 0:
            raise ValueError(f"stale_s must be > 0, got {self.stale_s}")
        if not self.endpoints:
            raise ValueError("endpoints must name at least one sensor endpoint")


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


@dataclass
class ModalityHealth:
    healthy: bool
    age_s: float | None
    messages: int


class SensorIntake:
    """Owns the receive thread; thread-safe ``sample()`` and ``health()``."""

    def __init__(self, cfg: IntakeConfig, context: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self._ctx = context
        self._topic_of = {cfg.camera_topic: "image", cfg.mic_topic: "audio", cfg.imu_topic: "imu"}
        self._audio = StreamWindow(kind="audio", window=cfg.audio_window, channels=1, rate_hz=16000.0)
        self._imu = StreamWindow(kind="imu", window=cfg.imu_window, channels=6, rate_hz=100.0)
        self._lock = threading.Lock()
        self._frame: Image | None = None
        self._frame_new = threading.Condition(self._lock)
        self._last_rx: dict[str, float] = {}
        self._last_stamp: dict[str, int] = {}
        self._counts: dict[str, int] = dict.fromkeys(MODALITIES, 0)
        self._rejected: dict[str, int] = {}  # well-formed on the wire, unusable here (wrong kind, rate...)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: LosslessReader | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SensorIntake:
        self._reader = LosslessReader(self.cfg.endpoints, list(self._topic_of), context=self._ctx,
                                      rcvhwm=self.cfg.rcvhwm, max_invalid_hz=self.cfg.max_invalid_hz)
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._frame_new.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._reader is not None:
            self._reader.close()

    def _run(self) -> None:
        assert self._reader is not None
        while not self._stop.is_set():
            got = self._reader.recv(timeout_ms=100)
            if got is None:
                continue
            topic, msg, _rx_ns = got
            modality = self._topic_of.get(topic)
            if modality is None:
                continue
            try:
                self._ingest(modality, msg)
            except (ValueError, TypeError) as exc:  # wrong shape for this modality: count, go on
                reason = f"{modality}:{type(exc).__name__}"
                n = self._rejected[reason] = self._rejected.get(reason, 0) + 1
                if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th...: a flood of them does not flood the log
                    log.warning("dropping %s message on %r (%d so far): %s", modality, topic, n, exc)

    def _ingest(self, modality: str, msg: Image | Audio | Imu) -> None:
        now = time.monotonic()
        if modality == "image":
            if not isinstance(msg, Image) or msg.encoding not in ("rgb8", "bgr8", "mono8"):
                raise ValueError(f"camera topic needs a raw image, got {type(msg).__name__}")
            with self._lock:
                self._frame = msg
                self._record(modality, now, msg.stamp_ns)
                self._frame_new.notify_all()
            return
        window = self._audio if modality == "audio" else self._imu
        if modality == "audio" and not isinstance(msg, Audio):
            raise ValueError(f"mic topic needs audio, got {type(msg).__name__}")
        if modality == "imu" and not isinstance(msg, Imu):
            raise ValueError(f"imu topic needs imu, got {type(msg).__name__}")
        with self._lock:
            window.push(msg)
            stamp = int(msg.stamps_ns[-1]) if isinstance(msg, Imu) else msg.stamp_ns
            self._record(modality, now, stamp)

    def _record(self, modality: str, now: float, stamp_ns: int) -> None:
        self._last_rx[modality] = now
        self._last_stamp[modality] = stamp_ns
        self._counts[modality] += 1

    # ------------------------------------------------------------------ queries
    def _fresh(self, modality: str, now: float) -> bool:
        t = self._last_rx.get(modality)
        return t is not None and now - t <= self.cfg.stale_s

    def sample(self, wait_s: float = 0.1, after_seq: int = -1) -> Sample | None:
        """The newest fused sample; waits up to ``wait_s`` for a camera frame newer than
        ``after_seq`` and otherwise returns what the other modalities have (or None)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while not self._stop.is_set():
                frame_new = self._frame is not None and self._frame.seq != after_seq
                if frame_new and self._fresh("image", time.monotonic()):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._frame_new.wait(remaining)
            now = time.monotonic()
            image = None
            frame_seq, frame_stamp = -1, 0
            if self._frame is not None and self._fresh("image", now):
                image = _to_rgb(self._frame)
                frame_seq, frame_stamp = self._frame.seq, self._frame.stamp_ns
            audio = self._audio.latest() if self._fresh("audio", now) else None
            imu = self._imu.latest() if self._fresh("imu", now) else None
            stamps = [self._last_stamp[m] for m, x in (("image", image), ("audio", audio), ("imu", imu)) if x is not None]
        if not stamps:
            return None
        return Sample(
            stamp_ns=max(stamps),
            image=image,
            audio=None if audio is None else audio[:, 0].copy(),
            imu=None if imu is None else np.ascontiguousarray(imu.T),
            frame_seq=frame_seq,
            frame_stamp_ns=frame_stamp,
        )

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
        stats = {} if self._reader is None else _plain(self._reader.stats())
        stats["rejected"] = dict(self._rejected)
        return stats


def _to_rgb(msg: Image) -> np.ndarray:
    if msg.encoding == "rgb8":
        return np.array(msg.data)  # own copy: the receive buffer is reused by ZeroMQ
    if msg.encoding == "bgr8":
        return np.ascontiguousarray(msg.data[:, :, ::-1])
    return np.repeat(msg.data, 3, axis=2)


def _plain(stats: object) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(stats) if is_dataclass(stats) else dict(vars(stats))
