"""Microphone driver: PortAudio (``sounddevice.InputStream``) -> 16 kHz mono s16le Audio chunks.

Why a callback stream and a bounded queue: PortAudio calls back on its own real-time
thread, which must never block, so each block is copied into a bounded queue and ``read``
takes from it; if the consumer stalls, the oldest chunk is dropped and counted (as audio
overflow) instead of growing memory. Each chunk is stamped with the capture time of its
first sample: wall clock now minus PortAudio's own ``currentTime - inputBufferAdcTime``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sensors.drivers.base import SensorDriver, missing_library
from sensors.errors import DeviceNotAvailableError
from sensors.wire import Audio

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class MicrophoneConfig:
    """``device``: "" = PortAudio's default input, digits = device index, else a name substring
    (see ``python -m sounddevice``). ``chunk_ms``: samples per message = rate * chunk_ms / 1000."""

    device: str = ""
    sample_rate: int = 16000
    channels: int = 1
    chunk_ms: int = 20
    frame_id: str = "mic"
    queue_chunks: int = 100  # ~2 s of 20 ms chunks buffered before the oldest is dropped

    def __post_init__(self) -> None:
        if not 1000 <= self.sample_rate <= 768_000:
            raise ValueError(f"sample_rate must be in [1000, 768000] Hz, got {self.sample_rate}")
        if not 1 <= self.channels <= 64:
            raise ValueError(f"channels must be in [1, 64], got {self.channels}")
        if not 1 <= self.chunk_ms <= 10_000:
            raise ValueError(f"chunk_ms must be in [1, 10000], got {self.chunk_ms}")
        if self.sample_rate * self.chunk_ms % 1000:
            raise ValueError(
                f"chunk_ms={self.chunk_ms} is not a whole number of samples at {self.sample_rate} Hz"
            )
        if self.queue_chunks < 1:
            raise ValueError(f"queue_chunks must be >= 1, got {self.queue_chunks}")

    @property
    def chunk_samples(self) -> int:
        return self.sample_rate * self.chunk_ms // 1000


class MicrophoneDriver(SensorDriver, name="mic", config=MicrophoneConfig):
    """Captures interleaved int16 PCM with ``sounddevice.InputStream``."""

    def __init__(self, config: MicrophoneConfig | None = None) -> None:
        super().__init__(config)
        self._stream: Any = None
        self._queue: queue.Queue[tuple[np.ndarray, int]] = queue.Queue(maxsize=self.config.queue_chunks)
        self.chunks = 0
        self.dropped = 0
        self.overflows = 0

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        now_ns = time.time_ns()
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        try:
            lag_s = float(time_info.currentTime) - float(time_info.inputBufferAdcTime)
        except (AttributeError, TypeError, ValueError):
            lag_s = -1.0
        if not 0.0 <= lag_s < 1.0:  # some host APIs report 0 or garbage
            lag_s = frames / self.config.sample_rate
        item = (indata.copy(), now_ns - int(lag_s * 1e9))
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self.dropped += 1
            self._queue.put_nowait(item)

    def _connect(self) -> None:
        try:
            import sounddevice as sd
        except ImportError as exc:
            raise missing_library("sounddevice", "audio", exc) from exc
        except OSError as exc:  # the module imports but PortAudio's shared library is missing
            raise missing_library(
                "PortAudio", "audio", exc, hint="and the system library: apt-get install libportaudio2"
            ) from exc
        cfg: MicrophoneConfig = self.config
        device: int | str | None = (
            None if not cfg.device else (int(cfg.device) if cfg.device.isdigit() else cfg.device)
        )
        try:
            stream = sd.InputStream(
                samplerate=cfg.sample_rate,
                blocksize=cfg.chunk_samples,
                device=device,
                channels=cfg.channels,
                dtype="int16",
                callback=self._callback,
            )
            stream.start()
        except Exception as exc:  # PortAudioError, ValueError (no such device)...
            raise DeviceNotAvailableError(
                f"microphone {cfg.device or 'default'!r} could not be opened at {cfg.sample_rate} Hz x {cfg.channels}: {exc}; "
                "list devices with `python -m sounddevice`"
            ) from exc
        self._stream = stream
        log.info(
            "microphone %r open: %d Hz, %d ch, %d ms chunks",
            cfg.device or "default",
            cfg.sample_rate,
            cfg.channels,
            cfg.chunk_ms,
        )

    def _read(self, timeout_s: float | None) -> Audio:
        try:
            data, stamp_ns = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no audio within {timeout_s} s") from None
        self.chunks += 1
        return Audio(
            data=data.reshape(-1, self.config.channels),
            sample_rate=self.config.sample_rate,
            frame_id=self.config.frame_id,
            stamp_ns=stamp_ns,
        )

    def _disconnect(self) -> None:
        if self._stream is not None:
            try:
                self._stream.stop()
            finally:
                self._stream.close()
                self._stream = None

    def stats(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "dropped": self.dropped, "overflows": self.overflows}
