"""Record wire messages to MCAP (ROS 2 profile, CDR) and read / replay them back.

Why ROS 2 CDR rather than our msgpack framing: an MCAP file with ``ros2msg`` schemas and
``cdr`` messages opens as-is in Foxglove (Image / CompressedImage panels, IMU plots) and in
``ros2 bag``; the (de)serialisers are hand-written (little-endian XCDR1, ~60 lines) so no
ROS install is needed.

Mapping (schema name <- wire message):
- ``sensor_msgs/msg/Image`` <- Image rgb8 / bgr8 / mono8
- ``sensor_msgs/msg/CompressedImage`` (format "jpeg") <- Image jpeg; on reading, height and
  width are taken from the JPEG's SOF marker (CompressedImage has no such fields).
- ``continua_msgs/msg/AudioChunk`` <- Audio (header, sample_rate, channels, format
  "s16le"/"f32le", interleaved PCM bytes); see ``AUDIO_CHUNK_MSG``.
- ``sensor_msgs/msg/Imu`` <- Imu, one MCAP message per sample (as ROS does).

MCAP record fields: ``log_time`` = acquisition stamp (per sample for IMU), ``publish_time``
= the wire message's ``stamp_ns`` (the batch stamp for IMU), ``sequence`` = wire ``seq``
mod 2**32. Reading regroups consecutive IMU samples with the same (channel, sequence,
publish_time) into one batch, so record -> read reproduces stamps, seq (< 2**32), frame_id
and payload bytes exactly; the publisher ``session`` is not stored (read back as 0).
CDR layout: 4-byte encapsulation header ``00 01 00 00`` (CDR little-endian), primitives
aligned to their size relative to the end of that header, strings as uint32 length
(including the NUL) + bytes + NUL, ``T[]`` as uint32 count + elements, ``T[9]`` unprefixed.
Stamps must fit ``builtin_interfaces/Time`` (int32 seconds: before 2038-01-19).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
from mcap.reader import make_reader
from mcap.writer import CompressionType, Writer

from sensors.errors import WireError
from sensors.wire import AUDIO_FORMATS, IMAGE_ENCODINGS, MAX_IMU_BATCH, Audio, Image, Imu, Message

log = logging.getLogger(__name__)

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
    "sensor_msgs/msg/Image": IMAGE_MSG + _HEADER_DEPS,
    "sensor_msgs/msg/CompressedImage": COMPRESSED_IMAGE_MSG + _HEADER_DEPS,
    "continua_msgs/msg/AudioChunk": AUDIO_CHUNK_MSG + _HEADER_DEPS,
    "sensor_msgs/msg/Imu": IMU_MSG + _HEADER_DEPS + _IMU_DEPS,
}
_CDR_LE = b"\x00\x01\x00\x00"
_MAX_STAMP_NS = (2**31) * 1_000_000_000


# --------------------------------------------------------------------------- CDR
class CdrWriter:
    """Little-endian XCDR1 writer; alignment is relative to the end of the encapsulation header."""

    def __init__(self) -> None:
        self.buf = bytearray(_CDR_LE)

    def _align(self, n: int) -> None:
        self.buf += b"\x00" * (-(len(self.buf) - 4) % n)

    def u8(self, v: int) -> None:
        self.buf += struct.pack("<B", v)

    def u32(self, v: int) -> None:
        self._align(4)
        self.buf += struct.pack("<I", v)

    def i32(self, v: int) -> None:
        self._align(4)
        self.buf += struct.pack("<i", v)

    def f64s(self, values: Iterable[float]) -> None:
        vals = [float(x) for x in values]
        self._align(8)
        self.buf += struct.pack(f"<{len(vals)}d", *vals)

    def string(self, s: str) -> None:
        b = s.encode()
        if b"\x00" in b:
            raise WireError("field_range", f"string {s[:40]!r} contains NUL, which CDR strings cannot hold")
        self.u32(len(b) + 1)
        self.buf += b + b"\x00"

    def octets(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        self.u32(mv.nbytes)
        self.buf += mv

    def header(self, stamp_ns: int, frame_id: str) -> None:
        if not 0 <= stamp_ns < _MAX_STAMP_NS:
            raise WireError(
                "field_range", f"stamp_ns={stamp_ns} does not fit builtin_interfaces/Time (int32 seconds)"
            )
        self.i32(stamp_ns // 1_000_000_000)
        self.u32(stamp_ns % 1_000_000_000)
        self.string(frame_id)


class CdrReader:
    """Reads what ``CdrWriter`` writes (and what ROS 2 writes: CDR_LE, any trailing padding)."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.mv = memoryview(data).cast("B")
        if self.mv.nbytes < 4 or bytes(self.mv[:2]) != b"\x00\x01":
            raise WireError("cdr", f"not little-endian CDR (encapsulation {bytes(self.mv[:4]).hex()})")
        self.pos = 4

    def _take(self, n: int, align: int = 1) -> memoryview:
        self.pos += -(self.pos - 4) % align
        if self.pos + n > self.mv.nbytes:
            raise WireError(
                "cdr", f"truncated CDR: need {n} bytes at offset {self.pos}, have {self.mv.nbytes}"
            )
        out = self.mv[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4, 4))[0]

    def i32(self) -> int:
        return struct.unpack("<i", self._take(4, 4))[0]

    def f64s(self, n: int) -> tuple[float, ...]:
        return struct.unpack(f"<{n}d", self._take(8 * n, 8))

    def string(self) -> str:
        n = self.u32()
        raw = bytes(self._take(n))
        if n == 0 or raw[-1] != 0:
            raise WireError("cdr", "CDR string is not NUL-terminated")
        return raw[:-1].decode()

    def octets(self) -> bytes:
        return bytes(self._take(self.u32()))

    def header(self) -> tuple[int, str]:
        sec, nsec = self.i32(), self.u32()
        return sec * 1_000_000_000 + nsec, self.string()


