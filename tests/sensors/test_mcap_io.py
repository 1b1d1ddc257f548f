"""MCAP recording: CDR layout against hand-derived bytes, exact record -> read round trips
(hypothesis), the Player's timing, and record/play CLIs over real sockets."""

from __future__ import annotations

import json
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcap.reader import make_reader
from mcap.records import Schema
from mcap.writer import Writer
from mcap_ros2.decoder import DecoderFactory
from mcap_ros2.writer import Writer as Ros2Writer

from sensors.errors import WireError
from sensors.jpeg import jpeg_size
from sensors.mcap_io import McapReader, Player, Recorder, read_messages
from sensors.ros2_messages import SCHEMAS, CdrDecoder, to_cdr
from sensors.transport import LosslessReader, Publisher
from sensors.wire import Audio, Image, Imu, Message
from tests.fakes import synthetic_frame
from tests.sensors.streams import imu_batches, recv_n

MAX_STAMP = 2**31 * 1_000_000_000 - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _payload(msg: Message) -> bytes:
    if isinstance(msg, Imu):
        return (
            np.asarray(msg.stamps_ns, dtype="<i8").tobytes() + np.asarray(msg.values, dtype="<f8").tobytes()
        )
    return np.ascontiguousarray(msg.data).tobytes()


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    assert (a.stamp_ns, a.seq, a.frame_id) == (b.stamp_ns, b.seq, b.frame_id)
    assert _payload(a) == _payload(b)
    if isinstance(a, Image):
        assert (a.encoding, a.height, a.width) == (b.encoding, b.height, b.width)
    elif isinstance(a, Audio):
        assert (a.sample_rate, a.format, a.data.shape) == (b.sample_rate, b.format, b.data.shape)
    else:
        assert a.orientation_covariance == b.orientation_covariance
        assert a.angular_velocity_covariance == b.angular_velocity_covariance
        assert a.linear_acceleration_covariance == b.linear_acceleration_covariance


# --------------------------------------------------------------------------- CDR layout
def test_image_cdr_bytes_match_the_hand_derived_layout() -> None:
    img = Image(data=np.arange(18, dtype=np.uint8).reshape(2, 3, 3), stamp_ns=1_000_000_002, frame_id="f")
    ((schema, data, log_time),) = to_cdr(img)
    expected = (
        b"\x00\x01\x00\x00"  # CDR_LE encapsulation
        + struct.pack("<iI", 1, 2)  # header.stamp sec, nanosec
        + struct.pack("<I", 2) + b"f\x00"  # frame_id (length counts the NUL)
        + b"\x00\x00"  # pad to 4 (offsets relative to after the encapsulation)
        + struct.pack("<II", 2, 3)  # height, width
        + struct.pack("<I", 5) + b"rgb8\x00"  # encoding
        + b"\x00"  # is_bigendian
        + b"\x00\x00"  # pad
        + struct.pack("<II", 9, 18)  # step, data length
        + bytes(range(18))
    )  # fmt: skip
    assert schema == "sensor_msgs/msg/Image" and log_time == 1_000_000_002
    assert data == expected


def test_imu_cdr_aligns_doubles_to_8_relative_to_the_payload() -> None:
    values = np.arange(10, dtype=np.float64)[None, :]
    msg = Imu(stamps_ns=np.array([3_000_000_004]), values=values, stamp_ns=3_000_000_004, frame_id="ab")
    ((schema, data, _),) = to_cdr(msg)
    assert schema == "sensor_msgs/msg/Imu"
    # header: 8 (time) + 4 (len) + 3 ("ab\0") = 15 -> pad to 16, then 4+9+3+9+3+9 doubles
    assert len(data) == 4 + 16 + 37 * 8
    body = struct.unpack("<37d", data[4 + 16 :])
    assert body[0:4] == (0, 1, 2, 3)  # orientation xyzw
    assert body[4:13] == (-1, 0, 0, 0, 0, 0, 0, 0, 0)  # orientation_covariance (no estimate)
    assert body[13:16] == (4, 5, 6) and body[25:28] == (7, 8, 9)


def test_cdr_decoder_rejects_big_endian_and_truncation() -> None:
    schema = Schema(id=1, name="sensor_msgs/msg/Image", encoding="ros2msg", data=SCHEMAS["sensor_msgs/msg/Image"].encode())
    ((_, data, _),) = to_cdr(Image(data=np.ones((2, 2, 3), np.uint8), stamp_ns=3))
    decoder = CdrDecoder()
    with pytest.raises(WireError, match="little-endian"):
        decoder.decode(schema, "cdr", b"\x00\x00" + data[2:])
    with pytest.raises(WireError, match="truncated"):
        decoder.decode(schema, "cdr", data[:-1])  # the pixels' length prefix says one byte more


