"""One small base class for every sensor driver, plus the name -> class registry.

Why a base class: ``sensors.publish`` (and tests) drive any sensor the same way
(``connect`` / ``read`` / ``disconnect``, or ``with driver:``) and never learn which library
sits underneath. Hardware libraries (OpenCV, sounddevice/PortAudio, pyserial) are optional
extras, so a driver imports its library inside ``connect`` and turns an ImportError into a
``DeviceNotAvailableError`` that says what to install; importing this package never needs
them.

``read`` semantics shared by all drivers:
- returns one wire ``Message`` (stamped with ``time.time_ns()`` clock acquisition time);
- raises ``TimeoutError`` when nothing arrived within ``timeout_s`` (the caller loops);
- raises ``EOFError`` when a finite source (video file, CSV file, closed pipe) is exhausted;
- raises ``DeviceNotAvailableError`` when the device is gone or was never connected.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from sensors.errors import DeviceNotAvailableError
from sensors.wire import Message

log = logging.getLogger(__name__)

DRIVERS: dict[str, type[SensorDriver]] = {}
"""name -> driver class, filled once at import time by each driver's class line (``register_driver``)."""

D = TypeVar("D", bound="type[SensorDriver]")


def register_driver(name: str) -> Callable[[D], D]:
    """Class decorator: make a driver available to ``get_driver(name)`` and the CLIs."""

    def deco(cls: D) -> D:
        if name in DRIVERS and DRIVERS[name] is not cls:
            raise ValueError(f"driver name {name!r} already registered by {DRIVERS[name].__name__}")
        cls.name = name
        DRIVERS[name] = cls
        return cls

    return deco


def get_driver(name: str) -> type[SensorDriver]:
    """The driver class registered as ``name`` (imports the built-in drivers first)."""
    import sensors.drivers  # noqa: F401  (registers camera, mic, imu)

    try:
        return DRIVERS[name]
    except KeyError:
        raise ValueError(f"unknown driver {name!r}; known: {sorted(DRIVERS)}") from None


def missing_library(
    library: str, extra: str, exc: BaseException | None = None, hint: str = ""
) -> DeviceNotAvailableError:
    """A uniform, actionable error for a missing optional library."""
    why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    more = f"; {hint}" if hint else ""
    return DeviceNotAvailableError(
        f"{library} is not available{why}: install it with pip install 'continua-robot[{extra}]'{more}"
    )


class SensorDriver(ABC):
    """A sensor that produces wire messages. A subclass names itself and its config in its class
    line, ``class CameraDriver(SensorDriver, name="camera", config=CameraConfig)``, and
    implements ``_connect``, ``_read`` and ``_disconnect``."""

    name: ClassVar[str] = ""
    default_topic: ClassVar[str] = ""
    config_cls: ClassVar[type]

    def __init_subclass__(cls, *, name: str = "", config: type | None = None, topic: str = "",
                          **kwargs: Any) -> None:
        """One place for what every driver declares: its config class, its default topic (its
        name unless ``topic``) and its registration under ``name`` (``register_driver``)."""
        super().__init_subclass__(**kwargs)
        if config is not None:
            cls.config_cls = config
        if name:
            cls.default_topic = topic or name
            register_driver(name)(cls)

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(self.config).__name__}"
            )
        self._connected = False

    # ------------------------------------------------------------------ public API
    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        """Open the device; raises ``DeviceNotAvailableError`` with an install/connect hint."""
        if self._connected:
            return
        self._connect()
        self._connected = True
        log.info("%s connected", type(self).__name__)

    def read(self, timeout_s: float | None = 1.0) -> Message:
        """The next message (see the module docstring for TimeoutError / EOFError)."""
        if not self._connected:
            raise DeviceNotAvailableError(f"{type(self).__name__} is not connected: call connect() first")
        return self._read(timeout_s)

    def disconnect(self) -> None:
        """Release the device; safe to call twice."""
        if not self._connected:
            return
        self._connected = False
        self._disconnect()
        log.info("%s disconnected", type(self).__name__)

    def stats(self) -> dict[str, Any]:
        """Driver counters for logs (bad lines, overflows...); empty by default."""
        return {}

    def __enter__(self) -> SensorDriver:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disconnect()

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def _connect(self) -> None: ...

    @abstractmethod
    def _read(self, timeout_s: float | None) -> Message: ...

    @abstractmethod
    def _disconnect(self) -> None: ...
