"""Replay buffer: class balance and both bounds under arbitrary inserts, storage precision, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.buffer import MANIFEST, SEGMENT, ReplayBuffer
from training.errors import BufferCorruptError

SCHEMA = {"image": [8, 16], "audio": [4]}


def sample(rng: np.random.Generator, label: int) -> dict[str, list[np.ndarray]]:
    return {m: [(rng.normal(size=d) + label).astype(np.float32) for d in dims] for m, dims in SCHEMA.items()}


def fill(buf: ReplayBuffer, labels: list[int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i, y in enumerate(labels):
        buf.add(sample(rng, y), np.array([True, i % 3 != 0]), y, task=y // 2, stamp_ns=i)


def check_invariants(buf: ReplayBuffer, labels: list[int]) -> None:
    assert len(buf) <= buf.max_samples
    assert buf.nbytes <= buf.max_bytes
    assert len(buf) == min(len(labels), buf.capacity)
    counts = buf.class_counts()
    seen = {c: labels.count(c) for c in set(labels)}
    assert buf.seen == seen
    for c, n in counts.items():
        assert n <= seen[c]
    # balance: a class may hold >= 2 fewer than another only if it stored everything it saw
    for a, seen_a in seen.items():
        for b, count_b in counts.items():
            if counts.get(a, 0) < count_b - 1:
                assert counts.get(a, 0) == seen_a, (a, b, counts, seen)


@settings(max_examples=60)
@given(labels=st.lists(st.integers(0, 7), max_size=300), max_samples=st.integers(1, 60),
       bytes_in_samples=st.integers(1, 80), dtype=st.sampled_from(["float16", "int8"]))
def test_balance_and_bounds_hold_for_any_insert_sequence(labels: list[int], max_samples: int,
                                                           bytes_in_samples: int, dtype: str) -> None:
    per = ReplayBuffer(dtype=dtype).sample_bytes(SCHEMA)
    buf = ReplayBuffer(max_samples=max_samples, max_bytes=bytes_in_samples * per + per // 2, dtype=dtype, seed=1)
    fill(buf, labels)
    if labels:
        assert buf.capacity == min(max_samples, bytes_in_samples)
        check_invariants(buf, labels)


def test_full_buffer_is_balanced_after_long_imbalanced_stream() -> None:
    labels = [0] * 500 + [1] * 50 + [2] * 10 + [3] * 300
    buf = ReplayBuffer(max_samples=100, dtype="float16")
    fill(buf, labels)
    assert buf.class_counts() == {0: 30, 1: 30, 2: 10, 3: 30}


def test_reservoir_within_class_keeps_early_and_late_samples() -> None:
    # one class, 1000 offers into 100 slots: the kept stamps should span the whole stream
    buf = ReplayBuffer(max_samples=100)
    rng = np.random.default_rng(0)
    for i in range(1000):
        buf.add(sample(rng, 0), np.array([True, True]), 0, task=0, stamp_ns=i)
    stamps = buf.all().stamps
    assert (stamps < 500).sum() > 25 and (stamps >= 500).sum() > 25


@pytest.mark.parametrize(("dtype", "tol"), [("float16", 2e-3), ("int8", 1.0 / 127 + 1e-6)])
def test_storage_precision(dtype: str, tol: float) -> None:
    buf = ReplayBuffer(max_samples=10, dtype=dtype)
    x = {"image": [np.linspace(-3, 3, 8, dtype=np.float32), np.full(16, 0.5, np.float32)],
         "audio": [np.array([1e-3, -2e-3, 0, 4e-3], np.float32)]}
    buf.add(x, np.array([True, False]), 7, task=3, stamp_ns=42)
    got = buf.all()
    for m in SCHEMA:
        for b, ref in enumerate(x[m]):
            # relative to the vector's max for int8 (per-vector scale), absolute-ish for float16
            err = np.abs(got.taps[m][b][0] - ref).max() / (np.abs(ref).max() if dtype == "int8" else 1.0)
            assert err <= tol
    assert got.labels.tolist() == [7] and got.tasks.tolist() == [3] and got.stamps.tolist() == [42]
    assert got.present.tolist() == [[True, False]]
    assert buf.nbytes == buf.sample_bytes() == (
        (8 + 16 + 4) * 2 + 20 + 2 if dtype == "float16" else (8 + 16 + 4) + 3 * 4 + 20 + 2)


def test_sample_is_distinct_and_bounded() -> None:
    buf = ReplayBuffer(max_samples=50)
    fill(buf, list(range(5)) * 6)
    b = buf.sample(1000, np.random.default_rng(0))
    assert len(b) == 30 and sorted(b.stamps.tolist()) == list(range(30))
    assert set(b.labels.tolist()) == set(range(5))
    assert b.taps["image"][1].shape == (30, 16) and b.taps["image"][1].dtype == np.float32


def test_schema_mismatch_rejected() -> None:
    buf = ReplayBuffer(max_samples=5)
    fill(buf, [0])
    with pytest.raises(ValueError, match="tap image\\[0\\]"):
        buf.add({"image": [np.zeros(3), np.zeros(16)], "audio": [np.zeros(4)]}, np.array([1, 1]), 0, 0)
    with pytest.raises(ValueError, match="modalities"):
        buf.add({"audio": [np.zeros(4)], "image": [np.zeros(8), np.zeros(16)]}, np.array([1, 1]), 0, 0)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_save_load_roundtrip(tmp_path: Path, dtype: str) -> None:
    buf = ReplayBuffer(max_samples=700, dtype=dtype)
    fill(buf, [i % 6 for i in range(650)])
    buf.save(tmp_path)
    back = ReplayBuffer.load(tmp_path)
    assert len(back) == 650 and back.seen == buf.seen and back.dtype == dtype
    a, b = buf.all(), back.all()
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.present, b.present)
    assert all(np.array_equal(x, y) for m in SCHEMA for x, y in zip(a.taps[m], b.taps[m], strict=True))
    assert back.load_report is not None and back.load_report.skipped == []
    # a second save replaces the generation and removes the old segment files
    fill(back, [9] * 10, seed=5)
    back.save(tmp_path)
    files = sorted(p.name for p in tmp_path.glob("seg-*.npz"))
    assert len(files) == (660 + SEGMENT - 1) // SEGMENT and all(f.startswith("seg-000001-") for f in files)
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_segment_is_skipped_and_reported(tmp_path: Path) -> None:
    buf = ReplayBuffer(max_samples=1000)
    fill(buf, [i % 4 for i in range(600)])  # 3 segments: 256 + 256 + 88
    buf.save(tmp_path)
    seg = json.loads((tmp_path / MANIFEST).read_text())["segments"]
    victim = tmp_path / seg[1]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / seg[2]["file"]).unlink()
    back = ReplayBuffer.load(tmp_path)
    assert len(back) == 256
    rep = back.load_report
    assert rep is not None and rep.segments_ok == 1 and rep.samples_lost == 256 + 88
    assert [s for s, _ in rep.skipped] == [seg[1]["file"], seg[2]["file"]]
    assert "sha256" in rep.skipped[0][1]
    assert np.array_equal(back.all().stamps, np.arange(256))


def test_crash_before_manifest_keeps_old_buffer(tmp_path: Path) -> None:
    buf = ReplayBuffer(max_samples=100)
    fill(buf, [0, 1, 2])
    buf.save(tmp_path)
    # a crash after writing new segments but before the manifest rename: stray files, old manifest
    (tmp_path / "seg-000001-00000.npz").write_bytes(b"partial")
    (tmp_path / ".manifest.json.abc.tmp").write_bytes(b"{")
    back = ReplayBuffer.load(tmp_path)
    assert len(back) == 3 and back.load_report.skipped == []


def test_missing_or_corrupt_manifest_raises(tmp_path: Path) -> None:
    with pytest.raises(BufferCorruptError, match="does not exist"):
        ReplayBuffer.load(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BufferCorruptError, match="not valid JSON"):
        ReplayBuffer.load(tmp_path)


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError, match="max_samples"):
        ReplayBuffer(max_samples=0)
    with pytest.raises(ValueError, match="dtype"):
        ReplayBuffer(dtype="float64")


@settings(max_examples=30)
@given(labels=st.lists(st.integers(0, 5), min_size=1, max_size=120), max_samples=st.integers(1, 50),
       dtype=st.sampled_from(["float16", "int8"]))
def test_add_batch_matches_add_invariants(labels: list[int], max_samples: int, dtype: str) -> None:
    rng = np.random.default_rng(0)
    n = len(labels)
    taps = {m: [rng.normal(size=(n, d)).astype(np.float32) for d in dims] for m, dims in SCHEMA.items()}
    buf = ReplayBuffer(max_samples=max_samples, dtype=dtype)
    buf.add_batch(taps, np.ones((n, 2), bool), np.asarray(labels), task=1, stamps=np.arange(n))
    check_invariants(buf, labels)
    # rows stored in free slots keep their values (within storage precision)
    got = buf.all()
    k = min(n, max_samples)
    if n <= max_samples:
        assert np.allclose(got.taps["image"][1][:k], taps["image"][1][:k], atol=0.05 * np.abs(taps["image"][1]).max())
        assert got.stamps.tolist() == list(range(n))
