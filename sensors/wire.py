"""The continua wire format: ``[topic, msgpack header, raw payload frames...]``.

Why this shape: the header is small and self-describing (msgpack map, schema version ``v``)
while pixels, PCM and IMU samples travel as raw buffers that ZeroMQ sends without a copy and
that the receiver wraps as read-only numpy views. Nothing is ever pickled. Field names and
units follow ROS 2 ``sensor_msgs`` (Image, Imu) so that bridges are trivial.

The normative specification, written for C++ and ROS 2 implementers, is ``docs/wire.md``;
this docstring is the short version.

Header (all kinds): ``v`` (int, schema version), ``kind`` ("image" | "audio" | "imu"),
``seq`` (uint64, strictly increasing per topic and publisher session), ``stamp_ns``
(uint64, acquisition time, ``time.time_ns()`` clock), ``frame_id`` (str), and the optional
``session`` (uint64 chosen at random by each publisher instance, so a restarted sensor is
recognised as a restart and not as millions of dropped frames). A publisher written from the
ROS-style fields alone leaves ``session`` out: it reads as session 0, and its restarts are
recognised by ``seq`` going back (``SequenceTracker``).

- image: ``height``, ``width``, ``encoding`` ("rgb8", "bgr8", "mono8", "jpeg"), ``step``
  (bytes per row; 0 for jpeg). One payload frame: the row-major pixels, or the JPEG bytes.
- audio: ``sample_rate`` (Hz), ``channels``, ``format`` ("s16le", "f32le"), ``samples``
  (per channel). One payload frame: interleaved little-endian PCM.
- imu: ``count`` (samples in this batch), ``orientation_covariance``,
  ``angular_velocity_covariance``, ``linear_acceleration_covariance`` (9 floats each,
  row-major 3x3; ``[-1, 0...]`` means "no estimate", as in ROS). Two payload frames:
  int64 ``stamps_ns[count]`` and float64 ``values[count, 10]`` =
  orientation (x, y, z, w), angular_velocity (x, y, z) rad/s, linear_acceleration (x, y, z) m/s².
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

from sensors.errors import WireError

SCHEMA_VERSION = 1
MAX_TOPIC_BYTES = 256
MAX_HEADER_BYTES = 16 * 1024
MAX_FRAME_ID = 256
MAX_IMAGE_SIDE = 16384
MAX_AUDIO_CHANNELS = 64
MAX_SAMPLE_RATE = 768_000
MAX_IMU_BATCH = 100_000
UINT64_MAX = 2**64 - 1

IMAGE_ENCODINGS: dict[str, int] = {"rgb8": 3, "bgr8": 3, "mono8": 1, "jpeg": 0}
AUDIO_FORMATS: dict[str, np.dtype] = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
IMU_COLUMNS = 10
NO_COVARIANCE: tuple[float, ...] = (-1.0,) + (0.0,) * 8
_STAMPS_DTYPE = np.dtype("<i8")
_IMU_DTYPE = np.dtype("<f8")


def new_session_id() -> int:
    """A random 63-bit publisher session id (msgpack-friendly, practically unique)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass(kw_only=True, slots=True)
class _Stamped:
    seq: int = 0
    stamp_ns: int = 0
    frame_id: str = ""
    session: int = 0

    kind: ClassVar[str] = ""


@dataclass(kw_only=True, slots=True)
class Image(_Stamped):
    """A camera frame. ``data`` is (H, W, C) uint8 for raw encodings, 1-D uint8 for jpeg."""

    data: np.ndarray
    encoding: str = "rgb8"
    height: int = 0  # only needed for jpeg; raw encodings take it from data.shape
    width: int = 0

    kind: ClassVar[str] = "image"

    def __post_init__(self) -> None:
        if self.encoding != "jpeg" and self.data.ndim >= 2:
            self.height, self.width = int(self.data.shape[0]), int(self.data.shape[1])


