"""Bounded JPEG decoding for camera frames that arrive compressed (``encoding = "jpeg"``).

JPEG frames come from the imagezmq bridge (``--keep-jpeg``, or when OpenCV is missing there)
and from cameras that compress on board. Why bounded: a JPEG of a few kilobytes can declare
65535 x 65535 pixels (a 12 GB decode), so every frame is checked *before* decoding, in
microseconds: its compressed size against ``max_bytes``, then the height and width in its
SOF marker against ``max_pixels`` and against the wire header's ``height``/``width``. Only
then is it decoded, with OpenCV when installed (it releases the GIL) or else Pillow.

Every refusal is a ``WireError`` whose ``reason`` is one of ``JPEG_REASONS``, so a receiver
counts it like any other unusable message (docs/wire.md lists the codes).
"""

from __future__ import annotations

import io
import logging
import struct
from typing import Any

import numpy as np

from sensors.errors import WireError

log = logging.getLogger(__name__)

DECODERS = ("auto", "opencv", "pillow")

JPEG_REASONS: dict[str, str] = {
    "jpeg_bytes": "compressed JPEG larger than the receiver's max_jpeg_bytes",
    "jpeg_header": "no SOF marker in the first 64 KiB, or its size differs from the header's height/width",
    "jpeg_pixels": "height x width declared by the JPEG above the receiver's max_jpeg_pixels",
    "jpeg_decode": "the decoder refused the data (truncated or corrupt), or decoded another size",
    "jpeg_no_decoder": "neither OpenCV nor Pillow is installed in the receiving process",
}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes | memoryview | np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF marker, or None if there is none before the scan."""
    b = bytes(memoryview(data).cast("B")[:65536]) if not isinstance(data, bytes) else data[:65536]
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
        elif marker in (0xD9, 0xDA):
            return None
        elif marker in _SOF:
            if i + 9 > len(b):
                return None
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return (h, w) if h and w else None
        else:
            i += 2 + struct.unpack(">H", b[i + 2 : i + 4])[0]
    return None


class JpegDecoder:
    """Checks and decodes JPEG frames to (H, W, 3) uint8 RGB. Thread-safe (no state but the backend)."""

    def __init__(self, *, max_bytes: int = 8 << 20, max_pixels: int = 3840 * 2160, backend: str = "auto") -> None:
        if max_bytes <= 0 or max_pixels <= 0:
            raise ValueError(f"max_bytes and max_pixels must be > 0, got {max_bytes}, {max_pixels}")
        if backend not in DECODERS:
            raise ValueError(f"backend={backend!r} must be one of {DECODERS}")
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.backend, self._lib = _load(backend)

    def check(self, data: np.ndarray, height: int, width: int) -> tuple[int, int]:
        """(height, width) of a JPEG that may be decoded; ``WireError`` otherwise. Cheap: reads
        the markers before the first scan (at most 64 KiB), never the entropy-coded data."""
        if data.nbytes > self.max_bytes:
            raise WireError("jpeg_bytes", f"JPEG is {data.nbytes} bytes, limit {self.max_bytes}")
        size = jpeg_size(data)
        if size is None:
            raise WireError("jpeg_header", "no SOF marker (height/width) before the first scan")
        if size != (height, width):
            raise WireError("jpeg_header", f"JPEG is {size[0]}x{size[1]}, header says {height}x{width}")
        if size[0] * size[1] > self.max_pixels:
            raise WireError("jpeg_pixels", f"JPEG is {size[0]}x{size[1]}, limit {self.max_pixels} pixels")
        return size

    def decode(self, data: np.ndarray, height: int, width: int) -> np.ndarray:
        """A new (height, width, 3) uint8 RGB array; ``check`` runs first."""
        self.check(data, height, width)
        if self._lib is None:
            raise WireError("jpeg_no_decoder", "install opencv-python-headless or pillow to decode JPEG frames")
        try:
            rgb = _decode_cv2(self._lib, data) if self.backend == "opencv" else _decode_pil(self._lib, data)
        except WireError:
            raise
        except Exception as exc:  # each library has its own error types for corrupt data
            raise WireError("jpeg_decode",
                            f"{self.backend} could not decode the JPEG: {type(exc).__name__}: {exc}") from None
        if rgb.shape != (height, width, 3):
            raise WireError("jpeg_decode", f"decoded {rgb.shape}, expected ({height}, {width}, 3)")
        return rgb


def _load(backend: str) -> tuple[str, Any]:
    order = ("opencv", "pillow") if backend == "auto" else (backend,)
    for name in order:
        try:
            if name == "opencv":
                import cv2

                return name, cv2
            import PIL.Image

            return name, PIL.Image
        except ImportError:
            continue
    log.warning("no JPEG decoder (%s) installed: JPEG camera frames will be counted as jpeg_no_decoder",
                " or ".join(order))
    return order[0], None


def _decode_cv2(cv2: Any, data: np.ndarray) -> np.ndarray:
    bgr = cv2.imdecode(np.asarray(data, dtype=np.uint8).reshape(-1), cv2.IMREAD_COLOR)
    if bgr is None:
        raise WireError("jpeg_decode", "OpenCV could not decode the JPEG (truncated or corrupt)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_pil(pil_image: Any, data: np.ndarray) -> np.ndarray:
    with pil_image.open(io.BytesIO(memoryview(np.ascontiguousarray(data)).cast("B"))) as im:
        if im.format != "JPEG":
            raise WireError("jpeg_decode", f"payload is {im.format}, not JPEG")
        im.load()  # raises OSError for truncated data (LOAD_TRUNCATED_IMAGES stays off)
        return np.asarray(im.convert("RGB"))
