"""Text-line IMU driver: a serial port (pyserial), a CSV file, a named pipe or stdin -> Imu batches.

Line format (one sample per line, ASCII/UTF-8, ``\\n`` or ``\\r\\n``)::

    stamp_ns,ax,ay,az,gx,gy,gz[,qx,qy,qz,qw]

- ``stamp_ns``: integer nanoseconds on the ``time.time_ns()`` clock; ``0`` = "stamp on
  receipt" for microcontrollers without a synchronised clock.
- ``ax, ay, az``: linear acceleration in m/s²; ``gx, gy, gz``: angular velocity in rad/s
  (the ROS ``sensor_msgs/Imu`` units).
- ``qx, qy, qz, qw``: optional orientation quaternion. When a batch has none, its
  ``orientation_covariance[0] = -1`` ("no estimate", ROS convention) and orientation is 0.
- Empty lines, ``#`` comments and a header line starting with ``stamp`` are skipped.

Why batches: at 100 Hz and more, one message per sample would make the per-message overhead
dominate; ``batch`` samples travel in one ``Imu`` message, each keeping its own stamp. The
batch ``stamp_ns`` is its newest sample's stamp. Malformed lines (noise on a serial line
after a reset is normal) are counted by reason and skipped, never fatal.

Why a reader thread: serial reads, pipes and files all become one queue of lines, so
``read(timeout_s)`` has one timeout behaviour whatever the source.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import select
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from sensors.drivers.base import SensorDriver, missing_library
from sensors.errors import DeviceNotAvailableError
from sensors.wire import NO_COVARIANCE, Imu

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1024
_EOF = object()


class BadLine(ValueError):
    """A line that does not follow the documented format; ``reason`` keys the counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(kw_only=True)
