"""MCAP codec benchmark: mcap-ros2-support's ROS 2 CDR next to the hand-written codec it replaced.

    python -m benchmarks.mcap_codec [--seconds 0.3] [--record-s 3]

Why: sensors.ros2_messages encodes and decodes the recorded messages with mcap-ros2-support
(pure Python, no ROS install) on condition that it keeps up with a 30 Hz 640x480 camera plus
a 100 Hz IMU on one core with headroom. This measures, in one run, per schema (Image 640x480
rgb8, CompressedImage of that frame as JPEG, a 20 ms 16 kHz s16le AudioChunk, one Imu sample):

- encode + decode time per message, wire message <-> CDR bytes, of (a) the hand-written
  codec (kept below, verbatim in logic, as the baseline) and (b) sensors.ros2_messages;
  best of 5 repeats of ``--seconds`` each; both must produce the same bytes;
- the fraction of one core that 30 Hz image + 100 Hz IMU take (encode + decode), per codec;
- a full record -> read of ``--record-s`` seconds of camera 30 Hz + IMU 100 Hz (batches of 10)
  + audio 50 Hz through sensors' Recorder / McapReader (uncompressed, so only the codec
  differs), once with each codec swapped in.

Writes benchmarks/results/mcap_codec.json; the last stdout line is the same JSON.
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from mcap.records import Schema

from benchmarks.harness import report
from sensors import mcap_io
from sensors.jpeg import jpeg_size
from sensors.ros2_messages import SCHEMAS, CdrDecoder, ImuSample, to_cdr
from sensors.wire import AUDIO_FORMATS, IMAGE_ENCODINGS, Audio, Image, Imu, Message

RATES_HZ = {"image": 30, "imu": 100}  # the load the library must sustain
HEADROOM_FRACTION = 0.25  # "sustains" = that load takes at most a quarter of one core


# --------------------------------------------------------------------------- baseline codec
class _Writer:
    """The hand-written little-endian XCDR1 writer (alignment relative to the encapsulation end)."""

    def __init__(self) -> None:
        self.buf = bytearray(b"\x00\x01\x00\x00")

    def _align(self, n: int) -> None:
        self.buf += b"\x00" * (-(len(self.buf) - 4) % n)

    def u8(self, v: int) -> None:
        self.buf += struct.pack("<B", v)

    def u32(self, v: int) -> None:
        self._align(4)
        self.buf += struct.pack("<I", v)

    def f64s(self, values: Iterable[float]) -> None:
        vals = [float(x) for x in values]
        self._align(8)
        self.buf += struct.pack(f"<{len(vals)}d", *vals)

    def string(self, s: str) -> None:
        b = s.encode()
        if b"\x00" in b:
            raise ValueError("string contains NUL")
        self.u32(len(b) + 1)
        self.buf += b + b"\x00"

    def octets(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        self.u32(mv.nbytes)
        self.buf += mv

    def header(self, stamp_ns: int, frame_id: str) -> None:
        if not 0 <= stamp_ns < 2**31 * 1_000_000_000:
            raise ValueError("stamp does not fit builtin_interfaces/Time")
        self._align(4)
        self.buf += struct.pack("<iI", stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000)
        self.string(frame_id)


class _Reader:
    """The hand-written reader of what ``_Writer`` writes."""

    def __init__(self, data: bytes) -> None:
        self.mv, self.pos = memoryview(data).cast("B"), 4

    def _take(self, n: int, align: int = 1) -> memoryview:
        self.pos += -(self.pos - 4) % align
        if self.pos + n > self.mv.nbytes:
            raise ValueError("truncated CDR")
        out = self.mv[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4, 4))[0]

    def f64s(self, n: int) -> tuple[float, ...]:
        return struct.unpack(f"<{n}d", self._take(8 * n, 8))

    def string(self) -> str:
        n = self.u32()
        raw = bytes(self._take(n))
        if n == 0 or raw[-1] != 0:
            raise ValueError("CDR string is not NUL-terminated")
        return raw[:-1].decode()

    def octets(self) -> bytes:
        return bytes(self._take(self.u32()))

    def header(self) -> tuple[int, str]:
        sec, nsec = struct.unpack("<iI", self._take(8, 4))
        return sec * 1_000_000_000 + nsec, self.string()


def hand_to_cdr(msg: Message) -> list[tuple[str, bytes, int]]:
    """The replaced ``to_cdr``."""
    w = _Writer()
    if isinstance(msg, Image):
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
        w.header(msg.stamp_ns, msg.frame_id)
        w.u32(int(msg.sample_rate))
        w.u32(data.shape[1])
        w.string(msg.format)
        w.octets(np.ascontiguousarray(data.astype(AUDIO_FORMATS[msg.format], copy=False)))
        return [("continua_msgs/msg/AudioChunk", bytes(w.buf), msg.stamp_ns)]
    assert isinstance(msg, Imu)
    out = []
    values = np.asarray(msg.values, dtype=np.float64).reshape(-1, 10)
    for stamp, row in zip(np.asarray(msg.stamps_ns, dtype=np.int64).tolist(), values, strict=True):
        w = _Writer()
        w.header(int(stamp), msg.frame_id)
        w.f64s(row[0:4])
        w.f64s(msg.orientation_covariance)
        w.f64s(row[4:7])
        w.f64s(msg.angular_velocity_covariance)
        w.f64s(row[7:10])
        w.f64s(msg.linear_acceleration_covariance)
        out.append(("sensor_msgs/msg/Imu", bytes(w.buf), int(stamp)))
    return out


def _hand_image(r: _Reader) -> Image:
    stamp, frame_id = r.header()
    h, w, enc, _big, _step = r.u32(), r.u32(), r.string(), r.u8(), r.u32()
    arr = np.frombuffer(r.octets(), dtype=np.uint8).reshape(h, w, IMAGE_ENCODINGS[enc])
    return Image(data=arr, encoding=enc, stamp_ns=stamp, frame_id=frame_id)


def _hand_jpeg(r: _Reader) -> Image:
    stamp, frame_id = r.header()
    _fmt, payload = r.string(), r.octets()
    size = jpeg_size(payload) or (0, 0)
    data = np.frombuffer(payload, dtype=np.uint8)
    return Image(data=data, encoding="jpeg", height=size[0], width=size[1], stamp_ns=stamp, frame_id=frame_id)


def _hand_audio(r: _Reader) -> Audio:
    stamp, frame_id = r.header()
    rate, channels, fmt, payload = r.u32(), r.u32(), r.string(), r.octets()
    arr = np.frombuffer(payload, dtype=AUDIO_FORMATS[fmt]).reshape(-1, channels)
    return Audio(data=arr, sample_rate=rate, stamp_ns=stamp, frame_id=frame_id)


def _hand_imu(r: _Reader) -> ImuSample:
    stamp, frame_id = r.header()
    q, qc, av, avc, la, lac = r.f64s(4), r.f64s(9), r.f64s(3), r.f64s(9), r.f64s(3), r.f64s(9)
    return ImuSample(stamp, frame_id, np.array(q + av + la, dtype=np.float64), (qc, avc, lac))


_HAND_DECODERS: dict[str, Callable[[_Reader], Any]] = {
    "sensor_msgs/msg/Image": _hand_image,
    "sensor_msgs/msg/CompressedImage": _hand_jpeg,
    "continua_msgs/msg/AudioChunk": _hand_audio,
    "sensor_msgs/msg/Imu": _hand_imu,
}


class HandDecoder:
    """The replaced decoders behind ``CdrDecoder``'s interface, so McapReader can run on them."""

    def decode(self, schema: Schema | None, message_encoding: str, data: bytes) -> Any:
        if data[:2] != b"\x00\x01":
            raise ValueError("not little-endian CDR")
        return _HAND_DECODERS[schema.name if schema is not None else ""](_Reader(data))


