"""Dataset publishers for the demo: prepared data streamed as three live sensors.

Usage::

    python -m sensors.datasets.publish --config launch/publishers.toml
    python -m sensors.datasets.publish --endpoint tcp://*:5556 --split test --classes 0,1,2 \\
        --dwell-s 2.0 --seconds 30

One process, one :class:`~sensors.transport.Publisher`, one shared class schedule: the
classes of ``classes`` follow each other (``order = "cycle"`` in the given order, or
``"shuffle"``: a seeded permutation per cycle), each shown for ``dwell_s`` seconds. While
class ``c`` is current:

- ``camera`` (Image rgb8, ``camera_hz``): a Fashion-MNIST image of class ``c`` from the
  chosen split, 28x28 grey upscaled to ``image_size`` (nearest or linear). By default
  (``camera_resample = "dwell"``) one sample stays in view for the whole dwell period, as a
  real object in front of a camera; ``"frame"`` draws a new sample every frame.
- ``mic`` (Audio s16le mono 16 kHz, 20 ms chunks): back-to-back 1 s clips of class ``c``'s
  spoken name (each word centred in its clip, so words are separated by silence) by random
  voices of the split's voices (leave-voices-out, ``store.voice_split``), over faint white
  background noise. A chunk is stamped with its first sample and sent when complete.
- ``imu`` (Imu, 100 Hz, batches of 10): BasicMotions activity ``c % 4`` of the split. A
  recording is 100 samples taken at 10 Hz over 10 s; it is replayed at 100 Hz, i.e. as 1 s:
  a 10x time compression (so a 1 s window holds one whole activity recording). Orientation
  is (0, 0, 0, 1) with covariance "unknown" (-1); gyro -> angular_velocity, accelerometer
  -> linear_acceleration, values as shipped by the UEA archive (not gravity-compensated
  physical units).
- ``truth``: once per camera frame, ``[b"truth", msgpack {"stamp_ns", "label", "name"}]``
  with the frame's stamp (not wire format; INTERFACES.md).

The class pairing (class ``c`` = Fashion-MNIST class ``c`` image + spoken name of class
``c`` + BasicMotions activity ``c % 4``) is synthetic, exactly as AV-MNIST pairs MNIST
digits with spoken digits: the modalities share a label, not a physical event.

Timing: every stream is paced on one monotonic clock (tick ``k`` is due at ``start +
k / rate``, so there is no drift); stamps are ``time.time_ns()`` of the start plus the same
offsets. A late camera skips to the newest due frame (counted); mic and IMU send every due
chunk (up to 1 s of backlog, then skip, counted), as a real sensor's buffer would.
``rate_scale`` scales message rates (camera fps, mic chunks/s, IMU batches/s) while the
signals stay real time (16 kHz, 100 Hz). Stops after ``seconds`` (0 = never) or on
SIGINT/SIGTERM. Library use: ``DatasetStreamer(cfg).run(stop_event)``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from sensors.config import ConfigError, format_config, load_config
from sensors.datasets.store import load, speech_split
from sensors.wire import Audio, Image, Imu

log = logging.getLogger("continua.datasets.publish")

MIC_RATE = 16000
IMU_RATE = 100.0  # replay rate of the 10 Hz BasicMotions recordings (10x compression)
IDENTITY_QUAT = (0.0, 0.0, 0.0, 1.0)


@dataclass(kw_only=True)
class StreamerConfig:
    endpoint: str = "tcp://*:5556"
    split: str = "test"  # which split feeds the streams: "train" | "test"
    classes: list[int] = field(default_factory=lambda: list(range(10)))
    order: str = "cycle"  # "cycle" (given order) | "shuffle" (seeded permutation per cycle)
    dwell_s: float = 2.0
    seconds: float = 0.0  # 0 = until SIGINT/SIGTERM or stop_event
    rate_scale: float = 1.0
    seed: int = 0
    camera_topic: str = "camera"
    mic_topic: str = "mic"
    imu_topic: str = "imu"
    truth_topic: str = "truth"
    camera_hz: float = 30.0
    image_size: int = 224
    interpolation: str = "nearest"  # "nearest" | "linear" (cv2)
    camera_resample: str = "dwell"  # "dwell": one sample per dwell period | "frame": new sample each frame
    mic_chunk_ms: float = 20.0
    mic_noise_dbfs: float = -55.0  # RMS of the background white noise
    imu_batch: int = 10
    sndhwm: int = 100
    log_every_s: float = 5.0

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

        if self.split not in ("train", "test"):
            bad("split", "'train' or 'test'")
        if not self.classes or any(not 0 <= int(c) <= 9 for c in self.classes):
            bad("classes", "a non-empty list of class ids 0..9")
        if self.order not in ("cycle", "shuffle"):
            bad("order", "'cycle' or 'shuffle'")
        if not 0.05 <= self.dwell_s <= 3600:
            bad("dwell_s", "0.05 .. 3600 seconds")
        if self.seconds < 0:
            bad("seconds", ">= 0 (0 = run until stopped)")
        if not 0.01 <= self.rate_scale <= 100:
            bad("rate_scale", "0.01 .. 100")
        if not 0 < self.camera_hz * self.rate_scale <= 1000:
            bad("camera_hz", "a rate with 0 < camera_hz * rate_scale <= 1000")
        if not 8 <= self.image_size <= 4096:
            bad("image_size", "8 .. 4096 pixels")
        if self.interpolation not in ("nearest", "linear"):
            bad("interpolation", "'nearest' or 'linear'")
        if self.camera_resample not in ("dwell", "frame"):
            bad("camera_resample", "'dwell' or 'frame'")
        if not 1 <= self.mic_chunk_ms <= 1000:
            bad("mic_chunk_ms", "1 .. 1000 ms")
        if self.imu_batch < 1:
            bad("imu_batch", ">= 1")
        if len({self.camera_topic, self.mic_topic, self.imu_topic, self.truth_topic}) != 4:
            bad("truth_topic", "four distinct topic names")

    @property
    def fps(self) -> float:
        return self.camera_hz * self.rate_scale

    @property
    def mic_chunk(self) -> int:  # samples per mic message
        return max(16, round(MIC_RATE * self.mic_chunk_ms / 1000 / self.rate_scale))

    @property
    def imu_chunk(self) -> int:  # samples per imu message
        return max(1, round(self.imu_batch / self.rate_scale))


def camera_frame(img: np.ndarray, size: int, interpolation: str = "nearest") -> np.ndarray:
    """A 28x28 grey dataset image as the demo camera shows it: size x size rgb8. Also used by
    the agent's dataset source, so that taught samples look exactly like live frames."""
    if interpolation == "linear":
        import cv2

        big = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    else:
        idx = np.arange(size) * img.shape[0] // size
        big = img[idx][:, idx]
    return np.ascontiguousarray(np.repeat(big[:, :, None], 3, axis=2))


