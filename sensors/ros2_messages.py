"""ROS 2 message definitions of what we record, and wire messages to / from their CDR bytes.

Why ROS 2 CDR rather than our msgpack framing: an MCAP file with ``ros2msg`` schemas and
``cdr`` messages opens as-is in Foxglove (Image / CompressedImage panels, IMU plots) and in
``ros2 bag``. The CDR itself is mcap-ros2-support's (the mcap project's pure-Python ROS 2
codec, no ROS install): ``benchmarks/mcap_codec.py`` measured it against the hand-written
codec it replaced and it keeps up with a 30 Hz 640x480 camera plus a 100 Hz IMU with a wide
margin (``uint8[]`` fields are sliced as bytes, never walked element by element). This module
only maps our wire messages to the ROS field layout and checks what the library does not.

Mapping (schema name <- wire message):
- ``sensor_msgs/msg/Image`` <- Image rgb8 / bgr8 / mono8
- ``sensor_msgs/msg/CompressedImage`` (format "jpeg") <- Image jpeg; on reading, height and
  width are taken from the JPEG's SOF marker (CompressedImage has no such fields).
- ``continua_msgs/msg/AudioChunk`` <- Audio (header, sample_rate, channels, format
  "s16le"/"f32le", interleaved PCM bytes); see ``AUDIO_CHUNK_MSG``.
- ``sensor_msgs/msg/Imu`` <- Imu, one CDR message per sample (as ROS does).

Checks kept on top of the library: stamps must fit ``builtin_interfaces/Time`` (int32
seconds: before 2038-01-19) and strings may not hold NUL (both refused on encoding); only
little-endian CDR is read (what every ROS 2 DDS writes), and a record shorter than its own
length prefixes is refused as truncated (the library would silently return a short slice).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from mcap.records import Schema

# serialize_dynamic is what mcap_ros2.writer.Writer encodes with; that Writer itself is not
# used because it keys channels by topic alone (a topic switching rgb8 -> jpeg would be written
# under the first schema) and writes no channel metadata. Decoding uses the public DecoderFactory.
from mcap_ros2._dynamic import serialize_dynamic
from mcap_ros2.decoder import DecoderFactory

from sensors.errors import WireError
from sensors.jpeg import jpeg_size
from sensors.wire import AUDIO_FORMATS, IMAGE_ENCODINGS, Audio, Image, Imu, Message

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
AUDIO_CHUNK = "continua_msgs/msg/AudioChunk"
IMU = "sensor_msgs/msg/Imu"

_SEP = "=" * 80
_TIME_MSG = "int32 sec\nuint32 nanosec\n"
_HEADER_MSG = "builtin_interfaces/Time stamp\nstring frame_id\n"
_HEADER_DEPS = f"{_SEP}\nMSG: std_msgs/Header\n{_HEADER_MSG}{_SEP}\nMSG: builtin_interfaces/Time\n{_TIME_MSG}"
IMAGE_MSG = "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\nuint32 step\nuint8[] data\n"
COMPRESSED_IMAGE_MSG = "std_msgs/Header header\nstring format\nuint8[] data\n"
AUDIO_CHUNK_MSG = (
    "# continua audio chunk: interleaved little-endian PCM, samples = len(data) / (channels * bytes per sample)\n"
    "std_msgs/Header header\nuint32 sample_rate\nuint32 channels\nstring format # s16le or f32le\nuint8[] data\n"
)
IMU_MSG = (
    "std_msgs/Header header\ngeometry_msgs/Quaternion orientation\nfloat64[9] orientation_covariance\n"
    "geometry_msgs/Vector3 angular_velocity\nfloat64[9] angular_velocity_covariance\n"
    "geometry_msgs/Vector3 linear_acceleration\nfloat64[9] linear_acceleration_covariance\n"
)
_IMU_DEPS = (
    f"{_SEP}\nMSG: geometry_msgs/Quaternion\nfloat64 x\nfloat64 y\nfloat64 z\nfloat64 w\n"
    f"{_SEP}\nMSG: geometry_msgs/Vector3\nfloat64 x\nfloat64 y\nfloat64 z\n"
)
SCHEMAS: dict[str, str] = {
    IMAGE: IMAGE_MSG + _HEADER_DEPS,
    COMPRESSED_IMAGE: COMPRESSED_IMAGE_MSG + _HEADER_DEPS,
    AUDIO_CHUNK: AUDIO_CHUNK_MSG + _HEADER_DEPS,
    IMU: IMU_MSG + _HEADER_DEPS + _IMU_DEPS,
}
_MAX_STAMP_NS = (2**31) * 1_000_000_000
_CDR_LE = b"\x00\x01"


@functools.cache
def _encoder(schema: str) -> Callable[[Any], bytes]:
    """The library's encoder for one of our schemas, built once (parsing the text takes ~1 ms)."""
    return serialize_dynamic(schema, SCHEMAS[schema])[schema]