@dataclass(kw_only=True, slots=True)
class Audio(_Stamped):
    """A chunk of PCM: ``data`` is (samples, channels), int16 (s16le) or float32 (f32le)."""

    data: np.ndarray
    sample_rate: int = 16000

    kind: ClassVar[str] = "audio"

    @property
    def format(self) -> str:
        return "s16le" if self.data.dtype == np.int16 else "f32le"


@dataclass(kw_only=True, slots=True)
class Imu(_Stamped):
    """A batch of IMU samples (``count`` >= 1), each with its own stamp."""

    stamps_ns: np.ndarray
    values: np.ndarray  # (count, 10): orientation xyzw, angular_velocity xyz, linear_acceleration xyz
    orientation_covariance: tuple[float, ...] = NO_COVARIANCE
    angular_velocity_covariance: tuple[float, ...] = NO_COVARIANCE
    linear_acceleration_covariance: tuple[float, ...] = NO_COVARIANCE

    kind: ClassVar[str] = "imu"

    @property
    def orientation(self) -> np.ndarray:
        return self.values[:, 0:4]

    @property
    def angular_velocity(self) -> np.ndarray:
        return self.values[:, 4:7]

    @property
    def linear_acceleration(self) -> np.ndarray:
        return self.values[:, 7:10]


Message = Image | Audio | Imu
KINDS = {"image": Image, "audio": Audio, "imu": Imu}


# --------------------------------------------------------------------------- encode
def encode(topic: str, msg: Message) -> list[Any]:
    """Frames for ``socket.send_multipart(frames, copy=False)``; payloads are not copied
    unless the array is not C-contiguous (then once, here, as pyzmq needs a flat buffer)."""
    topic_b = topic.encode()
    if not topic_b or len(topic_b) > MAX_TOPIC_BYTES:
        raise WireError("topic", f"topic must be 1..{MAX_TOPIC_BYTES} UTF-8 bytes, got {len(topic_b)}")
    header: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "kind": msg.kind,
        "seq": int(msg.seq),
        "stamp_ns": int(msg.stamp_ns),
        "frame_id": msg.frame_id,
        "session": int(msg.session),
    }
    if isinstance(msg, Image):
        data = _as_uint8(msg.data, "image data")
        if msg.encoding == "jpeg":
            header.update(height=msg.height, width=msg.width, encoding="jpeg", step=0)
        else:
            channels = IMAGE_ENCODINGS.get(msg.encoding)
            if channels is None:
                raise WireError("encoding", f"unknown image encoding {msg.encoding!r}; expected one of {sorted(IMAGE_ENCODINGS)}")
            if data.ndim == 2 and channels == 1:
                data = data[:, :, None]
            if data.ndim != 3 or data.shape[2] != channels:
                raise WireError("shape", f"{msg.encoding} image must be (H, W, {channels}), got {data.shape}")
            header.update(height=data.shape[0], width=data.shape[1], encoding=msg.encoding, step=data.shape[1] * channels)
        payload = [np.ascontiguousarray(data)]
    elif isinstance(msg, Audio):
        data = msg.data if msg.data.ndim == 2 else msg.data.reshape(-1, 1)
        fmt = {np.dtype(np.int16): "s16le", np.dtype(np.float32): "f32le"}.get(data.dtype)
        if fmt is None:
            raise WireError("dtype", f"audio must be int16 or float32, got {data.dtype}")
        header.update(sample_rate=int(msg.sample_rate), channels=data.shape[1], format=fmt, samples=data.shape[0])
        payload = [np.ascontiguousarray(data.astype(AUDIO_FORMATS[fmt], copy=False))]
    elif isinstance(msg, Imu):
        values = np.ascontiguousarray(msg.values, dtype=_IMU_DTYPE)
        stamps = np.ascontiguousarray(msg.stamps_ns, dtype=_STAMPS_DTYPE)
        if values.ndim != 2 or values.shape[1] != IMU_COLUMNS or stamps.shape != (values.shape[0],):
            raise WireError("shape", f"imu values must be (N, {IMU_COLUMNS}) with N stamps, got {values.shape} and {stamps.shape}")
        header.update(
            count=values.shape[0],
            orientation_covariance=[float(x) for x in msg.orientation_covariance],
            angular_velocity_covariance=[float(x) for x in msg.angular_velocity_covariance],
            linear_acceleration_covariance=[float(x) for x in msg.linear_acceleration_covariance],
        )
        payload = [stamps, values]
    else:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    _validate_header(header)
    return [topic_b, msgpack.packb(header), *payload]