def _rng(*parts: int | str) -> np.random.Generator:
    """A generator seeded by the parts (strings via crc32: stable across processes)."""
    return np.random.default_rng([zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts])


class ClassSchedule:
    """Deterministic class per dwell period: ``class_at(p)``."""

    def __init__(self, classes: list[int], order: str = "cycle", seed: int = 0) -> None:
        self.classes, self.order, self.seed = [int(c) for c in classes], order, seed

    def class_at(self, period: int) -> int:
        n = len(self.classes)
        cycle, i = divmod(period, n)
        if self.order == "shuffle":
            i = int(np.random.default_rng([self.seed, 7, cycle]).permutation(n)[i])
        return self.classes[i]


class _TrackStream:
    """A sample stream (mic PCM or IMU rows) built per dwell period, read in chunks."""

    def __init__(self, rate: float, dwell_s: float, schedule: ClassSchedule, make_track) -> None:
        self.rate, self.dwell_s, self.schedule, self.make_track = rate, dwell_s, schedule, make_track
        self._cache: dict[int, np.ndarray] = {}

    def start(self, period: int) -> int:
        return round(period * self.dwell_s * self.rate)

    def period_of(self, n: int) -> int:
        p = int(n / (self.dwell_s * self.rate))
        while self.start(p + 1) <= n:
            p += 1
        while self.start(p) > n:
            p -= 1
        return p

    def track(self, p: int) -> np.ndarray:
        if p not in self._cache:
            self._cache[p] = self.make_track(p, self.schedule.class_at(p), self.start(p + 1) - self.start(p))
            for old in [k for k in self._cache if k < p - 1]:
                del self._cache[old]
        return self._cache[p]

    def read(self, n0: int, count: int) -> np.ndarray:
        parts, n = [], n0
        while n < n0 + count:
            p = self.period_of(n)
            lo = n - self.start(p)
            take = min(n0 + count - n, self.start(p + 1) - n)
            parts.append(self.track(p)[lo : lo + take])
            n += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


