"""Prepared data (``make data``), its verification, and the dataset publishers.

The real prepared set is required (``make test`` runs ``make data`` first); tests of
``prepare`` itself build only small datasets into a temporary ``CONTINUA_DATA``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from common.config import load_config
from demodata import store
from demodata.prepare import WORDS, Options, prepare, speech_voices, synth_word
from demodata.publish import ClassSchedule, DatasetStreamer, StreamerConfig
from sensors.transport import Publisher
from sensors.wire import Audio, Image, Imu, decode

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- prepared data
def test_prepared_shapes_dtypes_and_hashes() -> None:
    fm = store.load("fashion_mnist")
    assert fm["x_train"].shape == (60000, 28, 28) and fm["x_train"].dtype == np.uint8
    assert fm["x_test"].shape == (10000, 28, 28) and fm["x_test"].dtype == np.uint8
    assert fm["y_train"].dtype == np.int64 and set(np.unique(fm["y_test"])) == set(range(10))
    assert fm["class_names"].shape == (10,) and fm["class_names"][9] == "Ankle boot"

    dg = store.load("digits")
    assert dg["x"].shape == (1797, 8, 8) and dg["x"].dtype == np.uint8 and dg["x"].max() == 255
    assert dg["y"].dtype == np.int64 and set(np.unique(dg["y"])) == set(range(10))

    bm = store.load("basic_motions")
    for split in ("train", "test"):
        assert bm[f"x_{split}"].shape == (40, 6, 100) and bm[f"x_{split}"].dtype == np.float32
        assert np.bincount(bm[f"y_{split}"]).tolist() == [10, 10, 10, 10]
    assert bm["class_names"].tolist() == ["standing", "walking", "running", "badminton"]
    # running moves the watch more than standing: labels are attached to the right series
    energy = [np.abs(bm["x_train"][bm["y_train"] == a]).mean() for a in range(4)]
    assert energy[0] < energy[1] < energy[2]

    man = store.manifest()
    for name in store.DATASETS:
        entry = man["datasets"][name]
        path = store.data_dir() / entry["file"]
        assert path.stat().st_size == entry["bytes"]
        assert store.file_sha256(path) == entry["sha256"]
        assert entry["licence"] and entry["source"] and entry["key"]["sources"]


def test_speech_voices_recorded_and_split_disjoint() -> None:
    sp = store.load("speech")
    n = len(sp["y"])
    assert sp["audio"].shape == (n, 16000) and sp["audio"].dtype == np.int16
    assert sp["y"].dtype == np.int64 and sp["words"].tolist() == list(WORDS)
    assert sp["voice"].shape == sp["aug"].shape == sp["split"].shape == (n,)
    voices = set(sp["voice"].tolist())
    assert len(voices) >= 30
    assert {v.split(":")[0] for v in voices} == {"espeak-ng", "flite"}
    train = set(sp["voice"][sp["split"] == "train"].tolist())
    test = set(sp["voice"][sp["split"] == "test"].tolist())
    assert train and test and not train & test and train | test == voices
    assert (store.voice_split(sp["voice"]) == sp["split"]).all()
    for voice in list(voices)[:5]:  # every voice says every word in >= 2 augmentations
        mine = sp["voice"] == voice
        assert set(sp["y"][mine].tolist()) == set(range(len(WORDS)))
        assert len(set(sp["aug"][mine].tolist())) >= 3
    clean = sp["audio"][sp["aug"] == "clean"]
    assert (np.abs(clean).max(axis=1) > 1000).all()  # every clip speaks
    assert (clean[:, :100] == 0).all() and (clean[:, -100:] == 0).all()  # centred, zero padded
    half = store.speech_split(sp, "test")
    assert set(half["voice"].tolist()) == test and half["words"].shape == (len(WORDS),)


# --------------------------------------------------------------------------- prepare / store
def test_prepare_cache_corruption_and_repair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTINUA_DATA", str(tmp_path))
    assert store.data_dir() == tmp_path
    with pytest.raises(store.DatasetNotPreparedError, match="make data"):
        store.load("digits")
    prepare(["digits"])
    path = tmp_path / "digits.npz"
    assert store.load("digits")["x"].shape == (1797, 8, 8)
    with pytest.raises(store.DatasetNotPreparedError, match="basic_motions"):
        store.load("basic_motions")

    mtime = path.stat().st_mtime_ns
    t0 = time.perf_counter()
    prepare(["digits"])  # cached: nothing rebuilt
    assert time.perf_counter() - t0 < 1.0 and path.stat().st_mtime_ns == mtime

    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(raw))
    with pytest.raises(store.DatasetCorruptError, match=r"sha256 .* does not match .*make data"):
        store.load("digits")
    prepare(["digits"])  # a corrupt file is not "cached": it is rebuilt
    assert store.load("digits")["x"].max() == 255
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_prepare_tiny_speech_is_deterministic(tmp_path: Path) -> None:
    man = prepare(["speech"], opts=Options(voices=4), root=tmp_path)
    entry = man["datasets"]["speech"]
    sp = store.load("speech", root=tmp_path)
    assert sp["audio"].shape == (4 * len(WORDS) * 4, 16000)
    assert set(sp["voice"].tolist()) == set(speech_voices()[:4])
    assert set(sp["split"].tolist()) == {"train", "test"}  # the voice order mixes splits
    assert entry["summary"]["voices"] == 4 and entry["key"]["params"] == {"voices": 4}
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["datasets"]["speech"]["sha256"] == entry["sha256"]
    voice = speech_voices()[2]  # a flite voice: synthesis is seeded, hence repeatable
    first, second = synth_word(voice, 9), synth_word(voice, 9)
    assert [a for a, _ in first] == ["clean", "noise", "reverb+noise", "tempo+pitch"]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(first, second, strict=True))
    rows = sp["voice"] == voice
    assert np.array_equal(sp["audio"][rows][sp["y"][rows] == 9], np.stack([x for _, x in first]))


# --------------------------------------------------------------------------- publisher
def test_config_file_and_validation() -> None:
    cfg = load_config(StreamerConfig, REPO / "launch/publishers.toml", section="publishers")
    assert cfg.classes == list(range(10)) and cfg.mic_chunk == 320 and cfg.imu_chunk == 10
    with pytest.raises(ValueError, match="split='val'"):
        StreamerConfig(split="val")
    with pytest.raises(ValueError, match="classes"):
        StreamerConfig(classes=[3, 12])


def test_class_schedule_is_deterministic() -> None:
    cyc = ClassSchedule([4, 2, 7])
    assert [cyc.class_at(p) for p in range(6)] == [4, 2, 7, 4, 2, 7]
    sh = ClassSchedule(list(range(5)), "shuffle", seed=3)
    first = [sh.class_at(p) for p in range(10)]
    assert sorted(first[:5]) == sorted(first[5:]) == list(range(5))
    assert first == [ClassSchedule(list(range(5)), "shuffle", seed=3).class_at(p) for p in range(10)]


def _find(chunk: np.ndarray, clips: np.ndarray) -> bool:
    """Is ``chunk`` a contiguous piece of one of ``clips``?"""
    n = len(chunk)
    for clip in clips:
        for i in np.flatnonzero(clip[: len(clip) - n + 1] == chunk[0]):
            if np.array_equal(clip[i : i + n], chunk):
                return True
    return False


def test_publisher_streams_real_data_with_consistent_labels() -> None:
    dwell = 0.5
    cfg = StreamerConfig(
        endpoint="tcp://127.0.0.1:*", classes=[0, 1, 2, 3, 5], dwell_s=dwell, mic_noise_dbfs=-300.0
    )
    streamer = DatasetStreamer(cfg)
    ctx = zmq.Context.instance()
    got: dict[str, list] = {"camera": [], "mic": [], "imu": [], "truth": []}
    with Publisher(cfg.endpoint) as pub, ctx.socket(zmq.SUB) as sub:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.endpoint)
        assert pub.wait_for_subscribers(1, timeout_s=5.0)
        stop = threading.Event()
        worker = threading.Thread(target=streamer.run, args=(stop, pub), daemon=True)
        worker.start()
        t_end = time.monotonic() + 2.2
        while time.monotonic() < t_end:
            if not sub.poll(100):
                continue
            frames = sub.recv_multipart(copy=False)
            if bytes(frames[0]) == b"truth":
                got["truth"].append(msgpack.unpackb(bytes(frames[1])))
            else:
                topic, msg = decode(frames)
                got[topic].append(msg)
        stop.set()
        worker.join(5.0)
    assert not worker.is_alive()

    span = (got["camera"][-1].stamp_ns - got["camera"][0].stamp_ns) / 1e9
    assert 1.5 < span < 2.5
    rates = {t: len(got[t]) / span for t in got}
    assert 20 <= rates["camera"] <= 40 and 20 <= rates["truth"] <= 40
    assert 40 <= rates["mic"] <= 60 and 7 <= rates["imu"] <= 13
    for topic in ("camera", "mic", "imu"):  # nothing lost on loopback, seq from 0
        assert [m.seq for m in got[topic]] == list(range(len(got[topic])))

    # truth: one per frame, same stamps, labels follow the schedule
    w0 = got["camera"][0].stamp_ns
    n = min(len(got["truth"]), len(got["camera"]))  # the receive window may end between the two
    assert abs(len(got["truth"]) - len(got["camera"])) <= 1
    got["camera"], got["truth"] = got["camera"][:n], got["truth"][:n]
    assert [t["stamp_ns"] for t in got["truth"]] == [m.stamp_ns for m in got["camera"]]
    period_label: dict[int, int] = {}
    for t in got["truth"]:
        p = (t["stamp_ns"] - w0) // round(dwell * 1e9)
        assert period_label.setdefault(p, t["label"]) == t["label"]
        assert (
            t["label"] == cfg.classes[p % len(cfg.classes)] and t["name"] == streamer.class_names[t["label"]]
        )
    assert len(period_label) >= 4

    fm = store.load("fashion_mnist")
    for msg, truth in zip(got["camera"], got["truth"], strict=True):  # the frame shows its class
        assert isinstance(msg, Image) and msg.data.shape == (224, 224, 3) and msg.encoding == "rgb8"
        small = msg.data[::8, ::8, 0]
        hits = np.flatnonzero((fm["x_test"] == small).all(axis=(1, 2)))
        assert len(hits) and (fm["y_test"][hits] == truth["label"]).any()

    def label_at(stamp: int) -> int:
        return period_label[(stamp - w0) // round(dwell * 1e9)]

    speech = store.speech_split(store.load("speech"), "test")
    voiced = 0
    for msg in got["mic"]:
        assert isinstance(msg, Audio) and msg.data.shape == (320, 1) and msg.sample_rate == 16000
        if (msg.stamp_ns - w0) // round(dwell * 1e9) not in period_label:
            continue
        chunk = np.asarray(msg.data[:, 0])
        voiced += bool(np.abs(chunk).max() > 500)
        assert _find(chunk, speech["audio"][speech["y"] == label_at(msg.stamp_ns)])
    assert voiced >= 10

    bm = store.load("basic_motions")
    for msg in got["imu"]:
        assert isinstance(msg, Imu) and msg.values.shape == (10, 10)
        assert np.allclose(msg.orientation, [0, 0, 0, 1]) and msg.linear_acceleration_covariance[0] == -1
        assert np.diff(msg.stamps_ns).tolist() == [10_000_000] * 9 and msg.stamps_ns[0] == msg.stamp_ns
        if (msg.stamp_ns - w0) // round(dwell * 1e9) not in period_label:
            continue
        rec = bm["x_test"][bm["y_test"] == label_at(msg.stamp_ns) % 4].transpose(0, 2, 1).reshape(-1, 6)
        rows = np.concatenate([msg.linear_acceleration, msg.angular_velocity], axis=1).astype(np.float32)
        assert all((rec == r).all(axis=1).any() for r in rows)


def test_publish_main_runs_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    from demodata.publish import main

    caplog.set_level("INFO")
    args = [
        "--config",
        str(REPO / "launch/publishers.toml"),
        "--endpoint",
        "tcp://127.0.0.1:*",
        "--seconds",
        "0.5",
        "--classes",
        "1,2",
        "--rate-scale",
        "0.5",
    ]
    assert main(args) == 0
    assert "stopped after" in caplog.text and "mic 640-sample chunks" in caplog.text


def test_data_dir_is_the_checkouts_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without $CONTINUA_DATA the data lives in <repo>/data (the ignored folder `make data` fills)."""
    from demodata import store

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.delenv(store.ENV_VAR, raising=False)
    assert store.data_dir() == repo / "data"
    monkeypatch.setenv(store.ENV_VAR, str(tmp_path))
    assert store.data_dir() == tmp_path.resolve()