def _header(stamp_ns: int, frame_id: str) -> dict[str, Any]:
    if not 0 <= stamp_ns < _MAX_STAMP_NS:
        raise WireError("field_range", f"stamp_ns={stamp_ns} does not fit builtin_interfaces/Time (int32 seconds)")
    if "\x00" in frame_id:
        raise WireError("field_range", f"string {frame_id[:40]!r} contains NUL, which CDR strings cannot hold")
    return {"stamp": {"sec": stamp_ns // 1_000_000_000, "nanosec": stamp_ns % 1_000_000_000}, "frame_id": frame_id}


def _xyz(v: np.ndarray, keys: str) -> dict[str, float]:
    return dict(zip(keys, v.tolist(), strict=True))


def to_cdr(msg: Message) -> list[tuple[str, bytes, int]]:
    """A wire message as [(schema name, CDR bytes, log_time_ns)] (several for an IMU batch)."""
    if isinstance(msg, Image):
        header = _header(int(msg.stamp_ns), msg.frame_id)
        if msg.encoding == "jpeg":
            fields = {"header": header, "format": "jpeg", "data": np.ascontiguousarray(msg.data).tobytes()}
            return [(COMPRESSED_IMAGE, _encoder(COMPRESSED_IMAGE)(fields), msg.stamp_ns)]
        ch = IMAGE_ENCODINGS[msg.encoding]
        data = np.ascontiguousarray(msg.data).reshape(msg.data.shape[0], msg.data.shape[1], ch)
        fields = {
            "header": header,
            "height": data.shape[0],
            "width": data.shape[1],
            "encoding": msg.encoding,
            "is_bigendian": 0,
            "step": data.shape[1] * ch,
            "data": data.tobytes(),
        }
        return [(IMAGE, _encoder(IMAGE)(fields), msg.stamp_ns)]
    if isinstance(msg, Audio):
        data = msg.data if msg.data.ndim == 2 else msg.data.reshape(-1, 1)
        fields = {
            "header": _header(int(msg.stamp_ns), msg.frame_id),
            "sample_rate": int(msg.sample_rate),
            "channels": data.shape[1],
            "format": msg.format,
            "data": np.ascontiguousarray(data.astype(AUDIO_FORMATS[msg.format], copy=False)).tobytes(),
        }
        return [(AUDIO_CHUNK, _encoder(AUDIO_CHUNK)(fields), msg.stamp_ns)]
    if isinstance(msg, Imu):
        encode = _encoder(IMU)
        covs = [tuple(float(x) for x in c) for c in (
            msg.orientation_covariance, msg.angular_velocity_covariance, msg.linear_acceleration_covariance)]
        values = np.asarray(msg.values, dtype=np.float64).reshape(-1, 10)
        out = []
        for stamp, row in zip(np.asarray(msg.stamps_ns, dtype=np.int64).tolist(), values, strict=True):
            fields = {
                "header": _header(stamp, msg.frame_id),
                "orientation": _xyz(row[0:4], "xyzw"),
                "orientation_covariance": covs[0],
                "angular_velocity": _xyz(row[4:7], "xyz"),
                "angular_velocity_covariance": covs[1],
                "linear_acceleration": _xyz(row[7:10], "xyz"),
                "linear_acceleration_covariance": covs[2],
            }
            out.append((IMU, encode(fields), stamp))
        return out
    raise TypeError(f"not a wire message: {type(msg).__name__}")


# --------------------------------------------------------------------------- decode
@dataclass
class ImuSample:
    """One ``sensor_msgs/msg/Imu`` record; the reader regroups consecutive samples into an ``Imu`` batch."""

    stamp_ns: int
    frame_id: str
    values: np.ndarray  # (10,) float64: orientation xyzw, angular velocity xyz, linear acceleration xyz
    covariances: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]


class _Bounded(bytes):
    """CDR bytes whose slices must lie inside them: the library reads ``uint8[]`` and strings
    as slices, which Python cuts short at the end without a word, so a truncated record would
    decode to a short payload instead of failing."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice) and key.stop is not None and key.stop > len(self):
            raise WireError("cdr", f"truncated CDR: need {key.stop} bytes, have {len(self)}")
        return super().__getitem__(key)


def _stamp(header: Any) -> tuple[int, str]:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec, header.frame_id


def _image(m: Any) -> Image:
    stamp, frame_id = _stamp(m.header)
    h, w, enc, step, payload = m.height, m.width, m.encoding, m.step, m.data
    ch = IMAGE_ENCODINGS.get(enc)
    if not ch:
        raise WireError("encoding", f"image encoding {enc!r} is not one of rgb8/bgr8/mono8")
    if step != w * ch or len(payload) != h * step:
        raise WireError("payload_size", f"{enc} {h}x{w} step {step} does not match {len(payload)} bytes")
    arr = np.frombuffer(payload, dtype=np.uint8).reshape(h, w, ch)
    return Image(data=arr, encoding=enc, stamp_ns=stamp, frame_id=frame_id)


def _jpeg(m: Any) -> Image:
    stamp, frame_id = _stamp(m.header)
    if "jpeg" not in m.format.lower() and "jpg" not in m.format.lower():
        raise WireError("encoding", f"compressed format {m.format!r} is not jpeg")
    size = jpeg_size(m.data)
    if size is None:
        raise WireError("payload_size", "jpeg has no SOF marker: height/width unknown")
    data = np.frombuffer(m.data, dtype=np.uint8)
    return Image(data=data, encoding="jpeg", height=size[0], width=size[1], stamp_ns=stamp, frame_id=frame_id)


def _audio(m: Any) -> Audio:
    stamp, frame_id = _stamp(m.header)
    dtype = AUDIO_FORMATS.get(m.format)
    channels, payload = m.channels, m.data
    if dtype is None or channels < 1 or len(payload) % (channels * dtype.itemsize):
        raise WireError("payload_size", f"audio {m.format!r} x {channels} does not fit {len(payload)} bytes")
    arr = np.frombuffer(payload, dtype=dtype).reshape(-1, channels)
    return Audio(data=arr, sample_rate=m.sample_rate, stamp_ns=stamp, frame_id=frame_id)


def _imu(m: Any) -> ImuSample:
    stamp, frame_id = _stamp(m.header)
    q, av, la = m.orientation, m.angular_velocity, m.linear_acceleration
    values = np.array([q.x, q.y, q.z, q.w, av.x, av.y, av.z, la.x, la.y, la.z], dtype=np.float64)
    covs = (tuple(m.orientation_covariance), tuple(m.angular_velocity_covariance),
            tuple(m.linear_acceleration_covariance))
    return ImuSample(stamp, frame_id, values, covs)


_CONVERTERS: dict[str, Callable[[Any], Image | Audio | ImuSample]] = {
    IMAGE: _image,
    COMPRESSED_IMAGE: _jpeg,
    AUDIO_CHUNK: _audio,
    IMU: _imu,
}


class CdrDecoder:
    """Decodes the CDR records of one MCAP file to wire messages (``ImuSample`` for IMU).

    One per file: the library's decoders are built from each file's own schema text (so
    files written by rosbag2, with comments and constants in their definitions, read too)
    and cached by the file's schema ids. Every failure is a ``WireError`` whose reason the
    reader counts: ``schema`` (not one we map, or a definition that does not parse), ``cdr``
    (corrupt or truncated bytes), ``encoding`` / ``payload_size`` (a message we cannot use).
    """

    def __init__(self) -> None:
        self._factory = DecoderFactory()
        self._decoders: dict[tuple[int, str], Callable[[bytes], Any] | None] = {}

    def decode(self, schema: Schema | None, message_encoding: str, data: bytes) -> Image | Audio | ImuSample:
        name = schema.name if schema is not None else ""
        convert = _CONVERTERS.get(name)
        decoder = self._decoder(schema, message_encoding) if convert is not None else None
        if convert is None or decoder is None:
            raise WireError("schema", f"schema {name!r} ({message_encoding}) is not supported")
        if data[:2] != _CDR_LE or len(data) < 4:
            raise WireError("cdr", f"not little-endian CDR (encapsulation {bytes(data[:4]).hex()})")
        try:
            return convert(decoder(_Bounded(data)))
        except WireError:
            raise
        except (struct.error, ValueError, IndexError, AttributeError, NotImplementedError) as exc:
            raise WireError("cdr", f"{name} does not decode: {type(exc).__name__}: {exc}") from None

    def _decoder(self, schema: Schema | None, message_encoding: str) -> Callable[[bytes], Any] | None:
        if schema is None:
            return None
        key = (schema.id, message_encoding)
        if key not in self._decoders:
            try:
                self._decoders[key] = self._factory.decoder_for(message_encoding, schema)
            except Exception:  # the vendored rosidl parser raises its own error types for bad definitions
                self._decoders[key] = None
        return self._decoders[key]
