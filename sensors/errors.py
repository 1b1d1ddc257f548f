"""Typed errors of the sensors package.

One exception type per failure family so that receivers can catch exactly what they can
survive (a bad message) and let everything else (a programming error) surface.
"""

from __future__ import annotations


class WireError(ValueError):
    """A message that does not follow the wire format.

    ``reason`` is a short, stable code (``"payload_size"``, ``"encoding"``...) used as the
    key of the per-reason drop counters; ``str(err)`` is the human explanation naming the
    offending value and the expected spec.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeviceNotAvailableError(RuntimeError):
    """A hardware driver (camera, microphone, serial IMU) or its library is missing."""


class DatasetNotPreparedError(FileNotFoundError):
    """Offline demo data has not been prepared yet (run ``make data``)."""


class CurveKeyError(ValueError):
    """A CurveZMQ key file for a sensor stream that is missing, unreadable or holds no key."""