class ImuSerialConfig:
    """Exactly one source: ``port`` (serial device, e.g. /dev/ttyUSB0) or ``file`` (a CSV file,
    a named pipe, or "-" for stdin). ``follow`` keeps reading a regular file as it grows."""

    port: str = ""
    baudrate: int = 115200
    file: str = ""
    follow: bool = False
    batch: int = 10
    frame_id: str = "imu"
    accel_variance: float = 0.0  # diagonal of the covariances; 0 = unknown (ROS convention)
    gyro_variance: float = 0.0

    def __post_init__(self) -> None:
        if bool(self.port) == bool(self.file):
            raise ValueError(f"exactly one of port ({self.port!r}) and file ({self.file!r}) must be set")
        if self.baudrate <= 0:
            raise ValueError(f"baudrate must be > 0, got {self.baudrate}")
        if not 1 <= self.batch <= 10_000:
            raise ValueError(f"batch must be in [1, 10000], got {self.batch}")
        for name in ("accel_variance", "gyro_variance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def parse_line(raw: bytes, now_ns: int) -> tuple[int, np.ndarray] | None:
    """One line -> (stamp_ns, values[10] in wire column order) or None for a skipped line.

    Raises ``BadLine`` with a reason: "too_long", "encoding", "fields", "number",
    "non_finite", "stamp".
    """
    if len(raw) > MAX_LINE_BYTES:
        raise BadLine("too_long", f"{len(raw)} bytes > {MAX_LINE_BYTES}")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadLine("encoding", "not UTF-8") from None
    if not text or text.startswith("#") or text.lower().startswith("stamp"):
        return None
    parts = text.split(",")
    if len(parts) not in (7, 11):
        raise BadLine("fields", f"expected 7 or 11 comma-separated fields, got {len(parts)}")
    try:
        stamp = int(parts[0])
    except ValueError:
        raise BadLine("stamp", f"stamp_ns {parts[0]!r} is not an integer") from None
    if stamp < 0 or stamp >= 2**63:
        raise BadLine("stamp", f"stamp_ns {stamp} out of range")
    try:
        nums = [float(p) for p in parts[1:]]
    except ValueError:
        raise BadLine("number", "a value is not a number") from None
    if not all(math.isfinite(x) for x in nums):
        raise BadLine("non_finite", "NaN or infinity")
    row = np.zeros(10, dtype=np.float64)
    row[7:10] = nums[0:3]  # linear acceleration (m/s^2)
    row[4:7] = nums[3:6]  # angular velocity (rad/s)
    if len(nums) == 10:
        row[0:4] = nums[6:10]
    else:
        row[0] = math.nan  # marker: no orientation; replaced by 0 when batching
    return (stamp if stamp else now_ns), row


class ImuSerialDriver(SensorDriver, name="imu", config=ImuSerialConfig):
    """Reads ``stamp_ns,ax,ay,az,gx,gy,gz[,qx,qy,qz,qw]`` lines and yields Imu batches."""

    def __init__(self, config: ImuSerialConfig | None = None) -> None:
        super().__init__(config)
        self._lines: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._source: Any = None
        self._eof = False
        self.samples = 0
        self.bad_lines: Counter[str] = Counter()

    # ------------------------------------------------------------------ source
    def _connect(self) -> None:
        cfg: ImuSerialConfig = self.config
        if cfg.port:
            try:
                import serial
            except ImportError as exc:
                raise missing_library("pyserial", "imu", exc) from exc
            try:
                self._source = serial.Serial(cfg.port, cfg.baudrate, timeout=0.1)
            except (serial.SerialException, OSError, ValueError) as exc:
                raise DeviceNotAvailableError(
                    f"serial port {cfg.port!r} could not be opened at {cfg.baudrate} baud: {exc}"
                ) from exc
            target = self._pump_serial
        else:
            if cfg.file == "-":
                fd = os.dup(0)
            else:
                try:
                    fd = os.open(cfg.file, os.O_RDONLY | os.O_NONBLOCK)
                except OSError as exc:
                    raise DeviceNotAvailableError(
                        f"IMU file {cfg.file!r} could not be opened: {exc}"
                    ) from exc
            self._source = fd
            target = self._pump_fd
        self._stop.clear()
        self._eof = False
        self._thread = threading.Thread(target=target, name="imu-reader", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._lines.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _pump_serial(self) -> None:
        port = self._source
        try:
            while not self._stop.is_set():
                line = port.readline()
                if line:
                    self._put(line)
        except Exception as exc:  # SerialException when the device is unplugged
            log.error("serial port %s failed: %s", self.config.port, exc)
            self._put(exc)

    def _pump_fd(self) -> None:
        fd = self._source
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        buf = b""
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.1)
                if not ready:
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:  # regular file: end for now; pipe: the writer closed it
                    if regular and self.config.follow:
                        time.sleep(0.05)
                        continue
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._put(line)
                if len(buf) > MAX_LINE_BYTES:
                    self._put(buf)  # counted as too_long by the parser
                    buf = b""
            if buf:
                self._put(buf)
        finally:
            self._put(_EOF)

    # ------------------------------------------------------------------ batches
    def _read(self, timeout_s: float | None) -> Imu:
        if self._eof:
            raise EOFError(f"IMU source {self.config.file or self.config.port!r} is exhausted")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stamps: list[int] = []
        rows: list[np.ndarray] = []
        while len(rows) < self.config.batch:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._lines.get(timeout=remaining) if remaining != 0.0 else self._lines.get_nowait()
            except queue.Empty:
                break
            if item is _EOF:
                self._eof = True
                break
            if isinstance(item, Exception):
                raise DeviceNotAvailableError(f"IMU source {self.config.port!r} failed: {item}")
            try:
                parsed = parse_line(item, time.time_ns())
            except BadLine as exc:
                self.bad_lines[exc.reason] += 1
                if sum(self.bad_lines.values()) <= 10:
                    log.warning("bad IMU line skipped (%s): %r", exc, item[:80])
                continue
            if parsed is not None:
                stamps.append(parsed[0])
                rows.append(parsed[1])
        if not rows:
            if self._eof:
                raise EOFError(f"IMU source {self.config.file or self.config.port!r} is exhausted")
            raise TimeoutError(f"no IMU sample within {timeout_s} s")
        self.samples += len(rows)
        return self._batch(stamps, rows)

    def _batch(self, stamps: list[int], rows: list[np.ndarray]) -> Imu:
        values = np.stack(rows)
        has_orientation = ~np.isnan(values[:, 0])
        values[~has_orientation, 0:4] = 0.0
        cfg: ImuSerialConfig = self.config
        orientation_cov = (0.0,) * 9 if has_orientation.all() else NO_COVARIANCE
        return Imu(
            stamps_ns=np.asarray(stamps, dtype=np.int64),
            values=values,
            stamp_ns=int(max(stamps)),
            frame_id=cfg.frame_id,
            orientation_covariance=orientation_cov,
            angular_velocity_covariance=_diag(cfg.gyro_variance),
            linear_acceleration_covariance=_diag(cfg.accel_variance),
        )

    def _disconnect(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if isinstance(self._source, int):
            os.close(self._source)
        elif self._source is not None:
            self._source.close()
        self._source = None

    def stats(self) -> dict[str, Any]:
        return {"samples": self.samples, "bad_lines": dict(self.bad_lines)}


def _diag(variance: float) -> tuple[float, ...]:
    return (variance, 0.0, 0.0, 0.0, variance, 0.0, 0.0, 0.0, variance)