def _as_uint8(data: np.ndarray, what: str) -> np.ndarray:
    if data.dtype != np.uint8:
        raise WireError("dtype", f"{what} must be uint8, got {data.dtype}")
    return data


# --------------------------------------------------------------------------- decode
def _buffer(frame: Any) -> memoryview:
    """A read-only memoryview of a received frame without copying (zmq.Frame, bytes or
    memoryview). Read-only because a zmq.Frame's buffer is writable and, over inproc, is
    the sender's own array."""
    buf = getattr(frame, "buffer", None)
    try:
        return memoryview(buf if buf is not None else frame).toreadonly()
    except TypeError:
        raise WireError("frame_type", f"frame is not a buffer: {type(frame).__name__}") from None


def decode(frames: Sequence[Any]) -> tuple[str, Message]:
    """Parse and validate one multipart message; the payload arrays are read-only views.

    Raises ``WireError`` (and nothing else) for any malformed input.
    """
    if len(frames) < 3:
        raise WireError("frame_count", f"expected [topic, header, payload...], got {len(frames)} frames")
    topic_mv = _buffer(frames[0])
    if not 0 < topic_mv.nbytes <= MAX_TOPIC_BYTES:
        raise WireError("topic", f"topic must be 1..{MAX_TOPIC_BYTES} bytes, got {topic_mv.nbytes}")
    try:
        topic = bytes(topic_mv).decode()
    except UnicodeDecodeError as exc:
        raise WireError("topic", f"topic is not UTF-8: {exc}") from None
    header_mv = _buffer(frames[1])
    if header_mv.nbytes > MAX_HEADER_BYTES:
        raise WireError("header_size", f"header is {header_mv.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(header_mv, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError("header_msgpack", f"header is not valid msgpack: {type(exc).__name__}") from None
    _validate_header(header)
    kind = header["kind"]
    payload = [_buffer(f) for f in frames[2:]]
    common = {
        "seq": header["seq"],
        "stamp_ns": header["stamp_ns"],
        "frame_id": header["frame_id"],
        "session": header.get("session", 0),  # optional: 0 = a publisher that sends none
    }
    if kind == "image":
        _expect_frames(payload, 1)
        h, w, enc = header["height"], header["width"], header["encoding"]
        if enc == "jpeg":
            data = np.frombuffer(payload[0], dtype=np.uint8)
            if data.size < 4 or data[0] != 0xFF or data[1] != 0xD8:
                raise WireError("payload_size", "jpeg payload does not start with the JPEG SOI marker")
            return topic, Image(data=data, encoding="jpeg", height=h, width=w, **common)
        channels = IMAGE_ENCODINGS[enc]
        if header["step"] != w * channels:
            raise WireError("field_range", f"step {header['step']} != width*channels {w * channels} for {enc}")
        _expect_bytes(payload[0], h * w * channels, f"{enc} {h}x{w}")
        data = np.frombuffer(payload[0], dtype=np.uint8).reshape(h, w, channels)
        return topic, Image(data=data, encoding=enc, **common)
    if kind == "audio":
        _expect_frames(payload, 1)
        dtype = AUDIO_FORMATS[header["format"]]
        n, ch = header["samples"], header["channels"]
        _expect_bytes(payload[0], n * ch * dtype.itemsize, f"{header['format']} {n}x{ch}")
        data = np.frombuffer(payload[0], dtype=dtype).reshape(n, ch)
        return topic, Audio(data=data, sample_rate=header["sample_rate"], **common)
    _expect_frames(payload, 2)
    n = header["count"]
    _expect_bytes(payload[0], n * _STAMPS_DTYPE.itemsize, f"imu stamps[{n}]")
    _expect_bytes(payload[1], n * IMU_COLUMNS * _IMU_DTYPE.itemsize, f"imu values[{n}, {IMU_COLUMNS}]")
    values = np.frombuffer(payload[1], dtype=_IMU_DTYPE).reshape(n, IMU_COLUMNS)
    if not np.isfinite(values).all():
        raise WireError("field_range", "imu values contain NaN or infinity")
    return topic, Imu(
        stamps_ns=np.frombuffer(payload[0], dtype=_STAMPS_DTYPE),
        values=values,
        orientation_covariance=tuple(header["orientation_covariance"]),
        angular_velocity_covariance=tuple(header["angular_velocity_covariance"]),
        linear_acceleration_covariance=tuple(header["linear_acceleration_covariance"]),
        **common,
    )


def _expect_frames(payload: list[memoryview], n: int) -> None:
    if len(payload) != n:
        raise WireError("frame_count", f"expected {n} payload frame(s), got {len(payload)}")


def _expect_bytes(buf: memoryview, n: int, spec: str) -> None:
    if buf.nbytes != n:
        raise WireError("payload_size", f"payload is {buf.nbytes} bytes, {spec} needs {n}")


# --------------------------------------------------------------------------- validation
_COMMON = {"v": int, "kind": str, "seq": int, "stamp_ns": int, "frame_id": str}
_OPTIONAL = {"session": int}  # absent = 0: restarts are then recognised by seq going back
_PER_KIND: dict[str, dict[str, type]] = {
    "image": {"height": int, "width": int, "encoding": str, "step": int},
    "audio": {"sample_rate": int, "channels": int, "format": str, "samples": int},
    "imu": {
        "count": int,
        "orientation_covariance": list,
        "angular_velocity_covariance": list,
        "linear_acceleration_covariance": list,
    },
}


# per kind: the field naming a format (field, what it is called, the known values), then the
# numeric fields with their [lo, hi]: one table, so that every kind is checked by the same code
_ENUMS: dict[str, tuple[str, str, Mapping[str, Any]]] = {
    "image": ("encoding", "image encoding", IMAGE_ENCODINGS),
    "audio": ("format", "audio format", AUDIO_FORMATS),
}
_RANGES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "image": (("height", 1, MAX_IMAGE_SIDE), ("width", 1, MAX_IMAGE_SIDE), ("step", 0, MAX_IMAGE_SIDE * 4)),
    "audio": (("sample_rate", 1, MAX_SAMPLE_RATE), ("channels", 1, MAX_AUDIO_CHANNELS),
              ("samples", 1, MAX_SAMPLE_RATE * 60)),
    "imu": (("count", 1, MAX_IMU_BATCH),),
}


