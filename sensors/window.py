"""A bounded, time-stamped ring of audio samples or IMU rows: "the latest 1 s" for backbones.

Audio chunks (``Audio``) and IMU batches (``Imu``) arrive in small pieces; a backbone wants a
fixed-length window. ``StreamWindow`` appends each piece to a ring of ``capacity`` rows
(default two windows, so a window ending at an earlier time, e.g. a camera frame's stamp,
can still be cut) and returns the latest ``window`` rows as a fresh float32
``(window, channels)`` array.

- audio: s16le is scaled to float32 in [-1, 1) (x / 32768); f32le is taken as is. The chunk's
  ``stamp_ns`` is the time of its *first* sample (as sounddevice's ``inputBufferAdcTime``);
  sample i is stamped ``stamp_ns + i / rate_hz``.
- imu: 6 channels, linear_acceleration xyz then angular_velocity xyz (sktime BasicMotions'
  accelerometer-then-gyroscope order); each row keeps its own stamp from ``stamps_ns``.

Stamps in the ring never decrease: small overlaps (clock jitter) are clamped, and a jump
back of more than one window (a sensor restart, a clock step) starts the ring afresh.
Thread-safe: one thread may push while another reads.
"""

from __future__ import annotations

import threading

import numpy as np

from sensors.wire import Audio, Imu

KINDS = ("audio", "imu")
IMU_CHANNELS = 6


class StreamWindow:
    def __init__(
        self, *, kind: str, window: int, channels: int, rate_hz: float, capacity: int | None = None
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1 sample, got {window}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if kind == "imu" and channels != IMU_CHANNELS:
            raise ValueError(f"imu windows have {IMU_CHANNELS} channels (acc xyz, gyro xyz), got {channels}")
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        capacity = 2 * window if capacity is None else capacity
        if capacity < window:
            raise ValueError(f"capacity ({capacity}) must be >= window ({window})")
        self.kind, self.window, self.channels, self.rate_hz, self.capacity = (
            kind,
            window,
            channels,
            rate_hz,
            capacity,
        )
        self._reset_ns = int(window * 1e9 / rate_hz)  # a jump back this large restarts the ring
        # Linear storage of twice the capacity: rows are appended and, when the end is reached,
        # the newest `capacity` rows move to the front (amortised O(1), windows stay contiguous).
        self._data = np.zeros((2 * capacity, channels), dtype=np.float32)
        self._stamps = np.zeros(2 * capacity, dtype=np.int64)
        self._start = self._end = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ input
    def push(self, msg: Audio | Imu) -> None:
        """Append one chunk; raises TypeError/ValueError when it does not fit this window."""
        rows, stamps = self._rows(msg)
        if len(rows) == 0:
            return
        with self._lock:
            self._append(rows, stamps)

    def _rows(self, msg: Audio | Imu) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "audio":
            if not isinstance(msg, Audio):
                raise TypeError(f"audio window needs Audio messages, got {type(msg).__name__}")
            data = msg.data if msg.data.ndim == 2 else msg.data.reshape(-1, 1)
            if data.shape[1] != self.channels:
                raise ValueError(f"audio has {data.shape[1]} channels, window expects {self.channels}")
            if msg.sample_rate != self.rate_hz:
                raise ValueError(
                    f"audio sample_rate {msg.sample_rate} Hz, window expects {self.rate_hz} Hz (no resampling)"
                )
            if data.dtype == np.int16:
                rows = data.astype(np.float32) * np.float32(1 / 32768)
            elif data.dtype == np.float32:
                rows = data
            else:
                raise ValueError(f"audio must be int16 or float32, got {data.dtype}")
            offsets = np.round(np.arange(len(rows)) * (1e9 / self.rate_hz)).astype(np.int64)
            return rows, msg.stamp_ns + offsets
        if not isinstance(msg, Imu):
            raise TypeError(f"imu window needs Imu messages, got {type(msg).__name__}")
        values = np.asarray(msg.values)
        if values.ndim != 2 or values.shape[1] != 10 or len(msg.stamps_ns) != len(values):
            raise ValueError(f"imu values must be (N, 10) with N stamps, got {values.shape}")
        rows = np.concatenate([values[:, 7:10], values[:, 4:7]], axis=1).astype(np.float32)
        return rows, np.asarray(msg.stamps_ns, dtype=np.int64)

    def _append(self, rows: np.ndarray, stamps: np.ndarray) -> None:
        if len(rows) > self.capacity:
            rows, stamps = rows[-self.capacity :], stamps[-self.capacity :]
        stamps = np.maximum.accumulate(stamps)
        if self._end > self._start:
            last = int(self._stamps[self._end - 1])
            if int(stamps[0]) < last - self._reset_ns:
                self._start = self._end = 0  # restart or clock step: old rows are from another timeline
            else:
                stamps = np.maximum(stamps, last)
        n = len(rows)
        if self._end + n > len(self._data):
            keep = min(self._end - self._start, self.capacity - n)
            src = slice(self._end - keep, self._end)
            self._data[:keep] = self._data[src]
            self._stamps[:keep] = self._stamps[src]
            self._start, self._end = 0, keep
        self._data[self._end : self._end + n] = rows
        self._stamps[self._end : self._end + n] = stamps
        self._end += n
        self._start = max(self._start, self._end - self.capacity)

    # ------------------------------------------------------------------ output
    def latest(self, end_ns: int | None = None, *, max_lag_ns: int | None = None) -> np.ndarray | None:
        """The newest ``window`` rows (stamped at or before ``end_ns`` when given) as a new
        float32 (window, channels) array; None until that many rows exist. With
        ``max_lag_ns`` (and ``end_ns``), also None when the window's last row is older than
        ``end_ns - max_lag_ns`` (a silent sensor)."""
        with self._lock:
            stop = self._end
            if end_ns is not None:
                stop = self._start + int(
                    np.searchsorted(self._stamps[self._start : self._end], end_ns, side="right")
                )
            if stop - self._start < self.window:
                return None
            if (
                max_lag_ns is not None
                and end_ns is not None
                and end_ns - int(self._stamps[stop - 1]) > max_lag_ns
            ):
                return None
            return self._data[stop - self.window : stop].copy()

    @property
    def last_stamp_ns(self) -> int | None:
        with self._lock:
            return int(self._stamps[self._end - 1]) if self._end > self._start else None

    def __len__(self) -> int:
        with self._lock:
            return self._end - self._start

    def clear(self) -> None:
        with self._lock:
            self._start = self._end = 0