def test_schemas_are_complete_ros2msg_definitions() -> None:
    sep = "=" * 80
    imu = SCHEMAS["sensor_msgs/msg/Imu"]
    assert imu.startswith("std_msgs/Header header\n")
    for dep in (
        "std_msgs/Header",
        "builtin_interfaces/Time",
        "geometry_msgs/Quaternion",
        "geometry_msgs/Vector3",
    ):
        assert f"{sep}\nMSG: {dep}\n" in imu
    assert "uint8[] data" in SCHEMAS["continua_msgs/msg/AudioChunk"]


def test_stamps_beyond_int32_seconds_are_refused() -> None:
    with pytest.raises(WireError, match="builtin_interfaces/Time"):
        to_cdr(Image(data=np.zeros((1, 1, 3), np.uint8), stamp_ns=MAX_STAMP + 1))


# --------------------------------------------------------------------------- round trips
frame_ids = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
common = {"stamp_ns": st.integers(0, MAX_STAMP), "seq": st.integers(0, 2**32 - 1), "frame_id": frame_ids}


@st.composite
def images(draw: st.DrawFn) -> Image:
    enc = draw(st.sampled_from(["rgb8", "bgr8", "mono8"]))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    ch = 1 if enc == "mono8" else 3
    data = np.frombuffer(draw(st.binary(min_size=h * w * ch, max_size=h * w * ch)), np.uint8).reshape(
        h, w, ch
    )
    return Image(data=data, encoding=enc, **{k: draw(v) for k, v in common.items()})


@st.composite
def audios(draw: st.DrawFn) -> Audio:
    dtype = draw(st.sampled_from([np.dtype("<i2"), np.dtype("<f4")]))
    n, ch = draw(st.integers(1, 40)), draw(st.integers(1, 3))
    raw = draw(st.binary(min_size=n * ch * dtype.itemsize, max_size=n * ch * dtype.itemsize))
    data = np.frombuffer(raw, dtype).reshape(n, ch)  # any bit pattern, NaNs included
    return Audio(
        data=data, sample_rate=draw(st.integers(1, 192_000)), **{k: draw(v) for k, v in common.items()}
    )


def imus() -> st.SearchStrategy[Imu]:
    floats = st.floats(allow_nan=False, allow_infinity=False)
    return imu_batches(
        max_n=5,
        stamps=st.integers(0, MAX_STAMP),
        values=floats,
        covariances=st.tuples(*[floats] * 9),
        common=lambda draw: {k: draw(v) for k, v in common.items()},
    )


@given(
    st.lists(
        st.tuples(st.sampled_from(["camera", "mic", "imu", "imu2"]), st.one_of(images(), audios(), imus())),
        min_size=1,
        max_size=8,
    )
)
def test_record_then_read_reproduces_every_message_exactly(items: list[tuple[str, Message]]) -> None:
    # Two adjacent IMU batches on one topic are regrouped by (seq, batch stamp): make them differ.
    for i in range(1, len(items)):
        (t0, m0), (t1, m1) = items[i - 1], items[i]
        if (
            t0 == t1
            and isinstance(m0, Imu)
            and isinstance(m1, Imu)
            and (m0.seq, m0.stamp_ns) == (m1.seq, m1.stamp_ns)
        ):
            m1.seq = (m0.seq + 1) % 2**32
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rt.mcap"
        with Recorder(path) as rec:
            for topic, msg in items:
                rec.write(topic, msg)
        back = read_messages(path)
    assert [t for t, _ in back] == [t for t, _ in items]
    for (_, a), (_, b) in zip(items, back, strict=True):
        assert_same(a, b)


def test_jpeg_round_trip_keeps_bytes_and_recovers_size(tmp_path: Path) -> None:
    ok, jpg = cv2.imencode(".jpg", synthetic_frame(30, 50, 1))
    assert ok and jpeg_size(jpg.tobytes()) == (30, 50)
    msg = Image(data=jpg.ravel(), encoding="jpeg", height=30, width=50, stamp_ns=5, seq=9, frame_id="cam")
    with Recorder(tmp_path / "j.mcap", compression="none") as rec:
        rec.write("camera", msg)
    ((topic, back),) = read_messages(tmp_path / "j.mcap")
    assert topic == "camera"
    assert_same(msg, back)