# --------------------------------------------------------------------------- jpeg
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


# --------------------------------------------------------------------------- encode / decode
def to_cdr(msg: Message) -> list[tuple[str, bytes, int]]:
    """A wire message as [(schema name, CDR bytes, log_time_ns)] (several for an IMU batch)."""
    if isinstance(msg, Image):
        w = CdrWriter()
        w.header(msg.stamp_ns, msg.frame_id)
        if msg.encoding == "jpeg":
            w.string("jpeg")
            w.octets(np.ascontiguousarray(msg.data))
            return [("sensor_msgs/msg/CompressedImage", bytes(w.buf), msg.stamp_ns)]
        ch = IMAGE_ENCODINGS[msg.encoding]
        data = np.ascontiguousarray(msg.data).reshape(msg.data.shape[0], msg.data.shape[1], ch)
        w.u32(data.shape[0])
        w.u32(data.shape[1])
        w.string(msg.encoding)
        w.u8(0)
        w.u32(data.shape[1] * ch)
        w.octets(data)
        return [("sensor_msgs/msg/Image", bytes(w.buf), msg.stamp_ns)]
    if isinstance(msg, Audio):
        data = msg.data if msg.data.ndim == 2 else msg.data.reshape(-1, 1)
        w = CdrWriter()
        w.header(msg.stamp_ns, msg.frame_id)
        w.u32(int(msg.sample_rate))
        w.u32(data.shape[1])
        w.string(msg.format)
        w.octets(np.ascontiguousarray(data.astype(AUDIO_FORMATS[msg.format], copy=False)))
        return [("continua_msgs/msg/AudioChunk", bytes(w.buf), msg.stamp_ns)]
    if isinstance(msg, Imu):
        out = []
        values = np.asarray(msg.values, dtype=np.float64).reshape(-1, 10)
        for stamp, row in zip(np.asarray(msg.stamps_ns, dtype=np.int64).tolist(), values, strict=True):
            w = CdrWriter()
            w.header(int(stamp), msg.frame_id)
            w.f64s(row[0:4])
            w.f64s(msg.orientation_covariance)
            w.f64s(row[4:7])
            w.f64s(msg.angular_velocity_covariance)
            w.f64s(row[7:10])
            w.f64s(msg.linear_acceleration_covariance)
            out.append(("sensor_msgs/msg/Imu", bytes(w.buf), int(stamp)))
        return out
    raise TypeError(f"not a wire message: {type(msg).__name__}")


def _image_from_cdr(data: bytes) -> Image:
    r = CdrReader(data)
    stamp, frame_id = r.header()
    h, w, enc, _big, step = r.u32(), r.u32(), r.string(), r.u8(), r.u32()
    payload = r.octets()
    ch = IMAGE_ENCODINGS.get(enc)
    if not ch:
        raise WireError("encoding", f"image encoding {enc!r} is not one of rgb8/bgr8/mono8")
    if step != w * ch or len(payload) != h * step:
        raise WireError("payload_size", f"{enc} {h}x{w} step {step} does not match {len(payload)} bytes")
    arr = np.frombuffer(payload, dtype=np.uint8).reshape(h, w, ch)
    return Image(data=arr, encoding=enc, stamp_ns=stamp, frame_id=frame_id)


