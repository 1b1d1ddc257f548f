"""The live Foxglove stream of an agent: camera, predictions, sensor health and latency.

Open it in the Foxglove app with Open connection -> Foxglove WebSocket -> ``ws://127.0.0.1:PORT``
(8765 by default). It is served by the official foxglove-sdk WebSocket server (subprotocol
``foxglove.sdk.v1``) on a context of its own, so that two instances in one process never share
channels. It runs in the web-console process, not in the agent: the agent's serving thread must
not pay for JPEG/protobuf/JSON encoding or for slow viewers, and a viewer must not be able to stall
a prediction.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import foxglove
from foxglove.channels import CompressedImageChannel
from foxglove.messages import CompressedImage, Timestamp

from runtime.web.plain import dumps, json_safe

log = logging.getLogger(__name__)

TOPICS = ("/camera", "/prediction", "/health", "/latency")

_TIME = {
    "type": "object",
    "properties": {"sec": {"type": "integer"}, "nsec": {"type": "integer"}},
}
_NUM_OR_NULL = {"type": ["number", "null"]}
_PREDICTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "continua.Prediction",
    "properties": {
        "timestamp": _TIME,
        "label": {"type": ["string", "null"]},
        "class_id": {"type": "integer"},
        "confidence": {"type": "number"},
        "topk": {"type": "array", "items": {"type": "array", "items": {"type": ["string", "number"]}}},
        "known": {"type": "boolean"},
        "novelty": _NUM_OR_NULL,
        "unknown": {"type": "boolean"},
        "smoothed_label": {"type": ["string", "null"]},
        "smoothed_confidence": {"type": "number"},
        "stamp_ns": {"type": "integer"},
        "latency_ms": {"type": "number"},
        "latency_from": {"type": "string"},
        "age_ms": {"type": "object", "additionalProperties": _NUM_OR_NULL},
        "present": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "model_version": {"type": "integer"},
        "seq": {"type": "integer"},
    },
}
_SENSOR = {
    "type": "object",
    "properties": {"healthy": {"type": "boolean"}, "age_s": _NUM_OR_NULL, "messages": {"type": "integer"}},
}
_HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "continua.Health",
    "properties": {
        "timestamp": _TIME,
        "healthy": {"type": "boolean"},
        "sensors": {"type": "object", "properties": {m: _SENSOR for m in ("image", "audio", "imu")}},
    },
}
_LATENCY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "continua.Latency",
    "properties": {"timestamp": _TIME, "latency_ms": {"type": "number"}, "p99_ms": _NUM_OR_NULL},
}

def _stamp(stamp_ns: int) -> dict[str, int]:
    """Foxglove's ``{"sec", "nsec"}`` time, which its plots and message paths understand."""
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    return {"sec": sec, "nsec": nsec}


class FoxgloveLive:
    """A foxglove-sdk WebSocket server with the four channels of ``TOPICS``.

    Every publish is skipped cheaply while no viewer subscribes to its topic, so an idle stream costs
    the console nothing. Publishing after ``close()`` is a no-op, so shutdown order does not matter.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, name: str = "continua") -> None:
        self.host = host
        self._closed = False
        # Its own context: the global default one would share channels with any other instance
        # (or library) in the process, and topics would collide.
        self._context = foxglove.Context()
        try:
            self._server = foxglove.start_server(name=name, host=host, port=port, context=self._context)
        except RuntimeError as exc:  # the SDK raises FoxgloveError(RuntimeError), without the address
            if "in use" in str(exc).lower():
                raise OSError(errno.EADDRINUSE, f"Foxglove stream: {host}:{port} is already in use") from exc
            raise RuntimeError(f"Foxglove stream: cannot serve on {host}:{port}: {exc}") from exc
        # Read once: the SDK's server.port reports 0 once stopped, and the real port when port=0.
        self.port: int = int(self._server.port)
        self._camera = CompressedImageChannel("/camera", context=self._context)
        self._prediction = foxglove.Channel(
            "/prediction", schema=_PREDICTION_SCHEMA, message_encoding="json", context=self._context
        )
        self._health = foxglove.Channel(
            "/health", schema=_HEALTH_SCHEMA, message_encoding="json", context=self._context
        )
        self._latency = foxglove.Channel(
            "/latency", schema=_LATENCY_SCHEMA, message_encoding="json", context=self._context
        )
        log.info("Foxglove stream on %s (Open connection -> Foxglove WebSocket)", self.url)

    @property
    def url(self) -> str:
        """The address to paste into the Foxglove app."""
        return f"ws://{self.host}:{self.port}"

    def camera(self, jpeg: bytes, stamp_ns: int, frame_id: str = "camera") -> None:
        """Publish one JPEG frame on ``/camera`` as a ``foxglove.CompressedImage``."""
        if self._closed or not self._camera.has_sinks():
            return
        t = _stamp(stamp_ns)
        msg = CompressedImage(
            timestamp=Timestamp(t["sec"], t["nsec"]), frame_id=frame_id, data=bytes(jpeg), format="jpeg"
        )
        self._camera.log(msg, log_time=int(stamp_ns))

    def prediction(self, msg: dict) -> None:
        """Publish one prediction map on ``/prediction``; keys without a JSON form are dropped,
        unknown keys that have one pass through (the agent may add fields before this schema does)."""
        if self._closed or not self._prediction.has_sinks():
            return
        body = json_safe(msg)
        if not isinstance(body, dict):
            log.debug("Foxglove: prediction is not a map, dropped: %r", type(msg))
            return
        stamp_ns = body.get("stamp_ns")
        stamp_ns = stamp_ns if isinstance(stamp_ns, int) and not isinstance(stamp_ns, bool) else None
        if stamp_ns is not None:
            body["timestamp"] = _stamp(stamp_ns)
        self._log_json(self._prediction, body, stamp_ns)

    def health(self, sensors: dict, stamp_ns: int) -> None:
        """Publish the per-modality health on ``/health``, plus ``healthy``: some modality reports and all are."""
        if self._closed or not self._health.has_sinks():
            return
        clean = json_safe(sensors)
        clean = clean if isinstance(clean, dict) else {}
        healthy = bool(clean) and all(isinstance(s, dict) and s.get("healthy") is True for s in clean.values())
        body = {"timestamp": _stamp(stamp_ns), "healthy": healthy, "sensors": clean}
        self._log_json(self._health, body, int(stamp_ns))

    def latency(self, latency_ms: float, stamp_ns: int, p99_ms: float | None = None) -> None:
        """Publish one latency sample on ``/latency`` (one per prediction, for a Plot panel)."""
        if self._closed or not self._latency.has_sinks():
            return
        body = {
            "timestamp": _stamp(stamp_ns),
            "latency_ms": json_safe(float(latency_ms)),
            "p99_ms": None if p99_ms is None else json_safe(float(p99_ms)),
        }
        self._log_json(self._latency, body, int(stamp_ns))

    def _log_json(self, channel: foxglove.Channel, body: dict, stamp_ns: int | None) -> None:
        channel.log(dumps(body).encode(), log_time=stamp_ns)

    def close(self) -> None:
        """Stop the server and unadvertise the channels; idempotent."""
        if self._closed:
            return
        self._closed = True
        for channel in (self._camera, self._prediction, self._health, self._latency):
            channel.close()
        self._server.stop()
        log.info("Foxglove stream on %s stopped", self.url)

    def __enter__(self) -> FoxgloveLive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