def test_file_is_ros2_profile_with_ros2msg_schemas_and_cdr(tmp_path: Path) -> None:
    imu = Imu(stamps_ns=np.array([10, 20, 30]), values=np.zeros((3, 10)), stamp_ns=30, seq=4)
    with Recorder(tmp_path / "p.mcap") as rec:
        rec.write("imu", imu)
        rec.write("mic", Audio(data=np.zeros((320, 1), np.int16), stamp_ns=25))
        assert rec.records == 4
    with (tmp_path / "p.mcap").open("rb") as f:
        reader = make_reader(f)
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
        assert summary is not None and summary.statistics is not None
        assert summary.statistics.message_count == 4
        assert {s.name for s in summary.schemas.values()} == {
            "sensor_msgs/msg/Imu",
            "continua_msgs/msg/AudioChunk",
        }
        assert {s.encoding for s in summary.schemas.values()} == {"ros2msg"}
        assert {c.message_encoding for c in summary.channels.values()} == {"cdr"}
        assert sorted(m.log_time for _, _, m in reader.iter_messages()) == [10, 20, 25, 30]


def test_unknown_schemas_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "mixed.mcap"
    with path.open("wb") as f:
        w = Writer(f)
        w.start(profile="ros2")
        js = w.register_schema(name="foo/msg/Bar", encoding="jsonschema", data=b"{}")
        ch = w.register_channel(topic="other", message_encoding="json", schema_id=js)
        w.add_message(ch, log_time=1, data=b"{}", publish_time=1)
        img_schema = w.register_schema(
            "sensor_msgs/msg/Image", "ros2msg", SCHEMAS["sensor_msgs/msg/Image"].encode()
        )
        ch2 = w.register_channel(topic="camera", message_encoding="cdr", schema_id=img_schema)
        w.add_message(ch2, log_time=2, data=b"\x00\x01\x00\x00\x01", publish_time=2)  # truncated CDR
        ((_, data, _),) = to_cdr(Image(data=np.ones((2, 2, 3), np.uint8), stamp_ns=3))
        w.add_message(ch2, log_time=3, data=data, publish_time=3)
        w.finish()
    reader = McapReader(path)
    got = list(reader)
    assert len(got) == 1 and got[0][0] == "camera" and got[0][1].stamp_ns == 3
    assert dict(reader.skipped) == {"schema": 1, "cdr": 1}


# --------------------------------------------------------------------------- interoperability
# A definition as rosbag2 stores it: the .msg files' comments and blank lines kept.
ROSBAG2_IMAGE_SCHEMA = (
    "# This message contains an uncompressed image\n# (0, 0) is at top-left corner of image\n\n"
    "std_msgs/Header header # Header timestamp should be acquisition time of image\n\n"
    "uint32 height                # image height, that is, number of rows\nuint32 width\n\n"
    "string encoding       # Encoding of pixels -- channel meaning, ordering, size\n\n"
    "uint8 is_bigendian    # is this data bigendian?\nuint32 step           # Full row length in bytes\n"
    "uint8[] data          # actual matrix data, size is (step * rows)\n\n"
    + "=" * 80 + "\nMSG: std_msgs/Header\n# Standard metadata for higher-level stamped data types.\n\n"
    "builtin_interfaces/Time stamp\n\n# Transform frame with which this data is associated.\nstring frame_id\n\n"
    + "=" * 80 + "\nMSG: builtin_interfaces/Time\n# This message communicates ROS Time.\n\n"
    "# The seconds component, valid over all int32 values.\nint32 sec\n\n"
    "# The nanoseconds component, valid in the range [0, 10e9).\nuint32 nanosec\n"
)


def test_file_written_by_mcap_ros2_writer_with_rosbag2_schema_text_reads_back(tmp_path: Path) -> None:
    frame = synthetic_frame(3, 5, 2)
    path = tmp_path / "ros2.mcap"
    with path.open("wb") as f:
        w = Ros2Writer(f)
        schema = w.register_msgdef("sensor_msgs/msg/Image", ROSBAG2_IMAGE_SCHEMA)
        imu_schema = w.register_msgdef("sensor_msgs/msg/Imu", SCHEMAS["sensor_msgs/msg/Imu"])
        header = {"stamp": {"sec": 7, "nanosec": 8}, "frame_id": "cam_optical"}
        image = {"header": header, "height": 3, "width": 5, "encoding": "rgb8", "step": 15, "data": frame.tobytes()}
        w.write_message("/camera/image_raw", schema, image, log_time=7_000_000_008, sequence=4)
        imu = {"header": header, "orientation": {"w": 1.0}, "linear_acceleration": {"z": 9.81}}
        w.write_message("/imu", imu_schema, imu, log_time=7_000_000_008, publish_time=7_000_000_008)
        w.finish()
    (t0, img), (t1, batch) = read_messages(path)
    assert (t0, t1) == ("/camera/image_raw", "/imu")
    assert isinstance(img, Image) and isinstance(batch, Imu)
    assert (img.stamp_ns, img.seq, img.frame_id, img.encoding) == (7_000_000_008, 4, "cam_optical", "rgb8")
    assert np.array_equal(img.data, frame)
    assert batch.stamps_ns.tolist() == [7_000_000_008] and batch.stamp_ns == 7_000_000_008
    np.testing.assert_array_equal(batch.values, [[0, 0, 0, 1, 0, 0, 0, 0, 0, 9.81]])
    assert batch.orientation_covariance == (0.0,) * 9


