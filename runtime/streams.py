"""Audio and IMU taps computed as their data arrives, each in its own thread.

Why not per camera frame: the camera runs at 30 Hz while the audio taps only change every
80 ms (one new embedding window per block) and the IMU window every batch (10 Hz). Computing
them on arrival, in their own threads, takes them off the per-frame path: a prediction for a
new camera frame runs the image backbone and reads the newest audio and IMU taps, and the
three backbones run concurrently on the cores (ONNX Runtime releases the GIL).

- ``AudioTapStream``: 16 kHz mono chunks go to ``export.incremental.IncrementalAudioExtractor``
  (each 80 ms block is turned into mel frames and one embedding window exactly once). A gap or
  a jump back in the chunk stamps (a lost chunk, a restarted microphone) restarts it: the taps
  are absent until a full second has arrived again, never stitched across the gap.
- ``ImuTapStream``: each batch goes into a 1 s ``StreamWindow``; the thread runs the IMU
  backbone on the newest window (several batches waiting are one computation).

``put`` runs in the caller's (the intake's) thread and raises ``ValueError``/``TypeError`` for
a message this modality cannot use, so the intake counts it; the work queue is bounded and a
full queue drops the oldest item (``stats()["dropped"]``), so a slow extractor never grows
memory. ``latest()`` returns the newest taps with the stamp of the newest sample they cover.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.threads import join_all, start_daemon
from sensors.window import StreamWindow
from sensors.wire import Audio, Imu

log = logging.getLogger(__name__)
AUDIO_RATE = 16000


@dataclass(frozen=True)
class StreamTaps:
    levels: list[np.ndarray]  # per tap level, (1, dim) float32
    end_stamp_ns: int  # sensor stamp of the newest sample the taps cover


class _TapStream:
    """A worker thread turning queued items into taps; the newest result is kept."""

    name = "stream"

    def __init__(self, queue_size: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._latest: StreamTaps | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = {"items": 0, "computed": 0, "dropped": 0, "errors": 0, "resets": 0}

    def start(self) -> _TapStream:
        self._thread = start_daemon(self._run, f"{self.name}-taps")
        return self

    def stop(self) -> None:
        self._stop.set()
        join_all([self._thread])

    def latest(self) -> StreamTaps | None:
        return self._latest

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    def _enqueue(self, item: Any) -> None:
        self._counts["items"] += 1
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._counts["dropped"] += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                out = self._process(item)
            except Exception as exc:  # a bad window must not stop the stream
                self._counts["errors"] += 1
                n = self._counts["errors"]
                if n & (n - 1) == 0:
                    log.warning("%s taps: %s (%d so far)", self.name, exc, n)
                continue
            if out is not None:
                self._latest = out
                self._counts["computed"] += 1

    def _process(self, item: Any) -> StreamTaps | None:
        raise NotImplementedError


class AudioTapStream(_TapStream):
    """Incremental speech-embedding taps of the latest second of 16 kHz mono audio."""

    name = "audio"

    def __init__(self, extractor: Any, *, queue_size: int = 500, max_gap_s: float = 0.05) -> None:
        super().__init__(queue_size)
        self.extractor = extractor  # export.incremental.IncrementalAudioExtractor
        self.max_gap_ns = int(max_gap_s * 1e9)
        # (index of its first sample since the extractor's last reset, stamp) of the recent chunks: the
        # end stamp is taken from the chunk holding the last covered sample, so that a lost chunk shorter
        # than max_gap_s or a microphone clock off its nominal rate does not shift every later stamp
        self._chunks: deque[tuple[int, int]] = deque()
        self._next = None  # expected stamp of the next chunk

    def put(self, msg: Audio) -> None:
        if not isinstance(msg, Audio):
            raise TypeError(f"mic topic needs audio, got {type(msg).__name__}")
        if msg.sample_rate != AUDIO_RATE:
            raise ValueError(f"audio sample_rate {msg.sample_rate} Hz; the speech backbone needs {AUDIO_RATE} Hz")
        data = msg.data if msg.data.ndim == 2 else msg.data.reshape(-1, 1)
        if data.shape[1] != 1:
            raise ValueError(f"audio has {data.shape[1]} channels; the speech backbone needs mono")
        if data.dtype not in (np.int16, np.float32):
            raise ValueError(f"audio must be int16 or float32, got {data.dtype}")
        self._enqueue((np.array(data[:, 0]), int(msg.stamp_ns)))  # own copy: ZeroMQ reuses the buffer

    def _process(self, item: tuple[np.ndarray, int]) -> StreamTaps | None:
        pcm, stamp = item
        n_ns = round(len(pcm) * 1e9 / AUDIO_RATE)
        if self._next is None or abs(stamp - self._next) > self.max_gap_ns:
            if self._next is not None:
                self._counts["resets"] += 1
                self._latest = None
            self.extractor.reset()
            self._chunks.clear()
        self._next = stamp + n_ns
        self._chunks.append((self.extractor.samples_seen, stamp))
        new_windows = self.extractor.push(pcm)
        last = self.extractor.covered_samples - 1  # index of the newest sample the taps cover
        while len(self._chunks) > 1 and self._chunks[1][0] <= last:
            self._chunks.popleft()
        if not new_windows:
            return None
        taps = self.extractor.taps()
        if taps is None:
            return None
        first, chunk_stamp = self._chunks[0]
        end = chunk_stamp + round((last - first) * 1e9 / AUDIO_RATE)
        return StreamTaps(levels=list(taps.values.values()), end_stamp_ns=end)


class ImuTapStream(_TapStream):
    """IMU backbone taps of the newest 1 s window, recomputed when a batch arrives."""

    name = "imu"

    def __init__(self, backend: Any, *, window: int = 100, rate_hz: float = 100.0, queue_size: int = 8) -> None:
        super().__init__(queue_size)
        self.backend = backend  # export Backend of the IMU modality
        self.window = StreamWindow(kind="imu", window=window, channels=6, rate_hz=rate_hz)

    def put(self, msg: Imu) -> None:
        if not isinstance(msg, Imu):
            raise TypeError(f"imu topic needs imu, got {type(msg).__name__}")
        self.window.push(msg)  # ValueError for a batch it cannot use
        self._enqueue(None)

    def _process(self, _item: None) -> StreamTaps | None:
        while True:  # batches that queued up meanwhile are in the window already: one computation
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        end = self.window.last_stamp_ns
        if end is None:
            return None
        x = self.window.latest(end)  # rows up to `end`: a batch pushed meanwhile is not claimed as older
        if x is None:
            return None
        taps = self.backend.extract(np.ascontiguousarray(x.T)[None])
        return StreamTaps(levels=list(taps.values.values()), end_stamp_ns=end)
