"""The ``[web]`` table: where the web console listens, which agent it watches, how often it pushes.

Why loopback by default: the page commands a robot. Another ``host`` must be set on purpose (and
is logged as a warning); access still needs the token either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.access import is_loopback
from runtime.config import _check_endpoint, _check_insecure, _check_positive, _check_range


@dataclass(kw_only=True)
class WebConfig:
    """The web console process (``python -m runtime.web``)."""

    host: str = "127.0.0.1"  # HTTP bind address; anything but loopback is logged as a warning
    port: int = 8080  # 0: any free port (the start-up line names it)
    control: str = "tcp://127.0.0.1:5570"  # the agent's control socket (commands, status)
    predictions: str = "tcp://127.0.0.1:5560"  # the agent's predictions (SUB)
    sensors: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5556"])  # camera thumbnails (SUB)
    camera_topic: str = "camera"
    insecure: bool = False  # --insecure only (refused in TOML): an agent started with --insecure, loopback only
    keys_dir: Path = Path("keys/")  # server.key + clients/NAME.key_secret (an operator key of its own)
    key_name: str | None = None  # this console's key in keys_dir/clients/; None: the only one there
    state_dir: Path = Path("state/web")  # operator.token and viewer.token, mode 0600, new at every start
    timeout_s: float = 3.0  # per control request
    status_hz: float = 2.0  # status polls per second (health, job progress, notices)
    thumbnail_fps: float = 5.0  # camera thumbnails pushed per second at most
    thumbnail_width: int = 320
    jpeg_quality: int = 70
    client_queue: int = 256  # messages queued per browser; a slow browser loses the oldest (counted)
    foxglove: bool = False  # also serve the live Foxglove WebSocket stream (--foxglove [PORT])
    foxglove_host: str = "127.0.0.1"
    foxglove_port: int = 8765
    # CurveZMQ on the sensor streams (sensors.curve), as in the agent's [intake] table; off when empty
    curve_publisher_keys: dict[str, Any] = field(default_factory=dict)
    curve_secret_key: str = ""

    def __post_init__(self) -> None:
        for name in ("control", "predictions"):
            _check_endpoint(name, getattr(self, name))
        for endpoint in self.sensors:
            _check_endpoint("sensors", endpoint)
        _check_insecure("control", self.insecure, self.control)
        self.keys_dir, self.state_dir = Path(self.keys_dir), Path(self.state_dir)
        for name in ("timeout_s", "status_hz", "thumbnail_fps"):
            _check_positive(name, getattr(self, name))
        _check_range(self, 0, 65535, "port", "foxglove_port")
        _check_range(self, 16, 1920, "thumbnail_width")
        _check_range(self, 10, 95, "jpeg_quality")
        if self.client_queue < 8:
            raise ValueError(f"client_queue={self.client_queue!r} must be >= 8")

    @property
    def loopback(self) -> bool:
        return is_loopback(f"tcp://{self.host}:{self.port}")
