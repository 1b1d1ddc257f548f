"""The serving loop: one prediction per new camera frame, never waiting for learning.

Per frame the image backbone runs in this thread while the audio and IMU taps are computed as
their data arrives, in their own threads (``runtime.streams``); the side network is the
learner's ONNX export (``runtime.serving_model``: ~1 ms against ~10 ms for torch eager on one
thread, and no torch in this process). The loop sleeps on the intake's frame condition, so a
prediction starts as soon as a frame is decoded; with the camera stale it predicts from the
other modalities at ``idle_rate_hz``.

Predictions go out on ``predictions`` as ``[b"prediction", msgpack map]``:

- ``label``, ``class_id``, ``confidence``, ``topk`` ([[label, p], ...]): the classifier's
  guess for this sample (``None``/-1 before anything is learned);
- ``known``: the sample lies near a learned class in tap space (``training.openset``; a
  confident softmax far from every class is not known); ``novelty`` (<= 1 is near);
- ``unknown``: not known, or confidence below ``abstain_below``;
- ``smoothed_label`` / ``smoothed_confidence``: the label to act on, averaged over
  ``smooth_s`` of predictions; ``"unknown"`` when the window is mostly unknown or unsure;
- ``stamp_ns``: the camera frame's stamp (the newest other stamp without a camera);
  ``frame_stamp_ns`` (0 without a camera); ``latency_ms``: from ``stamp_ns`` to publishing;
  ``latency_from``: which modality's stamp that is; ``age_ms``: per modality, publish time
  minus the newest sample its taps cover (None when absent); ``present``;
- ``model_version``, ``seq``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from common.threads import join_all, start_daemon
from runtime.smoothing import Smoother

log = logging.getLogger(__name__)
MODALITIES = ("image", "audio", "imu")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Served:
    """What predictions come from; replaced by one assignment when a task is swapped in."""

    version: int = 0
    class_names: tuple[str, ...] = ()
    model: Any = None  # runtime.serving_model.ServingModel, None before the first task
    openset: Any = None  # training.openset.OpenSet or None


@dataclass
class Capture:
    """Live samples collected for a label (teach / live source), appended by the serving loop."""

    label: str
    until: float  # time.monotonic() deadline
    taps: list[dict[str, list[np.ndarray]]] = field(default_factory=list)
    present: list[np.ndarray] = field(default_factory=list)
    stamps: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __len__(self) -> int:
        return len(self.stamps)

    def arrays(self) -> tuple[dict[str, list[np.ndarray]], np.ndarray, np.ndarray]:
        """(taps (N, dim) per level, present (N, K), stamps (N,))."""
        taps = {m: [np.concatenate([t[m][b] for t in self.taps]) for b in range(len(self.taps[0][m]))]
                for m in MODALITIES}
        return taps, np.stack(self.present), np.asarray(self.stamps, np.int64)


class Server:
    """Owns the serving thread and the predictions PUB socket."""

    def __init__(self, cfg: Any, *, intake: Any, image: Any, audio: Any, imu: Any, dims: dict[str, list[int]],
                 endpoint: str, context: zmq.Context) -> None:
        self.cfg = cfg  # runtime.config.ServeConfig
        self.intake, self.image, self.streams = intake, image, {"audio": audio, "imu": imu}
        self.dims = dims
        self.endpoint, self.ctx = endpoint, context
        self.served = Served()
        self.capture: Capture | None = None
        self.latency_ms: deque[float] = deque(maxlen=2000)
        # per prediction: camera stamp -> received by the intake (sensor, wire, decode), received ->
        # serving started, image backbone, the rest before publishing, the whole serving call
        self.stage_ms: dict[str, deque[float]] = {k: deque(maxlen=2000)
                                                  for k in ("transport", "wait", "image", "side", "total")}
        self.predictions = 0
        self.errors: dict[str, int] = {}
        self._zeros = {m: [np.zeros((1, d), np.float32) for d in ds] for m, ds in dims.items()}
        self._smoother = Smoother(window_s=cfg.smooth_s, abstain_below=cfg.abstain_below,
                                  unknown_share=cfg.unknown_share)
        self._smoothed_version = -1
        self._stop = threading.Event()
        self._pub: zmq.Socket | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Server:
        self._pub = self.ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100)
        self._pub.bind(self.endpoint)
        self._thread = start_daemon(self._run, "serve")
        return self

    def stop(self) -> None:
        self._stop.set()
        join_all([self._thread])
        if self._pub is not None:
            self._pub.close(0)

    def count(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        last_seq, idle = -1, 1.0 / self.cfg.idle_rate_hz
        while not self._stop.is_set():
            frame = self.intake.wait_frame(last_seq, timeout_s=idle)
            if frame is None and self.intake.fresh("image"):
                continue  # a live camera between frames: wait for the next one
            if frame is not None:
                last_seq = frame.seq
            try:
                self._serve(frame)
            except Exception as exc:  # never let one bad sample stop serving
                self.count(type(exc).__name__)
                n = self.errors[type(exc).__name__]
                if n & (n - 1) == 0:
                    log.exception("prediction failed (%d so far): %s", n, exc)

    def _serve(self, frame: Any) -> None:
        t0 = time.perf_counter()
        if frame is not None and frame.rx_ns:
            start = time.time_ns()
            self.stage_ms["transport"].append((frame.rx_ns - frame.stamp_ns) / 1e6)
            self.stage_ms["wait"].append((start - frame.rx_ns) / 1e6)
        taps: dict[str, list[np.ndarray]] = {}
        present = np.zeros(len(MODALITIES), bool)
        ends: dict[str, int | None] = dict.fromkeys(MODALITIES)
        if frame is not None:
            taps["image"] = list(self.image.extract(frame.image[None]).values.values())
            present[0], ends["image"] = True, frame.stamp_ns
        else:
            taps["image"] = self._zeros["image"]
        t_img = time.perf_counter()
        for k, m in enumerate(MODALITIES[1:], start=1):
            st = self.streams[m].latest() if self.streams[m] is not None and self.intake.fresh(m) else None
            if st is None:
                taps[m] = self._zeros[m]
            else:
                taps[m], present[k], ends[m] = st.levels, True, st.end_stamp_ns
        if not present.any():
            return
        stamp, source = (frame.stamp_ns, "image") if frame is not None else \
            max((v, m) for m, v in ends.items() if v is not None)
        self._maybe_capture(taps, present, stamp)
        served = self.served  # one read: a swap during this call does not tear the prediction
        msg = self._predict(served, taps, present, stamp)
        t_side = time.perf_counter()
        now = time.time_ns()
        msg.update(seq=self.predictions, stamp_ns=stamp, frame_stamp_ns=0 if frame is None else frame.stamp_ns,
                   present=dict(zip(MODALITIES, present.tolist(), strict=True)), model_version=served.version,
                   latency_ms=round((now - stamp) / 1e6, 3), latency_from=source,
                   age_ms={m: None if v is None else round((now - v) / 1e6, 3) for m, v in ends.items()})
        assert self._pub is not None
        try:
            self._pub.send_multipart([b"prediction", msgpack.packb(msg)], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.count("prediction_hwm")
        self.latency_ms.append(msg["latency_ms"])
        t_end = time.perf_counter()
        for k, v in (("image", t_img - t0), ("side", t_side - t_img), ("total", t_end - t0)):
            self.stage_ms[k].append(v * 1e3)
        self.predictions += 1

    def _predict(self, served: Served, taps: dict[str, list[np.ndarray]], present: np.ndarray,
                 stamp: int) -> dict[str, Any]:
        if served.model is None or not served.class_names:
            return {"label": None, "class_id": -1, "confidence": 0.0, "topk": [], "known": False, "novelty": None,
                    "unknown": True, "smoothed_label": UNKNOWN, "smoothed_confidence": 0.0}
        probs = served.model.predict(taps, present[None])[0]
        novelty = float(served.openset.score(taps, present[None])[0]) \
            if served.openset is not None and self.cfg.open_set else 0.0
        known = novelty <= 1.0
        order = np.argsort(probs)[::-1][: self.cfg.topk]
        names = served.class_names
        conf = float(probs[order[0]])
        if served.version != self._smoothed_version:
            self._smoother.reset()
            self._smoothed_version = served.version
        sm = self._smoother.update(stamp, probs, known)
        return {"label": names[order[0]], "class_id": int(order[0]), "confidence": conf,
                "topk": [[names[i], float(probs[i])] for i in order], "known": bool(known),
                "novelty": round(novelty, 4), "unknown": bool(not known or conf < self.cfg.abstain_below),
                "smoothed_label": UNKNOWN if sm.index < 0 else names[sm.index],
                "smoothed_confidence": round(float(sm.confidence), 4)}

    def _maybe_capture(self, taps: dict[str, list[np.ndarray]], present: np.ndarray, stamp: int) -> None:
        cap = self.capture
        if cap is None or cap.done.is_set():
            return
        if time.monotonic() > cap.until:
            cap.done.set()
            return
        cap.taps.append({m: list(v) for m, v in taps.items()})  # arrays are never modified in place
        cap.present.append(present.copy())
        cap.stamps.append(int(stamp))

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(0)
        stages = {k: round(float(np.percentile(v, 50)), 3) if v else None for k, v in self.stage_ms.items()}
        tails = {k: round(float(np.percentile(v, 99)), 3) if v else None for k, v in self.stage_ms.items()}
        return {"predictions": self.predictions,
                "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat.size else None,
                               "p99": float(np.percentile(lat, 99)) if lat.size else None, "n": int(lat.size)},
                "stage_p50_ms": stages, "stage_p99_ms": tails, "errors": dict(self.errors)}