class DatasetStreamer:
    """Streams prepared datasets as ``camera``/``mic``/``imu``/``truth``; see the module doc."""

    def __init__(self, cfg: StreamerConfig | None = None) -> None:
        self.cfg = cfg = cfg or StreamerConfig()
        fm = load("fashion_mnist")
        self.class_names = [str(s) for s in fm["class_names"]]
        self.images = fm[f"x_{cfg.split}"]
        self.image_idx = {c: np.flatnonzero(fm[f"y_{cfg.split}"] == c) for c in range(10)}
        sp = speech_split(load("speech"), cfg.split)
        self.clips = sp["audio"]
        self.clip_idx = {c: np.flatnonzero(sp["y"] == c) for c in range(10)}
        bm = load("basic_motions")
        self.motions = bm[f"x_{cfg.split}"]
        self.motion_idx = {a: np.flatnonzero(bm[f"y_{cfg.split}"] == a) for a in range(4)}
        for c in cfg.classes:
            if not (len(self.image_idx[c]) and len(self.clip_idx[c]) and len(self.motion_idx[c % 4])):
                raise ConfigError(f"class {c} has no samples in split {cfg.split!r} of every dataset")
        self.schedule = ClassSchedule(cfg.classes, cfg.order, cfg.seed)
        self.dwell_ns = round(cfg.dwell_s * 1e9)
        self.mic = _TrackStream(MIC_RATE, cfg.dwell_s, self.schedule, self._mic_track)
        self.imu = _TrackStream(IMU_RATE, cfg.dwell_s, self.schedule, self._imu_track)
        self._frame_cache: tuple[int, np.ndarray] | None = None
        self.sent: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.endpoint: str | None = None  # the bound endpoint ("tcp://*:0" resolves to a port)
        self.ready = threading.Event()  # set once the publisher is open, just before streaming
        log.info(
            "%d images, %d speech clips (%d voices), %d IMU recordings from split %r",
            len(self.images),
            len(self.clips),
            len(set(sp["voice"].tolist())),
            len(self.motions),
            cfg.split,
        )

    # ------------------------------------------------------------------ content
    def label_at(self, offset_ns: int) -> int:
        """The class shown ``offset_ns`` after the start."""
        return self.schedule.class_at(offset_ns // self.dwell_ns)

    def _resize(self, img: np.ndarray) -> np.ndarray:
        return camera_frame(img, self.cfg.image_size, self.cfg.interpolation)

    def frame(self, k: int, offset_ns: int) -> tuple[int, np.ndarray]:
        """(label, rgb8 image) of camera frame ``k`` taken ``offset_ns`` after the start."""
        p = offset_ns // self.dwell_ns
        c = self.schedule.class_at(p)
        if self.cfg.camera_resample == "dwell":
            if self._frame_cache is None or self._frame_cache[0] != p:
                i = _rng(self.cfg.seed, "camera", p).choice(self.image_idx[c])
                self._frame_cache = (p, self._resize(self.images[i]))
            return c, self._frame_cache[1]
        i = _rng(self.cfg.seed, "camera", p, k).choice(self.image_idx[c])
        return c, self._resize(self.images[i])

    def _mic_track(self, p: int, c: int, length: int) -> np.ndarray:
        rng = _rng(self.cfg.seed, "mic", p)
        n_clips = -(-length // self.clips.shape[1])
        words = self.clips[rng.choice(self.clip_idx[c], n_clips)].reshape(-1)
        if length < self.clips.shape[1]:  # dwell < 1 s: keep the middle of the word
            off = (self.clips.shape[1] - length) // 2
            words = words[off : off + length]
        noise = rng.normal(0.0, 32767 * 10 ** (self.cfg.mic_noise_dbfs / 20), length)
        return np.clip(words[:length] + np.round(noise), -32768, 32767).astype(np.int16)

    def _imu_track(self, p: int, c: int, length: int) -> np.ndarray:
        rng = _rng(self.cfg.seed, "imu", p)
        n_rec = -(-length // self.motions.shape[2])
        rec = self.motions[rng.choice(self.motion_idx[c % 4], n_rec)]  # (n, 6, 100)
        rows = rec.transpose(0, 2, 1).reshape(-1, 6)[:length].astype(np.float64)
        out = np.empty((length, 10), dtype=np.float64)
        out[:, 0:4] = IDENTITY_QUAT
        out[:, 4:7] = rows[:, 3:6]  # gyro -> angular_velocity
        out[:, 7:10] = rows[:, 0:3]  # accelerometer -> linear_acceleration
        return out

    # ------------------------------------------------------------------ loop
    def _count(self, topic: str, table: dict[str, int], n: int = 1) -> None:
        table[topic] = table.get(topic, 0) + n

    def run(self, stop_event: threading.Event | None = None, publisher: Any = None) -> dict[str, Any]:
        """Stream until ``stop_event`` is set or ``seconds`` elapse; returns counts and rates.

        ``publisher``: an open ``sensors.transport.Publisher`` to use (not closed here);
        by default one is bound to ``cfg.endpoint`` for the duration of the run.
        """
        stop = stop_event or threading.Event()
        if publisher is None:
            from sensors.transport import Publisher

            with Publisher(self.cfg.endpoint, sndhwm=self.cfg.sndhwm) as pub:
                return self._loop(pub, stop)
        return self._loop(publisher, stop)

    def _loop(self, pub: Any, stop: threading.Event) -> dict[str, Any]:
        cfg = self.cfg
        self.endpoint = getattr(pub, "endpoint", cfg.endpoint)
        self.ready.set()
        cam_ns = 1e9 / cfg.fps
        mic_n, imu_n = cfg.mic_chunk, cfg.imu_chunk
        mic_ns, imu_ns = mic_n * 1e9 / MIC_RATE, imu_n * 1e9 / IMU_RATE
        max_backlog = {"mic": max(1, round(1e9 / mic_ns)), "imu": max(1, round(1e9 / imu_ns))}
        k_cam = k_mic = k_imu = 0
        t0 = time.monotonic_ns()
        w0 = time.time_ns()
        end = t0 + round(cfg.seconds * 1e9) if cfg.seconds > 0 else None
        next_log, last_log, last_sent = t0 + cfg.log_every_s * 1e9, t0, dict(self.sent)
        log.info(
            "streaming %s/%s/%s/%s on %s: camera %.1f Hz, mic %d-sample chunks, imu batches of %d",
            cfg.camera_topic,
            cfg.mic_topic,
            cfg.imu_topic,
            cfg.truth_topic,
            self.endpoint,
            cfg.fps,
            mic_n,
            imu_n,
        )
        while not stop.is_set():
            now = time.monotonic_ns()
            if end is not None and now >= end:
                break
            el = now - t0
            # camera: newest due frame only (a late camera drops frames)
            due = int(el // cam_ns)
            if due >= k_cam:
                if due > k_cam:
                    self._count(cfg.camera_topic, self.skipped, due - k_cam)
                off = round(due * cam_ns)
                label, img = self.frame(due, off)
                stamp = w0 + off
                pub.publish(
                    cfg.camera_topic, Image(data=img, encoding="rgb8", stamp_ns=stamp, frame_id="camera")
                )
                truth = {"stamp_ns": stamp, "label": int(label), "name": self.class_names[label]}
                pub.send_raw([cfg.truth_topic.encode(), msgpack.packb(truth)])
                self._count(cfg.camera_topic, self.sent)
                self._count(cfg.truth_topic, self.sent)
                k_cam = due + 1
            # mic / imu: every chunk whose last sample has been "recorded"
            k_mic = self._drain(
                pub, "mic", k_mic, int(el // mic_ns), backlog=max_backlog["mic"], w0=w0, chunk_ns=mic_ns
            )
            k_imu = self._drain(
                pub, "imu", k_imu, int(el // imu_ns), backlog=max_backlog["imu"], w0=w0, chunk_ns=imu_ns
            )
            if now >= next_log:
                dt = (now - last_log) / 1e9
                rates = {t: (self.sent.get(t, 0) - last_sent.get(t, 0)) / dt for t in self.sent}
                log.info("rates %s skipped %s", {t: round(r, 1) for t, r in rates.items()}, self.skipped)
                next_log, last_log, last_sent = now + cfg.log_every_s * 1e9, now, dict(self.sent)
            wake = min(t0 + k_cam * cam_ns, t0 + (k_mic + 1) * mic_ns, t0 + (k_imu + 1) * imu_ns)
            if end is not None:
                wake = min(wake, end)
            delay = (wake - time.monotonic_ns()) / 1e9
            if delay > 0:
                stop.wait(delay)
        elapsed = (time.monotonic_ns() - t0) / 1e9
        summary = {
            "seconds": round(elapsed, 3),
            "sent": dict(self.sent),
            "skipped": dict(self.skipped),
            "rate_hz": {t: round(n / elapsed, 2) for t, n in self.sent.items()} if elapsed > 0 else {},
        }
        log.info("stopped after %.1f s: %s", elapsed, summary)
        return summary

    def _drain(
        self, pub: Any, kind: str, k: int, complete: int, *, backlog: int, w0: int, chunk_ns: float
    ) -> int:
        """Publish chunks k .. complete-1 (chunk j is complete once (j+1) periods elapsed)."""
        cfg = self.cfg
        if complete - k > backlog:
            topic = cfg.mic_topic if kind == "mic" else cfg.imu_topic
            self._count(topic, self.skipped, complete - backlog - k)
            k = complete - backlog
        while k < complete:
            stamp = w0 + round(k * chunk_ns)
            if kind == "mic":
                n = cfg.mic_chunk
                pcm = self.mic.read(k * n, n)
                pub.publish(
                    cfg.mic_topic,
                    Audio(data=pcm.reshape(-1, 1), sample_rate=MIC_RATE, stamp_ns=stamp, frame_id="mic"),
                )
                self._count(cfg.mic_topic, self.sent)
            else:
                n = cfg.imu_chunk
                rows = self.imu.read(k * n, n)
                stamps = w0 + np.round((k * n + np.arange(n)) * (1e9 / IMU_RATE)).astype(np.int64)
                pub.publish(cfg.imu_topic, Imu(stamps_ns=stamps, values=rows, stamp_ns=stamp, frame_id="imu"))
                self._count(cfg.imu_topic, self.sent)
            k += 1
        return k


def _parse_classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--classes must be comma-separated integers, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sensors.datasets.publish", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", type=Path, help="TOML file with a [publishers] table")
    ap.add_argument("--endpoint")
    ap.add_argument("--split", choices=("train", "test"))
    ap.add_argument("--classes", type=_parse_classes, help="e.g. 0,1,2")
    ap.add_argument("--dwell-s", type=float)
    ap.add_argument("--seconds", type=float, help="stop after S seconds (0 = never)")
    ap.add_argument("--rate-scale", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(
            StreamerConfig,
            args.config,
            section="publishers",
            endpoint=args.endpoint,
            split=args.split,
            classes=args.classes,
            dwell_s=args.dwell_s,
            seconds=args.seconds,
            rate_scale=args.rate_scale,
            seed=args.seed,
        )
        log.info("%s", format_config(cfg))
        streamer = DatasetStreamer(cfg)
    except (ConfigError, FileNotFoundError) as exc:  # FileNotFoundError covers DatasetNotPreparedError
        log.error("%s", exc)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        streamer.run(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