def _jpeg_from_cdr(data: bytes) -> Image:
    r = CdrReader(data)
    stamp, frame_id = r.header()
    fmt, payload = r.string(), r.octets()
    if "jpeg" not in fmt.lower() and "jpg" not in fmt.lower():
        raise WireError("encoding", f"compressed format {fmt!r} is not jpeg")
    size = jpeg_size(payload)
    if size is None:
        raise WireError("payload_size", "jpeg has no SOF marker: height/width unknown")
    return Image(
        data=np.frombuffer(payload, dtype=np.uint8),
        encoding="jpeg",
        height=size[0],
        width=size[1],
        stamp_ns=stamp,
        frame_id=frame_id,
    )


def _audio_from_cdr(data: bytes) -> Audio:
    r = CdrReader(data)
    stamp, frame_id = r.header()
    rate, channels, fmt, payload = r.u32(), r.u32(), r.string(), r.octets()
    dtype = AUDIO_FORMATS.get(fmt)
    if dtype is None or channels < 1 or len(payload) % (channels * dtype.itemsize):
        raise WireError("payload_size", f"audio {fmt!r} x {channels} does not fit {len(payload)} bytes")
    arr = np.frombuffer(payload, dtype=dtype).reshape(-1, channels)
    return Audio(data=arr, sample_rate=rate, stamp_ns=stamp, frame_id=frame_id)


def _imu_sample_from_cdr(data: bytes) -> tuple[int, str, np.ndarray, tuple[tuple[float, ...], ...]]:
    r = CdrReader(data)
    stamp, frame_id = r.header()
    q, qc, av, avc, la, lac = r.f64s(4), r.f64s(9), r.f64s(3), r.f64s(9), r.f64s(3), r.f64s(9)
    return stamp, frame_id, np.array(q + av + la, dtype=np.float64), (qc, avc, lac)


_DECODERS = {
    "sensor_msgs/msg/Image": _image_from_cdr,
    "sensor_msgs/msg/CompressedImage": _jpeg_from_cdr,
    "continua_msgs/msg/AudioChunk": _audio_from_cdr,
}


# --------------------------------------------------------------------------- writer
class Recorder:
    """Writes wire messages of any topics to one MCAP file (context manager).

    One channel per (topic, schema); a topic that switches schema (rgb8 -> jpeg) gets a
    second channel with the same name. Thread-safe ``write``.
    """

    def __init__(
        self, path: str | Path, *, compression: str = "zstd", chunk_size: int = 4 * 1024 * 1024
    ) -> None:
        kinds = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
        if compression not in kinds:
            raise ValueError(f"compression must be one of {sorted(kinds)}, got {compression!r}")
        self.path = Path(path)
        self._file: IO[bytes] | None = self.path.open("wb")
        self._writer = Writer(self._file, compression=kinds[compression], chunk_size=chunk_size)
        self._writer.start(profile="ros2", library="continua")
        self._schemas: dict[str, int] = {}
        self._channels: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # wire messages per topic
        self.records = 0  # MCAP messages (IMU samples count one each)

    def write(self, topic: str, msg: Message) -> int:
        """Append one wire message; returns the number of MCAP records written."""
        records = to_cdr(msg)
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"recorder for {self.path} is closed")
            for schema, data, log_time in records:
                channel = self._channel(topic, schema)
                self._writer.add_message(
                    channel_id=channel,
                    log_time=max(0, log_time),
                    data=data,
                    publish_time=int(msg.stamp_ns),
                    sequence=int(msg.seq) & 0xFFFFFFFF,
                )
            self.counts[topic] += 1
            self.records += len(records)
        return len(records)

    def _channel(self, topic: str, schema: str) -> int:
        key = (topic, schema)
        if key not in self._channels:
            if schema not in self._schemas:
                self._schemas[schema] = self._writer.register_schema(
                    name=schema, encoding="ros2msg", data=SCHEMAS[schema].encode()
                )
            self._channels[key] = self._writer.register_channel(
                topic=topic,
                message_encoding="cdr",
                schema_id=self._schemas[schema],
                metadata={"offered_qos_profiles": ""},
            )
        return self._channels[key]

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            try:
                self._writer.finish()
            finally:
                self._file.close()
                self._file = None
        log.info("wrote %s: %d records, %s", self.path, self.records, dict(self.counts))

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- reader
class McapReader:
    """Iterates an MCAP file back as wire messages, in file (= recording) order.

    Records it cannot map (other schemas, encodings such as png or 16UC1, corrupt CDR) are
    skipped and counted in ``skipped[reason]``. Bounded: an IMU batch being regrouped holds at
    most ``MAX_IMU_BATCH`` samples (a file whose records all share one key is split, not
    gathered into memory whole), and records come one chunk at a time from the mcap reader.
    """

    def __init__(self, path: str | Path, topics: Iterable[str] | None = None) -> None:
        self.path = Path(path)
        self.topics = None if topics is None else list(topics)
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[tuple[str, Message]]:
        pending: list[Any] = []  # IMU samples of the batch being regrouped
        pending_key: tuple[int, int, int] | None = None
        with self.path.open("rb") as f:
            for schema, channel, record in make_reader(f).iter_messages(
                topics=self.topics, log_time_order=False
            ):
                name = schema.name if schema is not None else ""
                if name == "sensor_msgs/msg/Imu" and channel.message_encoding == "cdr":
                    key = (channel.id, record.sequence, record.publish_time)
                    if pending and (key != pending_key or len(pending) >= MAX_IMU_BATCH):
                        yield _imu_batch(pending)
                        pending = []
                    try:
                        pending.append((channel.topic, record, *_imu_sample_from_cdr(record.data)))
                        pending_key = key
                    except (WireError, struct.error, UnicodeDecodeError) as exc:
                        self._skip(getattr(exc, "reason", "cdr"), channel.topic, exc)
                    continue
                if pending:
                    yield _imu_batch(pending)
                    pending = []
                decoder = _DECODERS.get(name)
                if decoder is None or channel.message_encoding != "cdr":
                    self._skip(
                        "schema",
                        channel.topic,
                        f"schema {name!r} ({channel.message_encoding}) is not supported",
                    )
                    continue
                try:
                    msg = decoder(record.data)
                except (WireError, struct.error, UnicodeDecodeError) as exc:
                    self._skip(getattr(exc, "reason", "cdr"), channel.topic, exc)
                    continue
                msg.seq = record.sequence
                yield channel.topic, msg
        if pending:
            yield _imu_batch(pending)

    def _skip(self, reason: str, topic: str, detail: Any) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:
            log.warning("skipped a record on %r (%s): %s", topic, reason, detail)