def _check_fields(header: dict[str, Any], spec: dict[str, type], *, required: bool = True) -> None:
    for key, typ in spec.items():
        if key not in header:
            if not required:
                continue
            raise WireError("field_missing", f"header lacks {key!r}")
        value = header[key]
        # bool is an int subclass: reject it where an int is expected.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise WireError("field_type", f"{key!r} must be {typ.__name__}, got {type(value).__name__}")


def _in_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise WireError("field_range", f"{name}={value} outside [{lo}, {hi}]")


def _validate_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise WireError("header_type", f"header must be a map, got {type(header).__name__}")
    _check_fields(header, _COMMON)
    _check_fields(header, _OPTIONAL, required=False)
    if header["v"] != SCHEMA_VERSION:
        raise WireError("version", f"schema version {header['v']} not supported; this build speaks {SCHEMA_VERSION}")
    kind = header["kind"]
    if kind not in _PER_KIND:
        raise WireError("kind", f"unknown kind {kind!r}; expected one of {sorted(_PER_KIND)}")
    _check_fields(header, _PER_KIND[kind])
    _in_range("seq", header["seq"], 0, UINT64_MAX)
    _in_range("stamp_ns", header["stamp_ns"], 0, UINT64_MAX)
    _in_range("session", header.get("session", 0), 0, UINT64_MAX)
    if len(header["frame_id"]) > MAX_FRAME_ID:
        raise WireError("field_range", f"frame_id longer than {MAX_FRAME_ID} characters")
    if kind in _ENUMS:
        key, what, known = _ENUMS[kind]
        if header[key] not in known:
            raise WireError("encoding", f"unknown {what} {header[key]!r}; expected one of {sorted(known)}")
    for key, lo, hi in _RANGES[kind]:
        _in_range(key, header[key], lo, hi)
    if kind == "imu":
        for key in ("orientation_covariance", "angular_velocity_covariance", "linear_acceleration_covariance"):
            cov = header[key]
            if len(cov) != 9 or not all(isinstance(x, float | int) and not isinstance(x, bool) for x in cov):
                raise WireError("field_type", f"{key!r} must be 9 numbers")


