"""StreamWindow: conversions, channel order, time cuts, bounds, and properties over arbitrary
chunkings (the window is always the tail of what was pushed, memory never grows)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sensors.window import StreamWindow
from sensors.wire import Audio, Imu, decode, encode

RATE = 16000
NS_PER_SAMPLE = 1e9 / RATE


def _audio(samples: np.ndarray, t0_ns: int, rate: int = RATE) -> Audio:
    return Audio(
        data=samples if samples.ndim == 2 else samples.reshape(-1, 1), sample_rate=rate, stamp_ns=t0_ns
    )


def _push_stream(win: StreamWindow, pcm: np.ndarray, chunk: int, t0_ns: int = 10**12) -> None:
    for i in range(0, len(pcm), chunk):
        win.push(_audio(pcm[i : i + chunk], t0_ns + round(i * NS_PER_SAMPLE)))


def test_audio_s16le_becomes_float32_in_minus_one_to_one() -> None:
    win = StreamWindow(kind="audio", window=4, channels=1, rate_hz=RATE)
    assert win.latest() is None
    win.push(_audio(np.array([-32768, -16384, 0], np.int16), 0))
    assert win.latest() is None  # not filled yet
    win.push(_audio(np.array([32767], np.int16), round(3 * NS_PER_SAMPLE)))
    out = win.latest()
    assert out.dtype == np.float32 and out.shape == (4, 1)
    np.testing.assert_array_equal(out[:, 0], [-1.0, -0.5, 0.0, 32767 / 32768])
    assert out.min() >= -1.0 and out.max() < 1.0


def test_audio_f32le_and_several_channels_pass_through() -> None:
    win = StreamWindow(kind="audio", window=3, channels=2, rate_hz=RATE)
    x = np.arange(10, dtype=np.float32).reshape(5, 2) / 10
    win.push(_audio(x, 0))
    np.testing.assert_array_equal(win.latest(), x[-3:])


def test_one_second_of_audio_from_20ms_chunks_through_the_wire() -> None:
    win = StreamWindow(kind="audio", window=16000, channels=1, rate_hz=RATE)
    pcm = (np.arange(2 * RATE) % 30000).astype(np.int16)
    for i in range(0, len(pcm), 320):  # decoded messages hold read-only zero-copy views
        _, msg = decode(encode("mic", _audio(pcm[i : i + 320], 10**12 + round(i * NS_PER_SAMPLE))))
        win.push(msg)
    out = win.latest()
    np.testing.assert_array_equal(out[:, 0], pcm[-16000:].astype(np.float32) / 32768)
    assert len(win) <= win.capacity == 32000


def test_end_ns_cuts_the_window_at_a_time_and_max_lag_detects_silence() -> None:
    win = StreamWindow(kind="audio", window=100, channels=1, rate_hz=RATE)
    t0 = 10**12
    _push_stream(win, np.arange(200, dtype=np.int16), chunk=20, t0_ns=t0)
    end = t0 + round(149 * NS_PER_SAMPLE)  # sample 149 is the last one at or before end
    out = win.latest(end)
    np.testing.assert_array_equal(out[:, 0] * 32768, np.arange(50, 150))
    assert win.latest(t0 + round(50 * NS_PER_SAMPLE)) is None  # fewer than 100 samples by then
    late = t0 + 10**9
    assert win.latest(late) is not None
    assert win.latest(late, max_lag_ns=50_000_000) is None  # newest sample ~1 s old
    assert win.latest(end, max_lag_ns=50_000_000) is not None
    assert win.last_stamp_ns == t0 + round(180 * NS_PER_SAMPLE) + round(19 * NS_PER_SAMPLE)


def test_imu_channels_are_acceleration_then_gyro() -> None:
    win = StreamWindow(kind="imu", window=5, channels=6, rate_hz=100)
    n = 8
    values = np.zeros((n, 10))
    values[:, 0:4] = -1.0  # orientation: not part of the window
    values[:, 4:7] = np.arange(n)[:, None] + np.array([0.1, 0.2, 0.3])  # angular velocity
    values[:, 7:10] = np.arange(n)[:, None] + np.array([10.0, 20.0, 30.0])  # linear acceleration
    stamps = 10**12 + np.arange(n, dtype=np.int64) * 10_000_000
    win.push(Imu(stamps_ns=stamps[:3], values=values[:3]))
    win.push(Imu(stamps_ns=stamps[3:], values=values[3:]))
    out = win.latest()
    assert out.shape == (5, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, :3], values[3:, 7:10], rtol=1e-6)
    np.testing.assert_allclose(out[:, 3:], values[3:, 4:7], rtol=1e-6)
    cut = win.latest(int(stamps[5]))
    np.testing.assert_allclose(cut[:, 0], values[1:6, 7], rtol=1e-6)


def test_wrong_messages_are_refused() -> None:
    audio = StreamWindow(kind="audio", window=4, channels=1, rate_hz=RATE)
    imu = StreamWindow(kind="imu", window=4, channels=6, rate_hz=100)
    with pytest.raises(TypeError):
        audio.push(Imu(stamps_ns=np.zeros(1, np.int64), values=np.zeros((1, 10))))
    with pytest.raises(TypeError):
        imu.push(_audio(np.zeros(4, np.int16), 0))
    with pytest.raises(ValueError, match="channels"):
        audio.push(_audio(np.zeros((4, 2), np.int16), 0))
    with pytest.raises(ValueError, match="sample_rate"):
        audio.push(_audio(np.zeros(4, np.int16), 0, rate=8000))
    for kwargs in (
        {"kind": "video", "window": 4, "channels": 1, "rate_hz": 1.0},
        {"kind": "audio", "window": 0, "channels": 1, "rate_hz": 1.0},
        {"kind": "imu", "window": 4, "channels": 3, "rate_hz": 100.0},
        {"kind": "audio", "window": 4, "channels": 1, "rate_hz": 0.0},
        {"kind": "audio", "window": 4, "channels": 1, "rate_hz": 1.0, "capacity": 3},
    ):
        with pytest.raises(ValueError):
            StreamWindow(**kwargs)


def test_a_jump_back_in_time_restarts_the_ring_and_jitter_is_clamped() -> None:
    win = StreamWindow(kind="audio", window=20, channels=1, rate_hz=RATE)
    t0 = 10**12
    win.push(_audio(np.ones(20, np.int16), t0))
    win.push(_audio(np.ones(5, np.int16), t0 + round(18 * NS_PER_SAMPLE)))  # overlaps by 2 samples
    assert len(win) == 25
    stamps = win._stamps[win._start : win._end]
    assert np.all(np.diff(stamps) >= 0)
    win.push(_audio(np.full(4, 7, np.int16), t0 - 10**9))  # sensor restarted with another clock
    assert len(win) == 4 and win.latest() is None


# --------------------------------------------------------------------------- properties
@given(
    chunks=st.lists(st.integers(1, 90), min_size=1, max_size=60),
    window=st.integers(1, 40),
    extra=st.integers(0, 40),
    channels=st.integers(1, 3),
)
def test_window_is_the_tail_of_what_was_pushed_and_memory_is_bounded(
    chunks: list[int], window: int, extra: int, channels: int
) -> None:
    win = StreamWindow(kind="audio", window=window, channels=channels, rate_hz=RATE, capacity=window + extra)
    storage = (win._data.nbytes, win._stamps.nbytes)
    pushed = []
    t = 0
    for size in chunks:
        x = np.arange(t, t + size * channels, dtype=np.int64).reshape(size, channels) % 32768
        pushed.append(x)
        win.push(_audio(x.astype(np.int16), round(t / channels * NS_PER_SAMPLE)))
        t += size * channels
        total = np.concatenate(pushed)
        assert len(win) == min(len(total), win.capacity)
        out = win.latest()
        if len(total) < window:
            assert out is None
        else:
            assert out.shape == (window, channels) and out.dtype == np.float32
            np.testing.assert_array_equal(out * 32768, total[-window:])
    assert (win._data.nbytes, win._stamps.nbytes) == storage


@given(
    batches=st.lists(st.integers(1, 30), min_size=1, max_size=30),
    end_offset=st.integers(-500, 500),
)
def test_imu_window_cut_at_any_time_ends_at_or_before_it(batches: list[int], end_offset: int) -> None:
    win = StreamWindow(kind="imu", window=10, channels=6, rate_hz=100)
    k = 0
    for n in batches:
        idx = np.arange(k, k + n)
        values = np.zeros((n, 10))
        values[:, 7] = idx  # acc x carries the sample index
        win.push(Imu(stamps_ns=idx.astype(np.int64) * 10, values=values))
        k += n
    end_ns = k * 10 // 2 + end_offset
    out = win.latest(end_ns)
    visible = [i for i in range(max(0, k - win.capacity), k) if i * 10 <= end_ns]
    if len(visible) < 10:
        assert out is None
    else:
        np.testing.assert_array_equal(out[:, 0], visible[-10:])