def _imu_batch(samples: list[Any]) -> tuple[str, Imu]:
    topic, record, _, frame_id, _, covs = samples[0]
    msg = Imu(
        stamps_ns=np.array([s[2] for s in samples], dtype=np.int64),
        values=np.stack([s[4] for s in samples]),
        orientation_covariance=covs[0],
        angular_velocity_covariance=covs[1],
        linear_acceleration_covariance=covs[2],
        stamp_ns=record.publish_time,
        seq=record.sequence,
        frame_id=frame_id,
    )
    return topic, msg


def read_messages(path: str | Path, topics: Iterable[str] | None = None) -> list[tuple[str, Message]]:
    """All messages of a (small) file as a list; use ``McapReader`` to stream big ones."""
    return list(McapReader(path, topics))


# --------------------------------------------------------------------------- player
class Player:
    """Yields (topic, msg) at the pace they were recorded: message i is released at
    ``start + (stamp_i - stamp_0) / rate`` (wall clock), or immediately with ``fast``.

    With ``restamp`` (default) each message's ``stamp_ns`` becomes the release time
    (``time.time_ns()``) and IMU sample stamps move by the same offset, so consumers that
    check latency or sync against live sensors see a live stream. ``stop`` (an Event) ends
    playback early, including during a wait.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        topics: Iterable[str] | None = None,
        rate: float = 1.0,
        fast: bool = False,
        loop: bool = False,
        restamp: bool = True,
        stop: threading.Event | None = None,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.path, self.topics, self.rate, self.fast, self.loop, self.restamp = (
            Path(path),
            topics,
            rate,
            fast,
            loop,
            restamp,
        )
        self.stop = stop if stop is not None else threading.Event()
        self.played = 0
        self.loops = 0
        self.skipped: Counter[str] = Counter()  # unreadable records, summed over loops

    def __iter__(self) -> Iterator[tuple[str, Message]]:
        while not self.stop.is_set():
            reader = McapReader(self.path, None if self.topics is None else list(self.topics))
            start_wall = time.monotonic()
            first: int | None = None
            n = 0
            try:
                for topic, msg in reader:
                    if first is None:
                        first = msg.stamp_ns
                    if not self.fast:
                        delay = start_wall + (msg.stamp_ns - first) / 1e9 / self.rate - time.monotonic()
                        if delay > 0 and self.stop.wait(delay):
                            return
                    if self.stop.is_set():
                        return
                    if self.restamp:
                        _restamp(msg, time.time_ns())
                    n += 1
                    self.played += 1
                    yield topic, msg
            finally:
                self.skipped.update(reader.skipped)
            self.loops += 1
            if not self.loop or n == 0:
                return


def _restamp(msg: Message, now_ns: int) -> None:
    if isinstance(msg, Imu):
        msg.stamps_ns = np.asarray(msg.stamps_ns, dtype=np.int64) + (now_ns - msg.stamp_ns)
    msg.stamp_ns = now_ns