# --------------------------------------------------------------------------- sequence
@dataclass(slots=True)
class SequenceTracker:
    """Per-topic ``seq`` bookkeeping: counts gaps as drops and publisher restarts.

    A new ``session`` id means the publisher restarted: its ``seq`` starting again from 0
    is a restart, not 2**64 dropped frames. Within a session ``seq`` must increase.

    A publisher without a ``session`` (session 0: one written from the ROS-style header
    fields alone) is recognised as restarted when its ``seq`` goes back: ZeroMQ delivers one
    publisher's messages in order and never twice, so an earlier ``seq`` can only come from a
    new instance (which may have lost its first messages to the slow joiner, so "back" is
    any smaller value, not only 0). A repeated ``seq`` is still ``seq_order``.
    """

    last: dict[str, tuple[int, int]] = field(default_factory=dict)  # topic -> (session, seq)
    drops: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    def update(self, topic: str, session: int, seq: int) -> int:
        """Record a message; return frames dropped just before it. Raises on a repeat."""
        prev = self.last.get(topic)
        if prev is None or prev[0] != session or (session == 0 and seq < prev[1]):
            if prev is not None:
                self.restarts[topic] = self.restarts.get(topic, 0) + 1
            self.last[topic] = (session, seq)
            return 0
        if seq <= prev[1]:
            raise WireError("seq_order", f"seq {seq} on {topic!r} does not follow {prev[1]}")
        gap = seq - prev[1] - 1
        self.last[topic] = (session, seq)
        if gap:
            self.drops[topic] = self.drops.get(topic, 0) + gap
        return gap


# --------------------------------------------------------------------------- reason codes
# Every ``WireError.reason`` a receiver counts in ``invalid`` (decode, SequenceTracker and the
# receivers' own topic bound). docs/wire.md lists the same codes; a test keeps them equal.
INVALID_REASONS: dict[str, str] = {
    "frame_count": "fewer than 3 frames, or the wrong number of payload frames for the kind",
    "topic": "topic frame empty, longer than 256 bytes or not UTF-8",
    "frame_type": "a frame that is not a byte buffer (in-process senders only)",
    "header_size": "header frame longer than 16 KiB",
    "header_msgpack": "header frame is not valid msgpack",
    "header_type": "header is not a msgpack map",
    "field_missing": "a required header field is absent",
    "field_type": "a header field has the wrong type (bool where an int is expected included)",
    "version": "v is not a schema version this build speaks",
    "kind": "kind is not image, audio or imu",
    "field_range": "a header field outside its range, step != width*channels, or a NaN/inf IMU value",
    "encoding": "unknown image encoding or audio format",
    "payload_size": "payload length differs from the header's shape, or a jpeg without the SOI marker",
    "seq_order": "seq repeats or goes back within one publisher session",
    "too_many_topics": "more distinct topics than the receiver keeps state for (256)",
    "message_size": "a message (all frames) larger than the receiver's max_message_bytes",
}
