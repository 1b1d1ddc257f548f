"""OpenCV camera driver: a V4L2/USB device index, a video file, or a stream URL -> rgb8 Images.

Why OpenCV: ``cv2.VideoCapture`` opens device indices, files and network streams (RTSP,
HTTP MJPEG) with one API, and ``opencv-python-headless`` is already the ``camera`` extra.
OpenCV returns BGR; the wire topic ``camera`` carries rgb8 (grey sources become mono8), so
the colour conversion happens once, here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sensors.drivers.base import SensorDriver, missing_library
from sensors.errors import DeviceNotAvailableError
from sensors.wire import Image

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CameraConfig:
    """``device``: "0", "1"... (device index), a file path, or a URL (rtsp://, http://...).
    ``width``/``height``/``fps``: requested capture mode, 0 = the device's default (a camera
    may silently pick the nearest supported mode; the frames carry the real size)."""

    device: str = "0"
    width: int = 0
    height: int = 0
    fps: float = 0.0
    frame_id: str = "camera"
    max_failed_reads: int = 30  # consecutive failed grabs before a live camera counts as gone

    def __post_init__(self) -> None:
        if not self.device:
            raise ValueError(f"device must be an index, a path or a URL, got {self.device!r}")
        for name in ("width", "height"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fps < 0:
            raise ValueError(f"fps must be >= 0, got {self.fps}")
        if self.max_failed_reads < 1:
            raise ValueError(f"max_failed_reads must be >= 1, got {self.max_failed_reads}")

    @property
    def source(self) -> int | str:
        return int(self.device) if self.device.isdigit() else self.device

    @property
    def is_file(self) -> bool:
        return not self.device.isdigit() and Path(self.device).is_file()


def bgr_to_message(frame: np.ndarray, frame_id: str, stamp_ns: int) -> Image:
    """An OpenCV frame (H, W, 3) BGR or (H, W) grey as an rgb8 / mono8 wire Image."""
    if frame.dtype != np.uint8:
        raise ValueError(f"camera frame must be uint8, got {frame.dtype}")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        return Image(
            data=frame.reshape(frame.shape[0], frame.shape[1], 1),
            encoding="mono8",
            frame_id=frame_id,
            stamp_ns=stamp_ns,
        )
    if frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[:, :, :3]
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"camera frame must be (H, W, 3) or (H, W), got {frame.shape}")
    rgb = np.ascontiguousarray(frame[:, :, ::-1])
    return Image(data=rgb, encoding="rgb8", frame_id=frame_id, stamp_ns=stamp_ns)


class CameraDriver(SensorDriver, name="camera", config=CameraConfig):
    """Reads frames with ``cv2.VideoCapture``; see ``CameraConfig`` for the source forms."""

    def __init__(self, config: CameraConfig | None = None) -> None:
        super().__init__(config)
        self._cap: Any = None
        self._cv2: Any = None
        self._failed = 0
        self.frames = 0

    def _connect(self) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise missing_library("OpenCV (cv2)", "camera", exc) from exc
        cfg: CameraConfig = self.config
        cap = cv2.VideoCapture(cfg.source)
        if not cap.isOpened():
            cap.release()
            hint = (
                "check the index with `v4l2-ctl --list-devices` and permissions on /dev/video*"
                if cfg.device.isdigit()
                else "check the path/URL"
            )
            raise DeviceNotAvailableError(
                f"camera {cfg.device!r} could not be opened by OpenCV {cv2.__version__}: {hint}"
            )
        if not cfg.is_file:
            if cfg.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
            if cfg.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
            if cfg.fps:
                cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        log.info(
            "camera %r opened: %dx%d @ %.1f fps",
            cfg.device,
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            cap.get(cv2.CAP_PROP_FPS),
        )
        self._cap, self._cv2 = cap, cv2
        self._failed = 0

    def _read(self, timeout_s: float | None) -> Image:
        # VideoCapture.read blocks for at most one frame period; the timeout is implicit.
        ok, frame = self._cap.read()
        stamp_ns = time.time_ns()
        if not ok or frame is None:
            if self.config.is_file:
                raise EOFError(f"end of video file {self.config.device}")
            self._failed += 1
            if self._failed >= self.config.max_failed_reads:
                raise DeviceNotAvailableError(
                    f"camera {self.config.device!r} returned no frame {self._failed} times in a row"
                )
            raise TimeoutError(f"camera {self.config.device!r} returned no frame")
        self._failed = 0
        self.frames += 1
        return bgr_to_message(frame, self.config.frame_id, stamp_ns)

    def _disconnect(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def stats(self) -> dict[str, Any]:
        return {"frames": self.frames, "failed_in_a_row": self._failed}
