"""Driver tests. The IMU text path runs for real (files, a named pipe); the camera driver runs
on a real video file; a live camera / microphone is used only where one exists."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sensors.drivers import (
    DRIVERS,
    CameraConfig,
    CameraDriver,
    ImuSerialConfig,
    ImuSerialDriver,
    MicrophoneConfig,
    MicrophoneDriver,
    get_driver,
    parse_line,
)
from sensors.drivers.imu_serial import BadLine
from sensors.errors import DeviceNotAvailableError
from sensors.transport import LosslessReader
from sensors.wire import NO_COVARIANCE, Imu
from tests.fakes import fifo_writer, imu_lines, imu_samples, synthetic_frame, write_lines, write_video
from tests.sensors.streams import recv_n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_all(driver: ImuSerialDriver, timeout_s: float = 2.0, limit: int = 1000) -> list[Imu]:
    out = []
    for _ in range(limit):
        try:
            out.append(driver.read(timeout_s=timeout_s))
        except EOFError:
            return out
    raise AssertionError("source did not end")


# --------------------------------------------------------------------------- registry / configs
def test_registry_names_and_unknown_driver() -> None:
    assert {"camera", "mic", "imu"} <= set(DRIVERS)
    assert get_driver("imu") is ImuSerialDriver and get_driver("camera") is CameraDriver
    assert get_driver("mic") is MicrophoneDriver
    with pytest.raises(ValueError, match="unknown driver 'lidar'"):
        get_driver("lidar")


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ImuSerialConfig, {}, "exactly one of port"),
        (ImuSerialConfig, {"port": "/dev/ttyUSB0", "file": "x.csv"}, "exactly one of port"),
        (ImuSerialConfig, {"file": "x.csv", "batch": 0}, "batch"),
        (CameraConfig, {"width": -1}, "width"),
        (CameraConfig, {"fps": -5.0}, "fps"),
        (MicrophoneConfig, {"sample_rate": 44100, "chunk_ms": 1}, "chunk_ms"),
        (MicrophoneConfig, {"channels": 0}, "channels"),
    ],
)
def test_configs_reject_bad_values(cls: type, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_read_before_connect_is_an_error(tmp_path: Path) -> None:
    drv = ImuSerialDriver(ImuSerialConfig(file=str(tmp_path / "none.csv")))
    with pytest.raises(DeviceNotAvailableError, match="not connected"):
        drv.read(timeout_s=0.1)


# --------------------------------------------------------------------------- IMU line parsing
def test_parse_line_maps_columns_to_wire_order() -> None:
    stamp, row = parse_line(b"123,1.5,2.5,3.5,0.1,0.2,0.3,0,0,0.6,0.8\r\n", now_ns=999)
    assert stamp == 123
    np.testing.assert_array_equal(row, [0, 0, 0.6, 0.8, 0.1, 0.2, 0.3, 1.5, 2.5, 3.5])
    stamp, row = parse_line(b"0,1,2,3,4,5,6", now_ns=999)
    assert stamp == 999 and math.isnan(row[0])  # stamped on receipt, no orientation
    np.testing.assert_array_equal(row[4:], [4, 5, 6, 1, 2, 3])
    for skipped in (b"", b"   ", b"# comment", b"stamp_ns,ax,ay,az,gx,gy,gz"):
        assert parse_line(skipped, now_ns=1) is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"1,2,3", "fields"),
        (b"1,2,3,4,5,6,7,8", "fields"),
        (b"1,a,3,4,5,6,7", "number"),
        (b"1,nan,3,4,5,6,7", "non_finite"),
        (b"1,inf,3,4,5,6,7", "non_finite"),
        (b"1.5,2,3,4,5,6,7", "stamp"),
        (b"-4,2,3,4,5,6,7", "stamp"),
        (b"\xff\xfe,2,3,4,5,6,7", "encoding"),
        (b"1," + b"9" * 2000, "too_long"),
    ],
)
def test_parse_line_bad_lines_have_reasons(line: bytes, reason: str) -> None:
    with pytest.raises(BadLine) as info:
        parse_line(line, now_ns=1)
    assert info.value.reason == reason


# --------------------------------------------------------------------------- IMU driver on real files
def test_imu_csv_file_batches_exactly_and_counts_bad_lines(tmp_path: Path) -> None:
    s = imu_samples(23)
    good = imu_lines(s, orientation=True)
    lines = ["stamp_ns,ax,ay,az,gx,gy,gz,qx,qy,qz,qw", "# a comment", *good[:5], "garbage", *good[5:12]]
    lines += ["1,2,3", "1,x,3,4,5,6,7", *good[12:], "5,nan,0,0,0,0,0"]
    path = write_lines(tmp_path / "imu.csv", lines, newline="\r\n")
    with ImuSerialDriver(ImuSerialConfig(file=str(path), batch=10, frame_id="imu_link")) as drv:
        batches = _read_all(drv)
        stats = drv.stats()
    assert [len(b.stamps_ns) for b in batches] == [10, 10, 3]
    stamps = np.concatenate([b.stamps_ns for b in batches])
    values = np.concatenate([b.values for b in batches])
    np.testing.assert_array_equal(stamps, s["stamps"])
    np.testing.assert_array_equal(values[:, 7:10], s["acc"])  # exact: repr() floats round-trip
    np.testing.assert_array_equal(values[:, 4:7], s["gyro"])
    np.testing.assert_array_equal(values[:, 0:4], s["quat"])
    assert [b.stamp_ns for b in batches] == [int(b.stamps_ns[-1]) for b in batches]
    assert all(b.frame_id == "imu_link" and b.orientation_covariance == (0.0,) * 9 for b in batches)
    assert stats == {"samples": 23, "bad_lines": {"fields": 2, "number": 1, "non_finite": 1}}


def test_imu_without_orientation_marks_no_estimate(tmp_path: Path) -> None:
    s = imu_samples(4)
    path = write_lines(tmp_path / "imu.csv", imu_lines(s, orientation=False))
    with ImuSerialDriver(ImuSerialConfig(file=str(path), batch=4, accel_variance=0.01)) as drv:
        (batch,) = _read_all(drv)
    assert batch.orientation_covariance == NO_COVARIANCE
    assert batch.linear_acceleration_covariance == (0.01, 0, 0, 0, 0.01, 0, 0, 0, 0.01)
    np.testing.assert_array_equal(batch.values[:, 0:4], 0.0)


def test_imu_zero_stamp_means_stamp_on_receipt(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "imu.csv", ["0,0,0,9.81,0,0,0"] * 3)
    before = time.time_ns()
    with ImuSerialDriver(ImuSerialConfig(file=str(path), batch=3)) as drv:
        (batch,) = _read_all(drv)
    assert all(before <= int(t) <= time.time_ns() for t in batch.stamps_ns)


def test_imu_named_pipe_partial_batches_on_timeout_then_eof(tmp_path: Path) -> None:
    s = imu_samples(6)
    fifo = tmp_path / "imu.fifo"
    lines = [*imu_lines(s)[:3], b"\x00\x01junk", *imu_lines(s)[3:]]
    with (
        fifo_writer(fifo, lines, delay_s=0.05),
        ImuSerialDriver(ImuSerialConfig(file=str(fifo), batch=100)) as drv,
    ):
        batches = _read_all(drv, timeout_s=0.2)
        bad = drv.stats()["bad_lines"]
    assert len(batches) >= 2  # the writer is slower than the timeout: partial batches
    np.testing.assert_array_equal(np.concatenate([b.stamps_ns for b in batches]), s["stamps"])
    assert bad == {"fields": 1}


def test_imu_follow_mode_times_out_then_sees_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "grow.csv"
    path.write_bytes(b"")
    s = imu_samples(2)
    with ImuSerialDriver(ImuSerialConfig(file=str(path), follow=True, batch=2)) as drv:
        with pytest.raises(TimeoutError):
            drv.read(timeout_s=0.15)
        with path.open("a") as f:
            f.write("\n".join(imu_lines(s)) + "\n")
        batch = drv.read(timeout_s=2.0)
    np.testing.assert_array_equal(batch.stamps_ns, s["stamps"])


def test_imu_missing_sources_raise_device_not_available(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotAvailableError, match="could not be opened"):
        ImuSerialDriver(ImuSerialConfig(file=str(tmp_path / "missing.csv"))).connect()
    with pytest.raises(DeviceNotAvailableError, match="/dev/ttyDOES_NOT_EXIST"):
        ImuSerialDriver(ImuSerialConfig(port="/dev/ttyDOES_NOT_EXIST")).connect()


# --------------------------------------------------------------------------- camera
def test_camera_reads_a_video_file_as_rgb8_then_eof(tmp_path: Path) -> None:
    frames = [synthetic_frame(48, 64, i) for i in range(5)]
    path = write_video(tmp_path / "cam.avi", frames, fps=10)
    if path is None:
        pytest.skip("this OpenCV build cannot write MJPG .avi files")
    got = []
    with CameraDriver(CameraConfig(device=str(path), frame_id="cam0")) as cam:
        while True:
            try:
                got.append(cam.read(timeout_s=1.0))
            except EOFError:
                break
    assert len(got) == 5
    for src, img in zip(frames, got, strict=True):
        assert img.encoding == "rgb8" and img.data.shape == (48, 64, 3) and img.frame_id == "cam0"
        # MJPG is lossy (mean error ~2); frames left in BGR would be off by ~50
        assert np.abs(img.data.astype(int) - src.astype(int)).mean() < 6
        assert np.abs(img.data[:, :, ::-1].astype(int) - src.astype(int)).mean() > 30
        assert img.stamp_ns > 0


def test_camera_missing_source_raises_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotAvailableError, match="could not be opened"):
        CameraDriver(CameraConfig(device=str(tmp_path / "nope.avi"))).connect()


def test_live_camera_if_present() -> None:
    if not any(Path("/dev").glob("video*")):
        pytest.skip("no camera device (/dev/video*) on this machine")
    with CameraDriver(CameraConfig(device="0")) as cam:
        img = cam.read(timeout_s=2.0)
    assert img.data.ndim == 3 and img.data.shape[2] in (1, 3)


# --------------------------------------------------------------------------- microphone
def test_microphone_if_present() -> None:
    mic = MicrophoneDriver(MicrophoneConfig(chunk_ms=20))
    try:
        mic.connect()
    except DeviceNotAvailableError as exc:
        assert "pip install 'continua-robot[audio]'" in str(exc) or "could not be opened" in str(exc)
        pytest.skip(f"no usable microphone here: {exc}")
    try:
        chunk = mic.read(timeout_s=2.0)
    finally:
        mic.disconnect()
    assert chunk.data.shape == (320, 1) and chunk.data.dtype == np.int16 and chunk.sample_rate == 16000


# --------------------------------------------------------------------------- publish CLI
def test_publish_cli_streams_an_imu_file_to_a_real_subscriber(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sensors.publish import main

    s = imu_samples(50)
    path = write_lines(tmp_path / "imu.csv", ["oops", *imu_lines(s)])
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    argv = ["imu", "--endpoint", endpoint, "--file", str(path), "--batch", "10", "--topic", "imu0"]
    argv += ["--wait-subscribers", "1", "--linger-s", "0.2", "--log-level", "WARNING"]
    rc: list[int] = []
    with LosslessReader(endpoint, ["imu0"]) as reader:
        t = threading.Thread(target=lambda: rc.append(main(argv)))
        t.start()
        got = recv_n(reader, 5)
        t.join(timeout=10)
    assert rc == [0]
    assert [m.seq for _, m, _ in got] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.concatenate([m.stamps_ns for _, m, _ in got]), s["stamps"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["published"] == 5 and summary["driver_stats"]["bad_lines"] == {"fields": 1}


def test_publish_cli_reports_missing_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sensors.publish import main

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    rc = main(
        ["imu", "--endpoint", endpoint, "--file", str(tmp_path / "missing.csv"), "--log-level", "WARNING"]
    )
    assert rc == 3
    assert "could not be opened" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "missing.csv")