def test_ros2_trailing_padding_is_read_and_truncated_payloads_are_skipped(tmp_path: Path) -> None:
    ok, jpg = cv2.imencode(".jpg", synthetic_frame(16, 24, 0))
    assert ok
    ((_, data, _),) = to_cdr(Image(data=jpg.ravel(), encoding="jpeg", height=16, width=24, stamp_ns=11))
    path = tmp_path / "padded.mcap"
    with path.open("wb") as f:
        w = Writer(f)
        w.start(profile="ros2")
        sid = w.register_schema(
            "sensor_msgs/msg/CompressedImage", "ros2msg", SCHEMAS["sensor_msgs/msg/CompressedImage"].encode()
        )
        ch = w.register_channel(topic="camera", message_encoding="cdr", schema_id=sid)
        w.add_message(ch, log_time=11, data=data + b"\x00" * (-len(data) % 4 or 4), publish_time=11)
        w.add_message(ch, log_time=12, data=data[:-10], publish_time=12)  # the JPEG cut short
        w.finish()
    reader = McapReader(path)
    ((topic, back),) = list(reader)
    assert topic == "camera" and (back.height, back.width, back.stamp_ns) == (16, 24, 11)
    assert back.data.tobytes() == jpg.tobytes()
    assert dict(reader.skipped) == {"cdr": 1}


def test_our_files_decode_with_mcap_ros2_decoder_factory(tmp_path: Path) -> None:
    ok, jpg = cv2.imencode(".jpg", synthetic_frame(8, 8, 0))
    assert ok
    frame = synthetic_frame(2, 3, 1)
    with Recorder(tmp_path / "ours.mcap") as rec:
        rec.write("camera", Image(data=frame, stamp_ns=1_500_000_001, frame_id="cam"))
        rec.write("jpeg", Image(data=jpg.ravel(), encoding="jpeg", height=8, width=8, stamp_ns=2))
        rec.write("mic", Audio(data=np.arange(6, dtype=np.int16).reshape(3, 2), sample_rate=8000, stamp_ns=3))
        rec.write("imu", Imu(stamps_ns=np.array([4]), values=np.arange(10.0)[None, :], stamp_ns=4))
    with (tmp_path / "ours.mcap").open("rb") as f:
        got = {c.topic: m for _, c, _, m in make_reader(f, decoder_factories=[DecoderFactory()]).iter_decoded_messages()}
    cam = got["camera"]
    assert (cam.header.stamp.sec, cam.header.stamp.nanosec, cam.header.frame_id) == (1, 500_000_001, "cam")
    assert (cam.height, cam.width, cam.encoding, cam.step, cam.data) == (2, 3, "rgb8", 9, frame.tobytes())
    assert (got["jpeg"].format, got["jpeg"].data) == ("jpeg", jpg.tobytes())
    mic = got["mic"]
    assert (mic.sample_rate, mic.channels, mic.format) == (8000, 2, "s16le")
    assert mic.data == np.arange(6, dtype="<i2").tobytes()
    imu = got["imu"]
    assert (imu.orientation.x, imu.orientation.w, imu.angular_velocity.x, imu.linear_acceleration.z) == (0, 3, 4, 9)
    assert imu.orientation_covariance == [-1.0] + [0.0] * 8


# --------------------------------------------------------------------------- player
def _timed_recording(path: Path) -> list[Imu | Image]:
    base = 1_700_000_000_000_000_000
    msgs: list[Imu | Image] = [
        Image(data=synthetic_frame(4, 4, 0), stamp_ns=base, seq=0),
        Imu(
            stamps_ns=np.array([base + 50_000_000, base + 100_000_000]),
            values=np.ones((2, 10)),
            stamp_ns=base + 100_000_000,
            seq=0,
        ),
        Image(data=synthetic_frame(4, 4, 1), stamp_ns=base + 200_000_000, seq=1),
    ]
    with Recorder(path) as rec:
        for m in msgs:
            rec.write("imu" if isinstance(m, Imu) else "camera", m)
    return msgs


