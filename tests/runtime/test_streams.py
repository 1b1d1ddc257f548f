"""Audio and IMU tap streams: the real extractor and backend in their threads, equal to direct extraction."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.backends import load_backend
from export.incremental import IncrementalAudioExtractor
from runtime.streams import AudioTapStream, ImuTapStream, StreamTaps
from sensors.wire import Audio, Imu
from tests.conftest import wait_for as _wait_for

MODELS = Path(__file__).resolve().parents[2] / "models"
RATE = 16000
CHUNK = 320  # 20 ms, the mic topic's chunk size
SAMPLE_NS = 1_000_000_000 // RATE  # 62500 ns
T0 = 1_700_000_000_000_000_000
TIMEOUT_S = 20.0  # bounded waits: generous for a shared 2-core machine


wait_for = functools.partial(_wait_for, timeout_s=TIMEOUT_S, poll_s=0.005)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """(N, 16000) int16 real speech clips, else a synthesized tone sweep."""
    try:
        from demodata.store import load

        return np.ascontiguousarray(load("speech")["audio"][:12])
    except Exception:  # not prepared here: a 1 s chirp with a syllable-like envelope per clip
        t = np.arange(RATE) / RATE
        clips = [np.sin(2 * np.pi * (200 + 300 * k + 400 * t) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
                 for k in range(12)]
        return (np.stack(clips) * 12000).astype(np.int16)


@pytest.fixture(scope="module")
def imu_backend() -> Iterator[Any]:
    b = load_backend("imu", "onnxruntime", MODELS, build="missing", threads=1)
    yield b
    b.close()


@pytest.fixture(scope="module")
def audio_backend() -> Iterator[Any]:
    b = load_backend("audio", "onnxruntime", MODELS, build="missing", threads=1)
    yield b
    b.close()


def extractor() -> IncrementalAudioExtractor:
    return IncrementalAudioExtractor(MODELS, "onnxruntime", threads=1, build=False)


@pytest.fixture
def audio_stream() -> Iterator[AudioTapStream]:
    s = AudioTapStream(extractor()).start()
    yield s
    s.stop()
    assert s._thread is not None and not s._thread.is_alive()


def audio_msgs(pcm: np.ndarray, t0: int, *, chunk: int = CHUNK, seq0: int = 0) -> list[Audio]:
    return [Audio(data=pcm[i:i + chunk].reshape(-1, 1), sample_rate=RATE, stamp_ns=t0 + i * SAMPLE_NS,
                  seq=seq0 + k, frame_id="mic") for k, i in enumerate(range(0, len(pcm), chunk))]


def direct(pcm: np.ndarray, *, chunk: int = CHUNK) -> IncrementalAudioExtractor:
    inc = extractor()
    for i in range(0, len(pcm), chunk):
        inc.push(pcm[i:i + chunk])
    return inc


def assert_taps_equal(got: StreamTaps, levels: list[np.ndarray], atol: float = 1e-4) -> None:
    assert len(got.levels) == len(levels)
    for a, b in zip(got.levels, levels, strict=True):
        assert a.shape == b.shape and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4)


def ends_at(stream: AudioTapStream | ImuTapStream, end_ns: int) -> Callable[[], StreamTaps | None]:
    def pred() -> StreamTaps | None:
        got = stream.latest()
        return got if got is not None and got.end_stamp_ns == end_ns else None
    return pred


def now(stream: AudioTapStream | ImuTapStream) -> Callable[[], str]:
    def state() -> str:
        got = stream.latest()
        return f"end_stamp_ns={None if got is None else got.end_stamp_ns}, stats={stream.stats()}"
    return state


# ---------------------------------------------------------------------------- audio
def test_audio_taps_equal_the_extractor_on_the_same_pcm(audio_stream: AudioTapStream, speech: np.ndarray,
                                                        audio_backend: Any) -> None:
    pcm = speech[:3].reshape(-1)  # 3 s of real speech
    msgs = audio_msgs(pcm, T0)
    assert audio_stream.latest() is None
    for part in (slice(0, 60), slice(60, None)):  # 1.2 s, then the rest
        for m in msgs[part]:
            audio_stream.put(m)
        fed = pcm[: min(len(pcm), (part.stop or len(msgs)) * CHUNK)]
        inc = direct(fed)
        covered = inc.covered_samples
        assert covered > RATE
        end = T0 + (covered - 1) * SAMPLE_NS  # the stamp of the last covered sample
        got = wait_for(ends_at(audio_stream, end), f"audio taps ending at sample {covered}",
                       state=now(audio_stream))
        assert_taps_equal(got, list(inc.taps().values.values()))
        # and that is the second of audio ending at that sample (batch extraction, looser: float sums)
        ref = audio_backend.extract(fed[None, covered - RATE:covered])
        assert_taps_equal(got, list(ref.values.values()), atol=1e-3)
    st = audio_stream.stats()
    assert st["items"] == len(msgs) and st["dropped"] == 0 and st["resets"] == 0 and st["errors"] == 0
    assert st["computed"] >= 1
    assert [x.shape for x in got.levels] == [(1, 48), (1, 72), (1, 96), (1, 96)]


def test_float32_audio_gives_the_same_taps(audio_stream: AudioTapStream, speech: np.ndarray) -> None:
    pcm = speech[:2].reshape(-1)
    for m in audio_msgs(pcm.astype(np.float32) / 32768.0, T0):
        audio_stream.put(m)
    inc = direct(pcm)
    end = T0 + (inc.covered_samples - 1) * SAMPLE_NS
    got = wait_for(ends_at(audio_stream, end), "float32 taps", state=now(audio_stream))
    assert_taps_equal(got, list(inc.taps().values.values()))


@pytest.mark.parametrize("jump_ns", [200_000_000, -1_000_000_000], ids=["gap", "jump-back"])
def test_a_stamp_gap_resets_until_a_full_second_arrived_again(audio_stream: AudioTapStream,
                                                              speech: np.ndarray, jump_ns: int) -> None:
    before = speech[:2].reshape(-1)[: int(1.2 * RATE)]
    for m in audio_msgs(before, T0):
        audio_stream.put(m)
    wait_for(audio_stream.latest, "taps before the gap")
    assert audio_stream.stats()["resets"] == 0

    t1 = T0 + len(before) * SAMPLE_NS + jump_ns  # the next chunk is 200 ms late, or 1 s early
    after = speech[4:6].reshape(-1)
    msgs = audio_msgs(after, t1)
    half = RATE // 2 // CHUNK  # 0.5 s after the gap
    for m in msgs[:half]:
        audio_stream.put(m)
    wait_for(lambda: audio_stream.stats()["resets"] == 1
             and audio_stream.extractor.samples_seen == half * CHUNK,
             "the reset and 0.5 s pushed after it")
    time.sleep(0.05)
    assert audio_stream.latest() is None  # absent: never stitched across the gap

    for m in msgs[half:]:
        audio_stream.put(m)
    inc = direct(after)  # the taps are those of the audio after the gap alone
    end = t1 + (inc.covered_samples - 1) * SAMPLE_NS
    got = wait_for(ends_at(audio_stream, end), "taps after the gap", state=now(audio_stream))
    assert_taps_equal(got, list(inc.taps().values.values()))
    assert audio_stream.stats()["resets"] == 1


def test_stamp_jitter_below_max_gap_does_not_reset(audio_stream: AudioTapStream, speech: np.ndarray) -> None:
    pcm = speech[:2].reshape(-1)
    msgs = audio_msgs(pcm, T0)
    jitter = np.random.default_rng(0).integers(-5_000_000, 5_000_000, len(msgs))
    jitter[0] = 0
    for m, j in zip(msgs, jitter, strict=True):
        m.stamp_ns += int(j)
        audio_stream.put(m)
    inc = direct(pcm)
    # the end stamp is the covered sample's place in its own chunk (that chunk's jitter included)
    last = inc.covered_samples - 1
    k = last // CHUNK
    end = msgs[k].stamp_ns + (last - k * CHUNK) * SAMPLE_NS
    got = wait_for(ends_at(audio_stream, end), "jittered taps", state=now(audio_stream))
    assert audio_stream.stats()["resets"] == 0
    assert_taps_equal(got, list(inc.taps().values.values()))


@pytest.mark.parametrize("how", ["lost-chunks", "slow-clock"])
def test_end_stamps_follow_the_chunk_stamps(audio_stream: AudioTapStream, speech: np.ndarray,
                                            how: str) -> None:
    """Lost chunks shorter than max_gap_s (no reset) and a mic clock off its nominal rate must not make
    the end stamp drift away from the stamps of the samples it covers."""
    pcm = speech[:8].reshape(-1)  # 8 s
    if how == "lost-chunks":  # every 10th 20 ms chunk is lost on the way: 20 ms gaps, below 50 ms
        msgs = [m for k, m in enumerate(audio_msgs(pcm, T0)) if k % 10 != 5]
    else:  # the sound card runs 0.5% slower than 16 kHz: each chunk spans 20.1 ms of system time
        msgs = audio_msgs(pcm, T0)
        for k, m in enumerate(msgs):
            m.stamp_ns = T0 + round(k * CHUNK * SAMPLE_NS * 1.005)
    pushed = np.concatenate([m.data[:, 0] for m in msgs])
    firsts = np.cumsum([0] + [len(m.data) for m in msgs])[:-1]
    for m in msgs:
        audio_stream.put(m)
    inc = direct(pushed)
    last = inc.covered_samples - 1
    k = int(np.searchsorted(firsts, last, side="right")) - 1
    end = msgs[k].stamp_ns + (last - int(firsts[k])) * SAMPLE_NS
    wait_for(lambda: audio_stream.extractor.samples_seen == len(pushed), "all chunks pushed")
    assert audio_stream.stats()["resets"] == 0
    got = wait_for(ends_at(audio_stream, end), f"end stamp {end}", state=now(audio_stream), timeout_s=5.0)
    assert_taps_equal(got, list(inc.taps().values.values()))
    assert msgs[-1].stamp_ns - got.end_stamp_ns < 0.2e9  # close to the newest chunk, no drift


@pytest.mark.parametrize(("msg", "err", "match"), [
    (Audio(data=np.zeros((320, 1), np.int16), sample_rate=48000), ValueError, "sample_rate 48000"),
    (Audio(data=np.zeros((320, 2), np.int16), sample_rate=RATE), ValueError, "2 channels"),
    (Audio(data=np.zeros((320, 1), np.float64), sample_rate=RATE), ValueError, "float64"),
    (Audio(data=np.zeros((320, 1), np.int32), sample_rate=RATE), ValueError, "int32"),
    (Imu(stamps_ns=np.zeros(1, np.int64), values=np.zeros((1, 10))), TypeError, "needs audio"),
])
def test_audio_put_rejects_what_the_backbone_cannot_use(msg: Any, err: type, match: str) -> None:
    s = AudioTapStream(None)  # validation happens in put, before any extraction
    with pytest.raises(err, match=match):
        s.put(msg)
    assert s.stats()["items"] == 0


def test_a_1d_int16_chunk_is_accepted_as_mono() -> None:
    s = AudioTapStream(None)
    s.put(Audio(data=np.zeros(320, np.int16), sample_rate=RATE))
    assert s.stats()["items"] == 1


def test_the_full_audio_queue_drops_the_oldest(speech: np.ndarray) -> None:
    stream = AudioTapStream(extractor(), queue_size=3)  # not started: the queue fills
    one_s = speech[:10]
    for k in range(10):  # ten 1 s chunks, back to back
        stream.put(Audio(data=one_s[k].reshape(-1, 1), sample_rate=RATE, stamp_ns=T0 + k * 1_000_000_000))
    assert stream.stats()["items"] == 10 and stream.stats()["dropped"] == 7
    stream.start()
    try:
        kept = one_s[7:].reshape(-1)  # the 3 newest survive, contiguous in time
        inc = direct(kept, chunk=RATE)
        end = T0 + 7_000_000_000 + (inc.covered_samples - 1) * SAMPLE_NS
        got = wait_for(ends_at(stream, end), "taps of the 3 newest seconds", state=now(stream))
        assert_taps_equal(got, list(inc.taps().values.values()))
        assert stream.extractor.samples_seen == 3 * RATE
        assert stream.stats()["resets"] == 0 and stream.stats()["dropped"] == 7
    finally:
        stream.stop()


# ---------------------------------------------------------------------------- imu
@pytest.fixture(scope="module")
def motion() -> np.ndarray:
    """(6, 300) float32: three BasicMotions windows back to back (acc xyz, gyro xyz), else a synthetic one."""
    try:
        from demodata.store import load

        x = load("basic_motions")["x_test"][[0, 10, 20]].astype(np.float32)
        return np.ascontiguousarray(np.concatenate(list(x), axis=1))
    except Exception:
        t = np.arange(300) / 100.0
        return np.stack([np.sin(2 * np.pi * f * t) * a for f, a in
                         ((0.5, 9.8), (1, 2), (2, 1), (0.3, 0.5), (0.7, 0.2), (1.3, 0.1))]).astype(np.float32)


def imu_msgs(x: np.ndarray, t0: int, *, batch: int = 10, seq0: int = 0) -> list[Imu]:
    """(6, N) acc+gyro rows as 100 Hz batches of ``batch`` samples (values: quat, gyro, acc)."""
    out = []
    for k, i in enumerate(range(0, x.shape[1], batch)):
        rows = x[:, i:i + batch].T.astype(np.float64)
        values = np.zeros((len(rows), 10))
        values[:, 3] = 1.0  # identity orientation
        values[:, 4:7], values[:, 7:10] = rows[:, 3:6], rows[:, 0:3]
        out.append(Imu(stamps_ns=t0 + (i + np.arange(len(rows), dtype=np.int64)) * 10_000_000, values=values,
                       seq=seq0 + k))
    return out


def test_imu_taps_equal_the_backend_on_the_newest_second(imu_backend: Any, motion: np.ndarray) -> None:
    stream = ImuTapStream(imu_backend).start()
    try:
        msgs = imu_msgs(motion, T0)
        for m in msgs[:5]:  # 0.5 s: not a full window yet
            stream.put(m)
        assert len(stream.window) == 50
        time.sleep(0.2)
        assert stream.latest() is None
        fed = 5
        for stop in (10, 15, 30):  # 1 s, 1.5 s, 3 s
            for m in msgs[fed:stop]:
                stream.put(m)
            fed = stop
            end = int(msgs[stop - 1].stamps_ns[-1])
            got = wait_for(ends_at(stream, end), f"imu taps ending at batch {stop}", state=now(stream))
            window = motion[:, stop * 10 - 100:stop * 10]
            np.testing.assert_array_equal(stream.window.latest().T, window)
            ref = imu_backend.extract(np.ascontiguousarray(stream.window.latest().T)[None])
            assert_taps_equal(got, list(ref.values.values()), atol=1e-5)
            ref2 = imu_backend.extract(np.ascontiguousarray(window)[None])
            assert_taps_equal(got, list(ref2.values.values()), atol=1e-5)
        assert [x.shape for x in got.levels] == [(1, 168)] * 4
        st = stream.stats()
        # batches may be dropped from the queue: they are in the window already
        assert st["items"] == 30 and st["errors"] == 0 and st["computed"] >= 3
    finally:
        stream.stop()
    assert stream._thread is not None and not stream._thread.is_alive()


def test_queued_imu_batches_are_one_computation(imu_backend: Any, motion: np.ndarray) -> None:
    stream = ImuTapStream(imu_backend, queue_size=8)  # not started: batches queue up
    msgs = imu_msgs(motion, T0)
    for m in msgs[:20]:
        stream.put(m)
    assert stream.stats()["items"] == 20 and stream.stats()["dropped"] == 12
    stream.start()
    try:
        got = wait_for(ends_at(stream, int(msgs[19].stamps_ns[-1])), "one computation for the backlog",
                       state=now(stream))
        ref = imu_backend.extract(np.ascontiguousarray(motion[:, 100:200])[None])
        assert_taps_equal(got, list(ref.values.values()), atol=1e-5)
        time.sleep(0.2)
        assert stream.stats()["computed"] == 1  # the window holds every batch: the drops lose no samples
    finally:
        stream.stop()


@pytest.mark.parametrize(("make", "err"), [
    (lambda: Imu(stamps_ns=np.zeros(3, np.int64), values=np.zeros((3, 9))), ValueError),
    (lambda: Imu(stamps_ns=np.zeros(2, np.int64), values=np.zeros((3, 10))), ValueError),
    (lambda: Imu(stamps_ns=np.zeros(3, np.int64), values=np.zeros(30)), ValueError),
    (lambda: Audio(data=np.zeros((320, 1), np.int16)), TypeError),
])
def test_imu_put_rejects_bad_batches(imu_backend: Any, make: Callable[[], Any], err: type) -> None:
    stream = ImuTapStream(imu_backend)
    with pytest.raises(err):
        stream.put(make())
    assert len(stream.window) == 0 and stream.stats()["items"] == 0
