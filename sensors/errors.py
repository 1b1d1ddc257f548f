"""Typed errors of the sensors package.

One exception type per failure family so that receivers can catch exactly what they can
survive (a bad message) and let everything else (a programming error) surface. All derive
from ``SensorsError`` (and so from ``common.errors.ContinuaError``) and keep their builtin
kind as a mixin, so ``except ValueError`` still catches a ``WireError``.
"""

from __future__ import annotations

from common.errors import ContinuaError


class SensorsError(ContinuaError):
    """Base of every error raised on purpose by ``sensors``."""


class WireError(SensorsError, ValueError):
    """A message that does not follow the wire format.

    ``reason`` is a short, stable code (``"payload_size"``, ``"encoding"``...) used as the
    key of the per-reason drop counters; ``str(err)`` is the human explanation naming the
    offending value and the expected spec. ``reason`` and ``detail`` are the shared ``code``
    and ``message`` under the names the wire format's documentation uses.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail, code=reason)

    @property
    def reason(self) -> str:
        return self.code or ""

    @property
    def detail(self) -> str:
        return self.message


class DeviceNotAvailableError(SensorsError, RuntimeError):
    """A hardware driver (camera, microphone, serial IMU) or its library is missing."""


class CurveKeyError(SensorsError, ValueError):
    """A CurveZMQ key file for a sensor stream that is missing, unreadable or holds no key."""