# --------------------------------------------------------------------------- measurement
def sample_messages() -> dict[str, Message]:
    """One realistic message per schema: a smooth 640x480 frame (raw and as JPEG), 20 ms of mic, one IMU sample."""
    import cv2

    y, x = np.mgrid[0:480, 0:640]
    frame = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], axis=-1).astype(np.uint8)
    ok, jpg = cv2.imencode(".jpg", frame[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    stamp = 1_700_000_000_123_456_789
    rng = np.random.default_rng(0)
    return {
        "image_rgb8_640x480": Image(data=frame, stamp_ns=stamp, frame_id="camera"),
        "compressed_image_jpeg_640x480": Image(
            data=jpg.ravel(), encoding="jpeg", height=480, width=640, stamp_ns=stamp, frame_id="camera"
        ),
        "audio_chunk_20ms_16k_s16le": Audio(
            data=rng.integers(-3000, 3000, (320, 1)).astype(np.int16), stamp_ns=stamp, frame_id="mic"
        ),
        "imu_sample": Imu(stamps_ns=np.array([stamp]), values=rng.normal(0, 1, (1, 10)), stamp_ns=stamp, frame_id="imu"),
    }


def _best_us(fn: Callable[[], Any], seconds: float, repeats: int = 5) -> float:
    """Best mean time per call over ``repeats`` runs of about ``seconds`` each."""
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.05 or n < 3:
        fn()
        n += 1
    per_run = max(3, int(n / (time.perf_counter() - t0) * seconds))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_run):
            fn()
        best = min(best, (time.perf_counter() - t0) / per_run)
    return best * 1e6


def codec_rows(seconds: float) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name, msg in sample_messages().items():
        ((schema_name, data, _),) = to_cdr(msg)
        schema = Schema(id=1, name=schema_name, encoding="ros2msg", data=SCHEMAS[schema_name].encode())
        lib, hand = CdrDecoder(), HandDecoder()
        row: dict[str, Any] = {"cdr_bytes": len(data), "bytes_identical": hand_to_cdr(msg)[0][1] == data}
        for codec, encode, decoder in (("hand", hand_to_cdr, hand), ("library", to_cdr, lib)):
            enc_us = _best_us(lambda e=encode, m=msg: e(m), seconds)
            dec_us = _best_us(lambda d=decoder, s=schema, b=data: d.decode(s, "cdr", b), seconds)
            row[codec] = {
                "encode_us": round(enc_us, 2),
                "decode_us": round(dec_us, 2),
                "msgs_per_s": round(1e6 / (enc_us + dec_us)),
            }
        row["ratio_library_over_hand"] = round(row["library"]["msgs_per_s"] / row["hand"]["msgs_per_s"], 3)
        rows[name] = row
    return rows


def load(rows: dict[str, dict[str, Any]], codec: str) -> dict[str, Any]:
    """Fraction of one core that encoding + decoding 30 Hz images and 100 Hz IMU samples takes."""
    per_s = RATES_HZ["image"] / rows["image_rgb8_640x480"][codec]["msgs_per_s"]
    per_s += RATES_HZ["imu"] / rows["imu_sample"][codec]["msgs_per_s"]
    return {"core_fraction": round(per_s, 5), "headroom_x": round(1 / per_s, 1), "sustains": per_s <= HEADROOM_FRACTION}


@contextmanager
def _codec(codec: str) -> Any:
    """Recorder / McapReader with the hand-written codec swapped in, or as they are."""
    if codec == "library":
        yield
        return
    with mock.patch.object(mcap_io, "to_cdr", hand_to_cdr), mock.patch.object(mcap_io, "CdrDecoder", HandDecoder):
        yield


def record_rows(record_s: float) -> dict[str, dict[str, Any]]:
    msgs = sample_messages()
    frame, audio = msgs["image_rgb8_640x480"], msgs["audio_chunk_20ms_16k_s16le"]
    rng = np.random.default_rng(1)
    stream: list[tuple[str, Message]] = []
    t0 = 1_700_000_000_000_000_000
    for i in range(int(record_s * 100)):  # 10 ms ticks
        t = t0 + i * 10_000_000
        if i % 10 == 9:
            stamps = t - np.arange(9, -1, -1, dtype=np.int64) * 10_000_000
            stream.append(("imu", Imu(stamps_ns=stamps, values=rng.normal(0, 1, (10, 10)), stamp_ns=t, seq=i // 10)))
        if i % 2 == 0:
            stream.append(("mic", Audio(data=audio.data, stamp_ns=t, seq=i // 2)))
        if i * 3 % 10 < 3:  # 30 of every 100 ticks
            stream.append(("camera", Image(data=frame.data, stamp_ns=t, seq=i)))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for codec in ("hand", "library"):
            path = Path(d) / f"{codec}.mcap"
            with _codec(codec):
                t_w = time.perf_counter()
                with mcap_io.Recorder(path, compression="none") as rec:
                    for topic, m in stream:
                        rec.write(topic, m)
                write_s = time.perf_counter() - t_w
                t_r = time.perf_counter()
                n_read = sum(1 for _ in mcap_io.McapReader(path))
                read_s = time.perf_counter() - t_r
            assert n_read == len(stream), (codec, n_read, len(stream))
            out[codec] = {
                "records": rec.records,
                "file_mb": round(path.stat().st_size / 1e6, 1),
                "write_s": round(write_s, 3),
                "read_s": round(read_s, 3),
                "realtime_x": round(record_s / (write_s + read_s), 1),
            }
    out["recorded_s"] = record_s
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mcap_codec", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=0.3, help="time per repeat of each encode / decode measurement")
    p.add_argument("--record-s", type=float, default=3.0, help="seconds of sensor stream recorded and read back")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    rows = codec_rows(a.seconds)
    import mcap_ros2

    res: dict[str, Any] = {
        "mcap_ros2_support": mcap_ros2.__version__,
        "python": sys.version.split()[0],
        "schemas": rows,
        "load_30hz_image_100hz_imu": {codec: load(rows, codec) for codec in ("hand", "library")},
        "record_read": record_rows(a.record_s),
    }
    res["wall_s"] = round(time.monotonic() - t0, 1)
    for name, r in rows.items():
        print(
            f"{name:30s} hand {r['hand']['msgs_per_s']:8d}/s  library {r['library']['msgs_per_s']:8d}/s"
            f"  ratio {r['ratio_library_over_hand']:.2f}  same bytes {r['bytes_identical']}",
            file=sys.stderr,
        )
    report("mcap_codec", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
