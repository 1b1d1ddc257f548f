"""Taught samples: bounded in bytes, persisted crash-safely, corrupt segments skipped on load."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.taught import MANIFEST, TaughtSamples, TaughtStore

MODALITIES = ("image", "audio", "imu")
DIMS = {"image": [8, 4], "audio": [6], "imu": [5]}
PER_SAMPLE = sum(sum(d) for d in DIMS.values()) * 2 + len(MODALITIES) + 8  # float16 taps, present, stamp
T0 = 1_700_000_000_000_000_000


Capture = tuple[dict[str, list[np.ndarray]], np.ndarray, np.ndarray]


def capture(n: int, *, seed: int = 0, t0: int = T0) -> Capture:
    rng = np.random.default_rng(seed)
    taps = {m: [rng.normal(0, 3, (n, d)).astype(np.float32) for d in ds] for m, ds in DIMS.items()}
    present = rng.random((n, len(MODALITIES))) > 0.3
    return taps, present, t0 + np.arange(n, dtype=np.int64) * 33_000_000


def f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def assert_same(a: TaughtSamples, b: TaughtSamples) -> None:
    """Bit for bit: float16 -> float32 is exact, so equal float32 bytes mean equal float16 values."""
    assert a.names == b.names
    assert a.stamps.dtype == b.stamps.dtype == np.int64 and a.stamps.tobytes() == b.stamps.tobytes()
    assert a.present.tobytes() == b.present.tobytes()
    assert set(a.taps) == set(b.taps)
    for m in a.taps:
        assert len(a.taps[m]) == len(b.taps[m])
        for x, y in zip(a.taps[m], b.taps[m], strict=True):
            assert x.dtype == y.dtype == np.float32 and x.shape == y.shape and x.tobytes() == y.tobytes()


def manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


# ---------------------------------------------------------------------------- in memory
def test_add_get_remove_counts() -> None:
    store = TaughtStore(None)
    cup, box = capture(5, seed=1), capture(3, seed=2, t0=T0 + 10**10)
    assert store.add("cup", *cup) == 5
    assert store.add("box", *box) == 3
    assert store.add("cup", *capture(2, seed=3, t0=T0 + 2 * 10**10)) == 2
    assert store.counts() == {"cup": 7, "box": 3}
    assert store.nbytes == 10 * PER_SAMPLE

    got = store.get(["cup"])
    assert got.names == ["cup"] * 7
    assert got.stamps.tolist() == cup[2].tolist() + (T0 + 2 * 10**10 + np.arange(2) * 33_000_000).tolist()
    assert got.present.shape == (7, 3) and got.present[:5].tolist() == cup[1].tolist()
    for m, ds in DIMS.items():
        assert [x.shape for x in got.taps[m]] == [(7, d) for d in ds]
        for b in range(len(ds)):
            assert got.taps[m][b].dtype == np.float32
            np.testing.assert_array_equal(got.taps[m][b][:5], f16(cup[0][m][b]))
            np.testing.assert_allclose(got.taps[m][b][:5], cup[0][m][b], rtol=1e-3, atol=1e-3)

    both = store.get(["box", "cup"])  # capture order, not the order asked
    assert both.names == ["cup"] * 5 + ["box"] * 3 + ["cup"] * 2
    np.testing.assert_array_equal(both.taps["audio"][0][5:8], f16(box[0]["audio"][0]))

    assert store.remove(["cup"]) == 7
    assert store.counts() == {"box": 3}
    assert store.remove(["cup", "never"]) == 0
    stats = store.stats()
    assert stats == {"bytes": 3 * PER_SAMPLE, "max_bytes": 64 << 20, "samples": {"box": 3},
                     "dropped_samples": 0, "persist_errors": 0, "load_skipped": []}


def test_get_of_a_missing_label_names_it() -> None:
    store = TaughtStore(None)
    store.add("cup", *capture(3))
    with pytest.raises(KeyError) as exc:
        store.get(["cup", "zebra", "lion"])
    assert exc.value.args[0] == ["zebra", "lion"]
    assert "zebra" in str(exc.value)


def test_wrong_modalities_are_an_error() -> None:
    store = TaughtStore(None)
    taps, present, stamps = capture(3)
    with pytest.raises(ValueError, match="modalities"):
        store.add("cup", {"image": taps["image"], "audio": taps["audio"]}, present, stamps)
    with pytest.raises(ValueError, match="modalities"):
        store.add("cup", {**taps, "lidar": [np.zeros((3, 2))]}, present, stamps)
    with pytest.raises(ValueError):  # present of the wrong shape
        store.add("cup", taps, np.ones((3, 2), bool), stamps)
    assert store.counts() == {}
    only_imu = TaughtStore(None, modalities=("imu",))
    assert only_imu.add("x", {"imu": taps["imu"]}, present[:, :1], stamps) == 3
    with pytest.raises(ValueError, match="max_bytes"):
        TaughtStore(None, max_bytes=0)


def test_an_empty_capture_stores_nothing() -> None:
    store = TaughtStore(None)
    taps = {m: [np.zeros((0, d), np.float32) for d in ds] for m, ds in DIMS.items()}
    assert store.add("cup", taps, np.zeros((0, 3), bool), np.zeros(0, np.int64)) == 0
    assert store.counts() == {}


def test_byte_bound_drops_the_oldest_captures_whole() -> None:
    store = TaughtStore(None, max_bytes=25 * PER_SAMPLE)
    for k, lab in enumerate(["a", "b", "c"]):
        store.add(lab, *capture(10, seed=k))
    # a (10) + b (10) + c (10) = 30 > 25: a went when c came
    assert store.counts() == {"b": 10, "c": 10} and store.dropped_samples == 10
    assert store.add("d", *capture(4, seed=9)) == 4  # 24 samples fit
    assert store.counts() == {"b": 10, "c": 10, "d": 4} and store.dropped_samples == 10
    store.add("e", *capture(2))  # 26 > 25: b goes
    assert store.counts() == {"c": 10, "d": 4, "e": 2} and store.dropped_samples == 20
    assert store.nbytes <= store.max_bytes
    assert store.stats()["dropped_samples"] == 20


def test_a_capture_larger_than_max_bytes_keeps_its_newest_samples() -> None:
    store = TaughtStore(None, max_bytes=10 * PER_SAMPLE)
    store.add("old", *capture(4))
    taps, present, stamps = capture(25, seed=5)
    assert store.add("big", taps, present, stamps) == 10
    assert store.counts() == {"big": 10}
    assert store.dropped_samples == 15 + 4  # the big capture's oldest 15, then the whole old one
    got = store.get(["big"])
    assert got.stamps.tolist() == stamps[-10:].tolist()
    np.testing.assert_array_equal(got.taps["image"][1], f16(taps["image"][1][-10:]))
    assert got.present.tolist() == present[-10:].tolist()
    assert store.nbytes == 10 * PER_SAMPLE <= store.max_bytes


@settings(max_examples=60)
@given(sizes=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 30)), min_size=1, max_size=12),
       budget=st.integers(5, 60))
def test_bound_invariants(sizes: list[tuple[str, int]], budget: int) -> None:
    store = TaughtStore(None, max_bytes=budget * PER_SAMPLE)
    added = 0
    for i, (lab, n) in enumerate(sizes):
        kept = store.add(lab, *capture(n, seed=i, t0=T0 + i * 10**10))
        assert kept == min(n, budget)
        added += n
        assert store.nbytes <= store.max_bytes
        assert sum(store.counts().values()) + store.dropped_samples == added
        assert store.get([lab]).stamps[-1] == T0 + i * 10**10 + (n - 1) * 33_000_000  # newest always kept


# ---------------------------------------------------------------------------- persistence
def test_captures_survive_a_restart_bit_for_bit(tmp_path: Path) -> None:
    root = tmp_path / "taught"
    store = TaughtStore(root)
    store.add("cup", *capture(6, seed=1))
    taps, present, stamps = capture(4, seed=2, t0=T0 + 10**10)
    taps["image"][0][0, :6] = [65504.0, -0.0, 6e-8, np.inf, -np.inf, np.nan]  # float16 edge values
    store.add("box", taps, present, stamps)
    store.add("cup", *capture(3, seed=3, t0=T0 + 2 * 10**10))
    before = store.get(["cup", "box"])
    files = sorted(p.name for p in root.glob("seg-*.npz"))
    assert files == ["seg-000001.npz", "seg-000002.npz", "seg-000003.npz"]
    m = manifest(root)
    assert [(s["file"], s["label"], s["n"]) for s in m["segments"]] == [
        ("seg-000001.npz", "cup", 6), ("seg-000002.npz", "box", 4), ("seg-000003.npz", "cup", 3)]
    assert m["seq"] == 3 and all(len(s["sha256"]) == 64 for s in m["segments"])
    with np.load(root / "seg-000001.npz") as z:  # stored as float16
        assert z["image_0"].dtype == np.float16 and z["present"].dtype == bool
        assert z["stamps"].dtype == np.int64
        np.testing.assert_array_equal(z["audio_0"], capture(6, seed=1)[0]["audio"][0].astype(np.float16))

    again = TaughtStore(root)
    assert again.counts() == {"cup": 9, "box": 4} and again.load_skipped == []
    assert_same(again.get(["cup", "box"]), before)
    assert again.nbytes == store.nbytes
    # a new capture continues the numbering: nothing is overwritten
    again.add("pen", *capture(2, seed=4))
    assert (root / "seg-000004.npz").exists()
    assert [s["file"] for s in manifest(root)["segments"]][-1] == "seg-000004.npz"
    assert TaughtStore(root).counts() == {"cup": 9, "box": 4, "pen": 2}


@settings(max_examples=25)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "add", "remove"]), st.sampled_from("abc"),
                              st.integers(1, 12)), min_size=1, max_size=8),
       budget=st.integers(8, 40))
def test_a_restart_restores_exactly_what_was_kept(ops: list[tuple[str, str, int]], budget: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = TaughtStore(tmp, max_bytes=budget * PER_SAMPLE)
        for i, (op, lab, n) in enumerate(ops):
            if op == "add":
                store.add(lab, *capture(n, seed=i, t0=T0 + i * 10**10))
            else:
                store.remove([lab])
        again = TaughtStore(tmp, max_bytes=budget * PER_SAMPLE)
        assert again.counts() == store.counts() and again.load_skipped == []
        listed = [s["file"] for s in manifest(Path(tmp))["segments"]] if (Path(tmp) / MANIFEST).exists() else []
        assert sorted(p.name for p in Path(tmp).glob("seg-*.npz")) == sorted(listed)
        if store.counts():
            labels = sorted(store.counts())
            assert_same(again.get(labels), store.get(labels))


def test_removed_and_dropped_captures_leave_the_disk(tmp_path: Path) -> None:
    root = tmp_path / "taught"
    store = TaughtStore(root, max_bytes=20 * PER_SAMPLE)
    store.add("a", *capture(10, seed=1))
    store.add("b", *capture(8, seed=2))
    store.add("c", *capture(5, seed=3))  # 23 > 20: a dropped
    assert sorted(p.name for p in root.glob("seg-*.npz")) == ["seg-000002.npz", "seg-000003.npz"]
    assert store.remove(["b"]) == 8
    assert sorted(p.name for p in root.glob("seg-*.npz")) == ["seg-000003.npz"]
    assert [s["label"] for s in manifest(root)["segments"]] == ["c"]
    again = TaughtStore(root)
    assert again.counts() == {"c": 5} and again.load_skipped == []
    assert_same(again.get(["c"]), store.get(["c"]))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_corrupt_segment_is_skipped_and_the_others_load(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "taught"
    store = TaughtStore(root)
    for k, lab in enumerate(["a", "b", "c"]):
        store.add(lab, *capture(4 + k, seed=k))
    good = store.get(["a", "c"])
    path = root / "seg-000002.npz"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:])
    else:
        path.unlink()

    again = TaughtStore(root)
    assert again.counts() == {"a": 4, "c": 6}
    assert len(again.load_skipped) == 1 and again.load_skipped[0][0] == "seg-000002.npz"
    why = again.load_skipped[0][1]
    assert ("sha256 mismatch" in why) if damage != "delete" else ("No such file" in why)
    assert again.stats()["load_skipped"] == [list(again.load_skipped[0])]
    assert_same(again.get(["a", "c"]), good)
    with pytest.raises(KeyError):
        again.get(["b"])
    # the next write drops it from the manifest; the load after that removes the file
    again.add("d", *capture(2, seed=7))
    assert [s["label"] for s in manifest(root)["segments"]] == ["a", "c", "d"]
    third = TaughtStore(root)
    assert third.counts() == {"a": 4, "c": 6, "d": 2} and third.load_skipped == []
    assert not path.exists()


def test_a_segment_with_the_wrong_sample_count_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "taught"
    store = TaughtStore(root)
    store.add("a", *capture(4))
    store.add("b", *capture(3, seed=1))
    m = manifest(root)
    m["segments"][0]["n"] = 5
    (root / MANIFEST).write_text(json.dumps(m))
    again = TaughtStore(root)
    assert again.counts() == {"b": 3}
    assert again.load_skipped == [("seg-000001.npz", "holds 4 samples, manifest says 5")]


def test_an_unreadable_manifest_starts_empty(tmp_path: Path) -> None:
    root = tmp_path / "taught"
    TaughtStore(root).add("a", *capture(4))
    (root / MANIFEST).write_text("{not json")
    again = TaughtStore(root)
    assert again.counts() == {}
    assert len(again.load_skipped) == 1 and again.load_skipped[0][0] == MANIFEST
    assert again.load_skipped[0][1].startswith("unreadable")


def test_an_orphan_segment_is_removed_on_load(tmp_path: Path) -> None:
    root = tmp_path / "taught"
    store = TaughtStore(root)
    store.add("a", *capture(4))
    orphan = root / "seg-000099.npz"  # written before a crash, never listed in the manifest
    shutil.copy(root / "seg-000001.npz", orphan)
    other = root / "notes.txt"  # not ours: left alone
    other.write_text("keep me")
    again = TaughtStore(root)
    assert not orphan.exists()
    assert (root / "seg-000001.npz").exists() and other.read_text() == "keep me"
    assert again.counts() == {"a": 4} and again.load_skipped == []


def test_a_missing_directory_is_created_on_the_first_capture(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "taught"
    store = TaughtStore(root)
    assert store.counts() == {} and not root.exists()
    store.add("a", *capture(2))
    assert (root / MANIFEST).exists() and TaughtStore(root).counts() == {"a": 2}


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable: ``chattr +i`` as root (root ignores modes), else chmod 0o555."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a directory read-only")
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            pytest.skip(f"chattr +i not supported here: {r.stderr.strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(0o555)
        try:
            if os.access(path, os.W_OK):
                pytest.skip("chmod 0o555 does not make the directory read-only here")
            yield
        finally:
            path.chmod(mode)


def test_a_read_only_directory_keeps_captures_in_memory(tmp_path: Path) -> None:
    root = tmp_path / "taught"
    store = TaughtStore(root)
    store.add("a", *capture(4))
    with read_only(root):
        with pytest.raises(OSError):  # the directory really is read-only
            (root / "probe").write_bytes(b"x")
        assert store.add("b", *capture(3, seed=1)) == 3
        assert store.counts() == {"a": 4, "b": 3} and store.persist_errors == 1
        np.testing.assert_array_equal(store.get(["b"]).taps["imu"][0], f16(capture(3, seed=1)[0]["imu"][0]))
        assert store.remove(["a"]) == 4  # the manifest cannot be rewritten either
        assert store.counts() == {"b": 3} and store.persist_errors == 2
        assert store.stats()["persist_errors"] == 2
        assert sorted(p.name for p in root.iterdir()) == [MANIFEST, "seg-000001.npz"]
    # after a restart only what reached the disk is there
    again = TaughtStore(root)
    assert again.counts() == {"a": 4} and again.load_skipped == []


def test_status_reads_while_teaching_adds_see_one_consistent_store() -> None:
    """``status`` (control thread) reads the store while ``teach`` adds and drops: every snapshot's
    bytes match its sample counts, and nothing raises mid-iteration."""
    import threading
    import time

    store = TaughtStore(None, max_bytes=PER_SAMPLE * 50, modalities=MODALITIES)
    stop, errors = threading.Event(), []

    def teach() -> None:
        i = 0
        while not stop.is_set():
            store.add(f"label{i % 7}", *capture(1 + i % 9, seed=i))
            i += 1

    t = threading.Thread(target=teach)
    t.start()
    try:
        end, n = time.monotonic() + 10.0, 0
        while (n < 2000 or store.dropped_samples < 200) and time.monotonic() < end:
            n += 1
            st_ = store.stats()
            try:
                assert st_["bytes"] == PER_SAMPLE * sum(st_["samples"].values()) <= store.max_bytes
            except AssertionError as exc:
                errors.append((st_, exc))
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors[:3]
    assert store.dropped_samples > 0  # the adds really did drop while status read
