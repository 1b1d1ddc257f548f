"""Dataset publishers for the demo: prepared data streamed as three live sensors.

Usage::

    python -m demodata.publish --config launch/publishers.toml
    python -m demodata.publish --endpoint tcp://*:5556 --split test --classes 0,1,2 \\
        --dwell-s 2.0 --seconds 30
    python -m demodata.publish --config launch/publishers.toml \\
        --scene-endpoint tcp://127.0.0.1:5557 --scene-share 0.2   # + scene control

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
  with the frame's stamp (not wire format: recorders skip it by name, docs/wire.md section 8).

The class pairing (class ``c`` = Fashion-MNIST class ``c`` image + spoken name of class
``c`` + BasicMotions activity ``c % 4``) is synthetic, exactly as AV-MNIST pairs MNIST
digits with spoken digits: the modalities share a label, not a physical event.

Scene control: ``label_at``, the truth labels and every stream follow one
:class:`~demodata.scene.Timeline`, the schedule plus overrides: ``show(c, S)`` (in
process, or over a REP socket on ``scene_endpoint``, protocol in
``demodata.scene_control``) shows class ``c`` (any of 0..9) for ``S`` seconds from
now, then the schedule resumes. Content is made per segment in fixed pieces (one image, or
one per frame; one 1 s clip; one 100-sample recording), seeded by (seed, modality, segment
key, piece), so cutting a segment short never changes what was sent. With ``scene_share >
0`` the leading share of each class's samples is kept for overrides and the schedule uses
the rest: instances taught during a show never come back in the schedule.

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
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from common.config import ConfigError, format_config, load_config
from demodata.content import IMU_RATE, MIC_RATE, DatasetContent, camera_frame
from demodata.scene import BASE, MAX_SHOW_S, SCENE, ClassSchedule
from demodata.scene_control import SceneError, SceneServer
from sensors.wire import Audio, Image, Imu

log = logging.getLogger("continua.demodata.publish")

__all__ = [
    "IMU_RATE",
    "MIC_RATE",
    "ClassSchedule",
    "DatasetStreamer",
    "StreamerConfig",
    "camera_frame",
    "main",
]


@dataclass(kw_only=True)
class StreamerConfig:
    """The streams, their schedule and the scene control (module doc).

    ``scene_share``: leading share (0 .. 0.9) of each class's samples reserved for
    overrides, so a benchmark can teach instances during a show that the schedule never
    shows (0: both use all samples). ``scene_endpoint``: where the REP scene control binds
    ("" = none), e.g. "tcp://127.0.0.1:5557".
    """

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
    scene_share: float = 0.0
    scene_endpoint: str = ""

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

        def one_of(name: str, *choices: str) -> None:  # "'train' or 'test'"
            if getattr(self, name) not in choices:
                bad(name, " or ".join(repr(c) for c in choices))

        def within(name: str, lo: float, hi: float, suffix: str = "") -> None:  # "8 .. 4096 pixels"
            if not lo <= getattr(self, name) <= hi:
                bad(name, f"{lo} .. {hi}{suffix}")

        one_of("split", "train", "test")
        if not self.classes or any(not 0 <= int(c) <= 9 for c in self.classes):
            bad("classes", "a non-empty list of class ids 0..9")
        one_of("order", "cycle", "shuffle")
        within("dwell_s", 0.05, 3600, " seconds")
        if self.seconds < 0:
            bad("seconds", ">= 0 (0 = run until stopped)")
        within("rate_scale", 0.01, 100)
        if not 0 < self.camera_hz * self.rate_scale <= 1000:
            bad("camera_hz", "a rate with 0 < camera_hz * rate_scale <= 1000")
        within("image_size", 8, 4096, " pixels")
        one_of("interpolation", "nearest", "linear")
        one_of("camera_resample", "dwell", "frame")
        within("mic_chunk_ms", 1, 1000, " ms")
        if self.imu_batch < 1:
            bad("imu_batch", ">= 1")
        if len({self.camera_topic, self.mic_topic, self.imu_topic, self.truth_topic}) != 4:
            bad("truth_topic", "four distinct topic names")
        within("scene_share", 0, 0.9, " (share of each class's samples kept for overrides)")
        if self.scene_endpoint and (
            not self.scene_endpoint.startswith(("tcp://", "ipc://", "inproc://"))
            or (self.scene_endpoint == self.endpoint and not self.endpoint.endswith((":*", ":0")))
        ):
            bad(
                "scene_endpoint", "'' (off) or a ZeroMQ endpoint such as 'tcp://127.0.0.1:5557', not endpoint"
            )

    @property
    def fps(self) -> float:
        return self.camera_hz * self.rate_scale

    @property
    def mic_chunk(self) -> int:  # samples per mic message
        return max(16, round(MIC_RATE * self.mic_chunk_ms / 1000 / self.rate_scale))

    @property
    def imu_chunk(self) -> int:  # samples per imu message
        return max(1, round(self.imu_batch / self.rate_scale))


class DatasetStreamer(DatasetContent):
    """Streams prepared datasets as ``camera``/``mic``/``imu``/``truth``; see the module doc."""

    def __init__(self, cfg: StreamerConfig | None = None) -> None:
        super().__init__(cfg or StreamerConfig())
        self.sent: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.endpoint: str | None = None  # the bound endpoint ("tcp://*:0" resolves to a port)
        self.scene_endpoint: str | None = None  # the bound scene control endpoint, while running
        self.start_ns: int | None = None  # wall-clock stamp of offset 0 of the current run
        self._t0: int | None = None  # monotonic clock of offset 0, while running
        self._scene: SceneServer | None = None
        self.ready = threading.Event()  # set once the publisher is open, just before streaming

    # ------------------------------------------------------------------ scene control
    def _now(self) -> tuple[int, int]:
        """(offset now, wall-clock stamp of offset 0); SceneError when not streaming."""
        t0, w0 = self._t0, self.start_ns
        if t0 is None or w0 is None:
            raise SceneError("the streamer is not streaming (scene control works during run())")
        return time.monotonic_ns() - t0, w0

    def show(self, class_id: Any, seconds: Any, pool: Any = SCENE) -> dict[str, Any]:
        """Show ``class_id`` for ``seconds`` from now, then resume the schedule. ``pool``: "scene"
        (the samples set aside for teaching, ``scene_share``) or "base" (the schedule's: a scripted
        test of what was taught).

        Returns ``{"ok": True, "start_ns", "end_ns", "class", "name"}`` with stamps in the
        clock of the message stamps; raises :class:`SceneError` for a class without
        samples, ``seconds`` outside (0, 3600] or when not streaming.
        """
        if isinstance(class_id, bool) or not isinstance(class_id, Integral) or class_id not in self.showable:
            raise SceneError(f"class={class_id!r}: expected one of {self.showable} (classes with samples)")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, Real)
            or not math.isfinite(seconds)
            or not 0 < seconds <= MAX_SHOW_S
        ):
            raise SceneError(f"seconds={seconds!r}: expected a number with 0 < seconds <= {MAX_SHOW_S:g}")
        if pool not in (BASE, SCENE):
            raise SceneError(f"pool={pool!r}: expected {BASE!r} or {SCENE!r}")
        class_id, seconds = int(class_id), float(seconds)
        now, w0 = self._now()
        try:
            seg = self.timeline.show(class_id, seconds, now, pool)
        except ValueError as exc:
            raise SceneError(str(exc)) from exc
        log.info("scene: showing class %d (%s) for %.3f s", class_id, self.class_names[class_id], seconds)
        return {
            "ok": True,
            "start_ns": w0 + seg.start_ns,
            "end_ns": w0 + seg.end_ns,
            "class": class_id,
            "name": self.class_names[class_id],
        }

    def resume(self) -> dict[str, Any]:
        """End the show in progress now: ``{"ok": True, "resumed": bool, "end_ns"}``."""
        now, w0 = self._now()
        seg = self.timeline.resume(now)
        log.info("scene: resuming the schedule%s", "" if seg else " (no show in progress)")
        return {"ok": True, "resumed": seg is not None, "end_ns": None if seg is None else w0 + seg.end_ns}

    def status(self) -> dict[str, Any]:
        """What is shown now: ``{"ok", "class", "name", "override", "until_ns", "now_ns"}``."""
        now, w0 = self._now()
        seg = self.timeline.segment(now)
        return {
            "ok": True,
            "class": seg.class_id,
            "name": self.class_names[seg.class_id],
            "override": seg.override,
            "until_ns": w0 + seg.end_ns,
            "now_ns": w0 + now,
        }

    @property
    def scene_errors(self) -> int:
        """Scene requests refused (ok=false) by this run's control socket."""
        return self._scene.errors if self._scene is not None else 0

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
        """Clock, timeline and scene control around :meth:`_stream`."""
        self.endpoint = getattr(pub, "endpoint", self.cfg.endpoint)
        self.timeline.reset()
        t0, w0 = time.monotonic_ns(), time.time_ns()
        self._t0, self.start_ns = t0, w0
        try:
            if self.cfg.scene_endpoint:
                self._scene = SceneServer(self.cfg.scene_endpoint, self).start()
                self.scene_endpoint = self._scene.endpoint
            self.ready.set()
            return self._stream(pub, stop, t0, w0)
        finally:
            self._t0 = None
            if self._scene is not None:
                self._scene.stop()
            self.scene_endpoint = None

    def _stream(self, pub: Any, stop: threading.Event, t0: int, w0: int) -> dict[str, Any]:
        cfg = self.cfg
        cam_ns = 1e9 / cfg.fps
        mic_n, imu_n = cfg.mic_chunk, cfg.imu_chunk
        mic_ns, imu_ns = mic_n * 1e9 / MIC_RATE, imu_n * 1e9 / IMU_RATE
        max_backlog = {"mic": max(1, round(1e9 / mic_ns)), "imu": max(1, round(1e9 / imu_ns))}
        k_cam = k_mic = k_imu = 0
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
            self.timeline.advance(el + 1)  # content up to el is sent now: no show may change it
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
        prog="python -m demodata.publish", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", type=Path, help="TOML file with a [publishers] table")
    ap.add_argument("--endpoint")
    ap.add_argument("--split", choices=("train", "test"))
    ap.add_argument("--classes", type=_parse_classes, help="e.g. 0,1,2")
    ap.add_argument("--dwell-s", type=float)
    ap.add_argument("--seconds", type=float, help="stop after S seconds (0 = never)")
    ap.add_argument("--rate-scale", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--scene-endpoint", help="bind the scene control here, e.g. tcp://127.0.0.1:5557")
    ap.add_argument("--scene-share", type=float, help="share of each class's samples kept for shows")
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
            scene_endpoint=args.scene_endpoint,
            scene_share=args.scene_share,
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
