"""Property tests of the wire format: exact round trips, and decode never raises anything but
WireError on arbitrary or mutated input. Each fuzz test counts the inputs it tried and checks
its own minimum, so the result does not depend on which tests ran or in which order, and no
test writes into the repository."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from sensors.errors import WireError
from sensors.wire import (
    IMAGE_ENCODINGS,
    NO_COVARIANCE,
    SCHEMA_VERSION,
    Audio,
    Image,
    Imu,
    SequenceTracker,
    decode,
    encode,
)
from tests.sensors.streams import imu_batches

# Fewest inputs each example of a fuzz test tries (see the tests); a test checks that it tried at
# least this many per example for half the profile's max_examples (hypothesis may stop early).
MIN_PER_EXAMPLE = {"arbitrary_frames": 2, "mutated_valid": 60, "random_headers": 3, "field_swaps": 13}

u64 = st.integers(0, 2**64 - 1)
frame_ids = st.text(max_size=40)
topics = st.text(min_size=1, max_size=30).filter(lambda t: 0 < len(t.encode()) <= 256)


def _common(draw: st.DrawFn) -> dict:
    return {"seq": draw(u64), "stamp_ns": draw(u64), "session": draw(u64), "frame_id": draw(frame_ids)}


@st.composite
def raw_images(draw: st.DrawFn) -> Image:
    enc = draw(st.sampled_from(["rgb8", "bgr8", "mono8"]))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    c = IMAGE_ENCODINGS[enc]
    data = np.frombuffer(draw(st.binary(min_size=h * w * c, max_size=h * w * c)), np.uint8).reshape(h, w, c)
    return Image(data=data, encoding=enc, **_common(draw))


@st.composite
def jpeg_images(draw: st.DrawFn) -> Image:
    h, w = draw(st.integers(8, 40)), draw(st.integers(8, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert ok
    return Image(data=buf.reshape(-1), encoding="jpeg", height=h, width=w, **_common(draw))


@st.composite
def audios(draw: st.DrawFn) -> Audio:
    dtype = draw(st.sampled_from([np.dtype("<i2"), np.dtype("<f4")]))
    ch, n = draw(st.integers(1, 8)), draw(st.integers(1, 200))
    raw = draw(st.binary(min_size=n * ch * dtype.itemsize, max_size=n * ch * dtype.itemsize))
    data = np.frombuffer(raw, dtype).reshape(n, ch)  # any bit pattern, NaNs included, must survive
    return Audio(data=data, sample_rate=draw(st.integers(1, 768_000)), **_common(draw))


finite = st.floats(allow_nan=False, allow_infinity=False)
covariances = st.one_of(st.just(NO_COVARIANCE), st.tuples(*[finite] * 9))


def imus() -> st.SearchStrategy[Imu]:
    return imu_batches(
        max_n=20, stamps=st.integers(-(2**63), 2**63 - 1), values=finite, covariances=covariances, common=_common
    )


messages = st.one_of(raw_images(), jpeg_images(), audios(), imus())


def _as_bytes(frames: list) -> list[bytes]:
    return [f if isinstance(f, bytes) else np.ascontiguousarray(f).tobytes() for f in frames]


def _payload_bytes(msg: Image | Audio | Imu) -> list[bytes]:
    if isinstance(msg, Imu):
        return [np.asarray(msg.stamps_ns, "<i8").tobytes(), np.asarray(msg.values, "<f8").tobytes()]
    return [np.ascontiguousarray(msg.data).tobytes()]


def _assert_same(topic: str, msg: Image | Audio | Imu, got_topic: str, got: Image | Audio | Imu) -> None:
    assert got_topic == topic
    assert type(got) is type(msg)
    for name in ("seq", "stamp_ns", "session", "frame_id"):
        assert getattr(got, name) == getattr(msg, name), name
    if isinstance(msg, Image):
        assert (got.encoding, got.height, got.width) == (msg.encoding, msg.height, msg.width)
    elif isinstance(msg, Audio):
        assert (got.sample_rate, got.format, got.data.shape) == (msg.sample_rate, msg.format, msg.data.shape)
    else:
        for name in (
            "orientation_covariance",
            "angular_velocity_covariance",
            "linear_acceleration_covariance",
        ):
            assert getattr(got, name) == tuple(getattr(msg, name)), name
    assert _payload_bytes(got) == _payload_bytes(msg)


# --------------------------------------------------------------------------- round trips
@given(topic=topics, msg=messages)
def test_round_trip_is_exact(topic: str, msg: Image | Audio | Imu) -> None:
    got_topic, got = decode(_as_bytes(encode(topic, msg)))
    _assert_same(topic, msg, got_topic, got)


@given(msg=jpeg_images())
def test_jpeg_round_trip_still_decodes_with_cv2(msg: Image) -> None:
    _, got = decode(_as_bytes(encode("camera", msg)))
    img = cv2.imdecode(np.array(got.data), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (msg.height, msg.width, 3)


@pytest.mark.parametrize("encoding", sorted(IMAGE_ENCODINGS))
def test_every_image_encoding_round_trips(encoding: str) -> None:
    rng = np.random.default_rng(0)
    if encoding == "jpeg":
        msg = Image(
            data=cv2.imencode(".jpg", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))[1].reshape(-1),
            encoding="jpeg",
            height=12,
            width=16,
            seq=3,
        )
    else:
        c = IMAGE_ENCODINGS[encoding]
        msg = Image(data=rng.integers(0, 256, (12, 16, c), dtype=np.uint8), encoding=encoding, seq=3)
    got_topic, got = decode(_as_bytes(encode("cam", msg)))
    _assert_same("cam", msg, got_topic, got)


def test_decode_is_zero_copy_and_read_only() -> None:
    msg = Image(data=np.arange(480 * 640 * 3, dtype=np.uint64).astype(np.uint8).reshape(480, 640, 3))
    frames = [zmq.Frame(f) for f in _as_bytes(encode("camera", msg))]
    _, got = decode(frames)
    frame_addr = np.frombuffer(frames[2].buffer, np.uint8).__array_interface__["data"][0]
    assert got.data.__array_interface__["data"][0] == frame_addr
    assert not got.data.flags.writeable
    with pytest.raises(ValueError):
        got.data[0, 0, 0] = 1


def test_encode_rejects_invalid_messages_with_wire_error() -> None:
    with pytest.raises(WireError) as exc:
        encode("camera", Image(data=np.zeros((4, 4, 3), np.float32)))
    assert exc.value.reason == "dtype"
    with pytest.raises(WireError) as exc:
        encode("camera", Image(data=np.zeros((4, 4, 2), np.uint8)))
    assert exc.value.reason == "shape"
    with pytest.raises(WireError) as exc:
        encode("", Audio(data=np.zeros((4, 1), np.int16)))
    assert exc.value.reason == "topic"
    with pytest.raises(WireError) as exc:
        encode("imu", Imu(stamps_ns=np.zeros(2, np.int64), values=np.zeros((3, 10))))
    assert exc.value.reason == "shape"


def test_decode_names_the_reason() -> None:
    good = _as_bytes(encode("mic", Audio(data=np.zeros((320, 1), np.int16))))
    cases = {
        "frame_count": good[:2],
        "payload_size": [*good[:2], good[2][:-2]],
        "header_msgpack": [good[0], b"\xc1", good[2]],
        "header_type": [good[0], msgpack.packb([1, 2]), good[2]],
        "topic": [b"\xff\xfe", *good[1:]],
        "frame_type": [good[0], good[1], 12345],
    }
    for reason, frames in cases.items():
        with pytest.raises(WireError) as exc:
            decode(frames)
        assert exc.value.reason == reason, (reason, str(exc.value))
    header = msgpack.unpackb(good[1])
    for key, value, reason in [
        ("v", SCHEMA_VERSION + 1, "version"),
        ("seq", True, "field_type"),
        ("seq", -1, "field_range"),
        ("format", "mp3", "encoding"),
        ("kind", "lidar", "kind"),
    ]:
        with pytest.raises(WireError) as exc:
            decode([good[0], msgpack.packb({**header, key: value}), good[2]])
        assert exc.value.reason == reason, (key, str(exc.value))


# --------------------------------------------------------------------------- fuzzing
def _try(tried: list[int], frames: list) -> None:
    """Decode must return a message or raise WireError; anything else fails the test."""
    tried[0] += 1
    try:
        topic, msg = decode(frames)
    except WireError as exc:
        assert exc.reason and str(exc)
        return
    assert isinstance(topic, str) and msg.kind in ("image", "audio", "imu")


def _fuzz(name: str, run: Callable[[list[int]], None]) -> None:
    """Run one hypothesis fuzz test with its own input counter, then check that counter."""
    tried = [0]
    run(tried)
    want = MIN_PER_EXAMPLE[name] * (settings().max_examples // 2)
    assert tried[0] >= want, f"{name}: only {tried[0]} fuzz inputs tried, want >= {want}"


def test_arbitrary_frames_only_raise_wire_error() -> None:
    def run(tried: list[int]) -> None:
        @given(frames=st.lists(st.binary(max_size=80), max_size=6))
        def check(frames: list[bytes]) -> None:
            for k in range(len(frames) + 1):
                _try(tried, frames[:k])
                _try(tried, frames[k:])

        check()

    _fuzz("arbitrary_frames", run)


def _mutations(tried: list[int], msg: Image | Audio | Imu, flips: list) -> None:
    frames = _as_bytes(encode("camera", msg))
    header = frames[1]
    for pos in range(len(header)):  # every single-byte corruption of the header (>= 20 bytes)
        for xor in (0x01, 0x80, 0xFF):
            mutated = bytearray(header)
            mutated[pos] ^= xor
            _try(tried, [frames[0], bytes(mutated), *frames[2:]])
    for cut in {0, 1, len(header) // 2, len(header) - 1}:  # truncated header
        _try(tried, [frames[0], header[:cut], *frames[2:]])
    for i in range(2, len(frames)):  # truncated / extended payloads
        for cut in {0, 1, len(frames[i]) // 2, len(frames[i]) - 1}:
            _try(tried, [*frames[:i], frames[i][:cut], *frames[i + 1 :]])
        _try(tried, [*frames[:i], frames[i] + b"\x00", *frames[i + 1 :]])
    for i in range(len(frames)):  # dropped, duplicated and swapped frames
        _try(tried, frames[:i] + frames[i + 1 :])
        _try(tried, frames[: i + 1] + frames[i:])
        for j in range(i + 1, len(frames)):
            swapped = list(frames)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            _try(tried, swapped)
    mutated = [bytearray(f) for f in frames]  # random flips anywhere, payload included
    for idx, pos, xor in flips:
        f = mutated[idx % len(mutated)]
        if f:
            f[pos % len(f)] ^= xor
    _try(tried, [bytes(f) for f in mutated])


def test_mutated_valid_messages_only_raise_wire_error() -> None:
    def run(tried: list[int]) -> None:
        @given(
            msg=messages,
            flips=st.lists(
                st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(1, 255)), min_size=1, max_size=8
            ),
        )
        def check(msg: Image | Audio | Imu, flips: list) -> None:
            _mutations(tried, msg, flips)

        check()

    _fuzz("mutated_valid", run)


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=12),
        st.binary(max_size=12),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
        st.dictionaries(st.integers(-5, 5), children, min_size=1, max_size=2),  # non-str keys
    ),
    max_leaves=16,
)
HEADER_KEYS = [
    "v", "kind", "seq", "stamp_ns", "frame_id", "session", "height", "width", "encoding", "step",
    "sample_rate", "channels", "format", "samples", "count", "orientation_covariance",
    "angular_velocity_covariance", "linear_acceleration_covariance",
]  # fmt: skip


def test_random_msgpack_headers_only_raise_wire_error() -> None:
    def run(tried: list[int]) -> None:
        @given(header=msgpack_values, payload=st.lists(st.binary(max_size=64), max_size=3))
        def check(header: object, payload: list[bytes]) -> None:
            packed = msgpack.packb(header)
            _try(tried, [b"camera", packed, *payload])
            _try(tried, [b"camera", packed, b"\x00" * 16])
            _try(tried, [b"camera", packed[:-1] + b"\xc1", *payload])

        check()

    _fuzz("random_headers", run)


EXTREMES = (True, False, 2**64 - 1, -(2**63), 0, 1, 16384, 16385, 1.5, None, {"a": {"b": 1}})


def test_valid_headers_with_wrong_fields_only_raise_wire_error() -> None:
    def run(tried: list[int]) -> None:
        @given(
            msg=messages,
            changes=st.dictionaries(st.sampled_from(HEADER_KEYS), msgpack_values, min_size=1, max_size=4),
            removed=st.lists(st.sampled_from(HEADER_KEYS), max_size=2),
        )
        def check(msg: Image | Audio | Imu, changes: dict, removed: list[str]) -> None:
            frames = _as_bytes(encode("camera", msg))
            header = msgpack.unpackb(frames[1])
            for key, value in changes.items():  # one field at a time, then all together
                _try(tried, [frames[0], msgpack.packb({**header, key: value}), *frames[2:]])
            for extreme in EXTREMES:
                for key in changes:
                    _try(tried, [frames[0], msgpack.packb({**header, key: extreme}), *frames[2:]])
            broken = {k: v for k, v in {**header, **changes}.items() if k not in removed}
            _try(tried, [frames[0], msgpack.packb(broken), *frames[2:]])

        check()

    _fuzz("field_swaps", run)


# --------------------------------------------------------------------------- sequence tracking
def test_sequence_tracker_counts_gaps() -> None:
    t = SequenceTracker()
    assert t.update("cam", 7, 0) == 0
    assert t.update("cam", 7, 1) == 0
    assert t.update("cam", 7, 4) == 2
    assert t.update("cam", 7, 10) == 5
    assert t.drops == {"cam": 7} and t.restarts == {}


def test_sequence_tracker_first_message_is_not_a_gap_and_topics_are_separate() -> None:
    t = SequenceTracker()
    assert t.update("cam", 1, 100) == 0  # joined late: earlier frames were never ours to miss
    assert t.update("mic", 1, 5) == 0
    assert t.update("mic", 1, 7) == 1
    assert t.drops == {"mic": 1}


def test_sequence_tracker_new_session_is_a_restart_not_drops() -> None:
    t = SequenceTracker()
    for seq in range(1000):
        t.update("imu", 1, seq)
    assert t.update("imu", 2, 0) == 0  # restarted publisher: seq starts again from 0
    assert t.update("imu", 2, 1) == 0
    assert t.restarts == {"imu": 1} and t.drops == {}


@pytest.mark.parametrize("seq", [5, 4, 0])
def test_sequence_tracker_repeat_or_reorder_raises(seq: int) -> None:
    t = SequenceTracker()
    t.update("cam", 1, 5)
    with pytest.raises(WireError) as exc:
        t.update("cam", 1, seq)
    assert exc.value.reason == "seq_order"
    assert t.update("cam", 1, 6) == 0  # state unchanged by the rejected message


# --------------------------------------------------------------------------- publishers without a session
def _hand_built_mic(seq: int, **extra: object) -> list[bytes]:
    """A mic message as a C++/ROS 2 publisher writes it from docs/wire.md: msgpack by hand, no session."""
    header = {"v": 1, "kind": "audio", "seq": seq, "stamp_ns": 1_700_000_000_000_000_000 + seq,
              "frame_id": "mic_link", "sample_rate": 16000, "channels": 1, "format": "s16le", "samples": 4, **extra}
    return [b"mic", msgpack.packb(header), np.arange(4, dtype="<i2").tobytes()]


def test_a_header_without_session_is_accepted_as_session_0() -> None:
    topic, msg = decode(_hand_built_mic(7))
    assert topic == "mic" and isinstance(msg, Audio)
    assert (msg.seq, msg.session, msg.frame_id, msg.sample_rate) == (7, 0, "mic_link", 16000)
    assert msg.data.reshape(-1).tolist() == [0, 1, 2, 3]
    for bad, reason in ((-1, "field_range"), ("7", "field_type"), (True, "field_type")):  # present: still checked
        with pytest.raises(WireError) as exc:
            decode(_hand_built_mic(7, session=bad))
        assert exc.value.reason == reason


def test_a_seq_reset_without_session_is_a_restart_not_drops_or_an_error() -> None:
    t = SequenceTracker()
    for seq in range(100):
        assert t.update("mic", 0, seq) == 0
    assert t.update("mic", 0, 0) == 0  # the publisher restarted: seq back to 0
    assert t.update("mic", 0, 1) == 0
    assert t.update("mic", 0, 5) == 3  # gaps after the restart still count
    assert t.update("mic", 0, 2) == 0  # back again, to a small seq (its first ones were missed): a restart
    assert t.restarts == {"mic": 2} and t.drops == {"mic": 3}
    with pytest.raises(WireError) as exc:  # a repeat is not a restart
        t.update("mic", 0, 2)
    assert exc.value.reason == "seq_order"
    with pytest.raises(WireError):  # with a session, going back stays an error (a restart changes the session)
        t.update("cam", 5, 10) or t.update("cam", 5, 3)
    assert t.restarts == {"mic": 2}