def test_player_paces_by_stamps_scaled_by_rate_and_restamps(tmp_path: Path) -> None:
    msgs = _timed_recording(tmp_path / "t.mcap")
    t0, before = time.monotonic(), time.time_ns()
    out = list(Player(tmp_path / "t.mcap", rate=2.0))
    elapsed = time.monotonic() - t0
    assert [t for t, _ in out] == ["camera", "imu", "camera"]
    assert 0.09 <= elapsed < 1.0  # 200 ms of recording at 2x
    stamps = [m.stamp_ns for _, m in out]
    assert before <= stamps[0] <= stamps[1] <= stamps[2] <= time.time_ns()
    imu = out[1][1]
    assert isinstance(imu, Imu)
    # sample stamps move with the batch stamp: their spacing is kept
    assert int(imu.stamps_ns[1] - imu.stamps_ns[0]) == 50_000_000 and int(imu.stamps_ns[1]) == imu.stamp_ns
    assert np.array_equal(out[2][1].data, msgs[2].data)


def test_player_fast_keep_stamps_loop_topics_and_stop(tmp_path: Path) -> None:
    msgs = _timed_recording(tmp_path / "t.mcap")
    out = list(Player(tmp_path / "t.mcap", fast=True, restamp=False, topics=["camera"]))
    assert [m.stamp_ns for _, m in out] == [msgs[0].stamp_ns, msgs[2].stamp_ns]
    stop = threading.Event()
    player = Player(tmp_path / "t.mcap", fast=True, loop=True, stop=stop)
    n = 0
    for _ in player:
        n += 1
        if n == 7:
            stop.set()
    assert n == 7 and player.loops == 2


# --------------------------------------------------------------------------- CLIs
def test_record_and_play_clis_over_real_sockets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sensors.play import main as play_main
    from sensors.record import main as record_main

    out = tmp_path / "rec.mcap"
    frames = [synthetic_frame(8, 12, i) for i in range(10)]
    with Publisher("tcp://127.0.0.1:0", sndhwm=0) as pub:
        rc: list[int] = []
        argv = ["--connect", pub.endpoint, "--out", str(out), "--max-messages", "13", "--seconds", "20"]
        t = threading.Thread(target=lambda: rc.append(record_main([*argv, "--log-level", "WARNING"])))
        t.start()
        assert pub.wait_for_subscribers(1, timeout_s=5)
        for f in frames:
            pub.publish("camera", Image(data=f))
        for i in range(3):
            pub.publish("mic", Audio(data=np.full((320, 1), i, np.int16)))
        t.join(timeout=20)
    assert rc == [0]
    rec_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec_summary["per_topic"] == {"camera": 10, "mic": 3} and rec_summary["drops"] == {}
    back = read_messages(out)
    assert [m.seq for t_, m in back if t_ == "camera"] == list(range(10))
    assert all(np.array_equal(m.data, f) for (_, m), f in zip(back[:10], frames, strict=True))

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with LosslessReader(endpoint, ["camera"]) as reader:
        argv = [str(out), "--endpoint", endpoint, "--fast", "--topic", "camera", "--wait-subscribers", "1"]
        t = threading.Thread(target=lambda: rc.append(play_main([*argv, "--log-level", "WARNING"])))
        t.start()
        got = [m for _, m, _ in recv_n(reader, 10)]
        t.join(timeout=10)
    assert rc == [0, 0]
    assert [m.seq for m in got] == list(range(10))
    assert all(np.array_equal(m.data, f) for m, f in zip(got, frames, strict=True))
    play_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert play_summary["published"] == {"camera": 10}


def test_reader_regroups_imu_batches_within_the_batch_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose IMU records all share one (channel, sequence, publish_time) is split at
    MAX_IMU_BATCH samples instead of being gathered into memory whole."""
    from sensors import mcap_io

    monkeypatch.setattr(mcap_io, "MAX_IMU_BATCH", 5)  # the wire's own limit is 100,000: too slow to write here
    values = np.arange(12 * 10, dtype=np.float64).reshape(12, 10)
    stamps = 1_000_000_000 + np.arange(12, dtype=np.int64) * 10_000_000
    with Recorder(tmp_path / "imu.mcap") as rec:
        rec.write("imu", Imu(stamps_ns=stamps, values=values, stamp_ns=int(stamps[0]), seq=3))
    back = read_messages(tmp_path / "imu.mcap")
    assert [len(m.stamps_ns) for _, m in back] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([m.values for _, m in back]), values)
    np.testing.assert_array_equal(np.concatenate([m.stamps_ns for _, m in back]), stamps)
    assert {m.seq for _, m in back} == {3}
