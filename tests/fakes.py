"""Hardware fakes, all in one place, for hardware that does not exist on CI machines.

Nothing here fakes ZeroMQ, OpenCV or numpy: a "camera" is a real video file written with
OpenCV, a "serial IMU" is a real file or named pipe carrying the documented text lines.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def synthetic_frame(height: int, width: int, index: int) -> np.ndarray:
    """A deterministic RGB frame: smooth gradients without wrap-around (JPEG-friendly), a
    different colour in each channel (a BGR/RGB swap shows), offset by ``index``."""
    y = np.arange(height, dtype=np.int32)[:, None]
    x = np.arange(width, dtype=np.int32)[None, :]
    r = x * 200 // max(1, width - 1) + (index * 5) % 50
    g = y * 100 // max(1, height - 1) + (index * 7) % 50
    b = 200 - (x + y) * 150 // max(1, width + height - 2) + (index * 11) % 50
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)


def write_video(path: Path, frames_rgb: Sequence[np.ndarray], fps: float = 10.0) -> Path | None:
    """Write RGB frames as an MJPG .avi that ``cv2.VideoCapture`` can read back; None if this
    OpenCV build cannot write it (then the caller skips)."""
    import cv2

    h, w = frames_rgb[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        return None
    for f in frames_rgb:
        writer.write(np.ascontiguousarray(f[:, :, ::-1]))
    writer.release()
    return path if path.exists() and path.stat().st_size > 0 else None


def imu_samples(
    n: int, *, start_ns: int = 1_700_000_000_000_000_000, rate_hz: float = 100.0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Plausible IMU samples: gravity on z plus noise, slow rotation about z, a unit quaternion."""
    rng = np.random.default_rng(seed)
    stamps = start_ns + (np.arange(n) * (1e9 / rate_hz)).astype(np.int64)
    acc = np.array([0.0, 0.0, 9.81]) + rng.normal(0, 0.05, (n, 3))
    gyro = np.array([0.0, 0.0, 0.1]) + rng.normal(0, 0.01, (n, 3))
    angle = 0.1 * np.arange(n) / rate_hz
    quat = np.stack([np.zeros(n), np.zeros(n), np.sin(angle / 2), np.cos(angle / 2)], axis=1)
    return {"stamps": stamps, "acc": acc, "gyro": gyro, "quat": quat}


def imu_lines(samples: dict[str, np.ndarray], *, orientation: bool = False) -> list[str]:
    """The documented line format ``stamp_ns,ax,ay,az,gx,gy,gz[,qx,qy,qz,qw]`` (repr floats: exact)."""
    lines = []
    for i, stamp in enumerate(samples["stamps"].tolist()):
        vals = [*samples["acc"][i].tolist(), *samples["gyro"][i].tolist()]
        if orientation:
            vals += samples["quat"][i].tolist()
        lines.append(",".join([str(stamp), *(repr(v) for v in vals)]))
    return lines


def write_lines(path: Path, lines: Sequence[str], newline: str = "\n") -> Path:
    path.write_bytes("".join(line + newline for line in lines).encode())
    return path


@contextmanager
def fifo_writer(path: Path, lines: Sequence[str | bytes], delay_s: float = 0.0) -> Iterator[threading.Thread]:
    """A named pipe at ``path`` fed with ``lines`` by a thread (like a serial device that
    streams, then goes away: the writer closes the pipe at the end)."""
    os.mkfifo(path)

    def feed() -> None:
        with open(path, "wb") as f:  # blocks until the reader opens the pipe
            for line in lines:
                f.write((line.encode() if isinstance(line, str) else line) + b"\n")
                f.flush()
                if delay_s:
                    time.sleep(delay_s)

    t = threading.Thread(target=feed, name="fifo-writer", daemon=True)
    t.start()
    try:
        yield t
    finally:
        if t.is_alive():  # unblock a writer still waiting for a reader
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                t.join(timeout=2.0)
                os.close(fd)
            except OSError:
                pass
        t.join(timeout=2.0)
