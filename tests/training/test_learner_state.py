"""A learner's saved state: no pickle on load, one commit for state + buffer, every byte checked,
RNG states restored, and SIGKILL at each named fault point of a save (real processes)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sensors.durable import BUFFER_POINTS, FAULT_ENV, LEARNER_POINTS, SEAL_KEY, seal
from tests.conftest import LEARNER_DIMS as DIMS
from tests.conftest import assert_each_byte_flip_refused, small_learner_config
from tests.conftest import learner_samples as _samples
from training import learner_state
from training.buffer import MANIFEST as BUFFER_MANIFEST
from training.buffer import ReplayBuffer
from training.errors import BufferCorruptError, LearnerStateError
from training.learner import Learner

REPO = Path(__file__).resolve().parents[2]
_config = functools.partial(small_learner_config, epochs=2)


PROBE = _samples([0, 1, 2, 3], 24, 99)


def _probs(learner: Learner) -> np.ndarray:
    return learner.predict(PROBE.taps).probs


@pytest.fixture(scope="module")
def one_task() -> Learner:
    learner = Learner(DIMS, _config())
    learner.learn_task(_samples([0, 1], 96, 1))
    return learner


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory, one_task) -> tuple[Path, dict, dict]:
    """A directory with gen-000001 (task A) and gen-000002 (tasks A, B), and what each holds."""
    d = tmp_path_factory.mktemp("pair")
    one_task.save(d)
    a = {"probs": _probs(one_task), "names": list(one_task.class_names), "buffer": len(one_task.buffer)}
    two = Learner.load(d)
    two.learn_task(_samples([2, 3], 96, 2))
    two.save(d)
    b = {"probs": _probs(two), "names": list(two.class_names), "buffer": len(two.buffer)}
    assert learner_state.generations(d) == ["gen-000002", "gen-000001"]
    assert a["names"] != b["names"] and a["buffer"] != b["buffer"]
    return d, a, b


def _assert_holds(learner: Learner, expect: dict) -> None:
    assert learner.class_names == expect["names"]
    assert len(learner.buffer) == expect["buffer"]
    assert set(np.unique(learner.buffer.labels).tolist()) <= set(range(len(expect["names"])))
    np.testing.assert_allclose(_probs(learner), expect["probs"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- item 1: no pickle on load
def test_round_trip_gives_identical_predictions_buffer_and_counters(one_task, tmp_path) -> None:
    one_task.save(tmp_path)
    back = Learner.load(tmp_path)
    np.testing.assert_allclose(_probs(back), _probs(one_task), rtol=1e-5, atol=1e-6)
    assert back.class_names == one_task.class_names and back.strategy.tasks_learned == 1
    a, b = one_task.buffer.all(), back.buffer.all()
    assert np.array_equal(a.labels, b.labels) and back.buffer.seen == one_task.buffer.seen
    assert all(np.array_equal(x, y) for m in DIMS for x, y in zip(a.taps[m], b.taps[m], strict=True))
    for n, f in one_task.strategy.ewc.fisher.items():
        assert torch.equal(f, back.strategy.ewc.fisher[n])
    assert back.load_report is not None and back.load_report.generation == "gen-000001"
    assert not back.load_report.fell_back
    files = sorted(p.name for p in (tmp_path / "gen-000001").iterdir())
    assert files == ["buffer.json", "buffer.pt", "learner.json", "learner.pt", "manifest.json"]
    assert not list(tmp_path.glob("state.pt")) and not list(tmp_path.glob(".tmp-*"))


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that a load executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _forge_generation(d: Path, name: str, pt_bytes: bytes, like: Path) -> None:
    """A generation whose manifest is perfectly sealed and checksummed but whose learner.pt is ``pt_bytes``:
    the checksum cannot stop it, only the loader itself can."""
    import hashlib
    import shutil

    shutil.copytree(like, d / name)
    (d / name / "learner.pt").write_bytes(pt_bytes)
    m = json.loads((d / name / "manifest.json").read_text())
    m["files"]["learner.pt"] = {"sha256": hashlib.sha256(pt_bytes).hexdigest(), "bytes": len(pt_bytes)}
    m["seq"] = int(name.split("-")[1])
    (d / name / "manifest.json").write_bytes(seal(m))


def test_malicious_pickle_is_refused_and_never_runs(one_task, tmp_path) -> None:
    import io

    d = tmp_path / "learner"
    one_task.save(d)
    marker = tmp_path / "pwned"
    bio = io.BytesIO()
    torch.save({"t0": _Payload(marker)}, bio)  # a torch file whose pickle calls os.mkdir
    _forge_generation(d, "gen-000002", bio.getvalue(), d / "gen-000001")
    back = Learner.load(d)  # the forged newest generation is refused, the previous one loads
    assert not marker.exists()
    assert back.load_report.generation == "gen-000001" and back.load_report.skipped[0][0] == "gen-000002"
    assert "does not decode" in back.load_report.skipped[0][1] and "weights_only" in back.load_report.skipped[0][1]
    np.testing.assert_allclose(_probs(back), _probs(one_task), rtol=1e-5, atol=1e-6)
    assert learner_state.generations(d) == ["gen-000001"]  # the forged one was moved aside, kept for a look
    assert [p.name.startswith("gen-000002-") for p in (d / "corrupt").iterdir()] == [True]
    # a directory holding only a forged generation: a clear error, still nothing run
    only = tmp_path / "only"
    only.mkdir()
    _forge_generation(only, "gen-000001", bio.getvalue(), d / "gen-000001")
    with pytest.raises(LearnerStateError, match="no usable learner state.*gen-000001"):
        Learner.load(only)
    assert not marker.exists()


def test_old_pickle_format_gives_a_clear_error_and_never_runs(one_task, tmp_path) -> None:
    marker = tmp_path / "pwned"
    state = one_task.state_dict()
    state["strategy"] = {"evil": _Payload(marker)}
    torch.save(state, tmp_path / "state.pt")  # the old layout: state.pt (a full pickle) + buffer/
    one_task.buffer.save(tmp_path / "buffer")
    with pytest.raises(LearnerStateError, match="old format.*pickle"):
        Learner.load(tmp_path)
    assert not marker.exists()
    with pytest.raises(LearnerStateError, match="cannot be converted safely"):
        learner_state.convert_old_format(tmp_path, tmp_path / "new")
    assert not marker.exists()


def test_genuine_old_format_converts_with_the_restricted_unpickler(one_task, tmp_path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    state = one_task.state_dict()
    del state["rng"]  # the old state had no RNG states
    torch.save(state, old / "state.pt")
    one_task.buffer.save(old / "buffer")
    back = Learner.load(learner_state.convert_old_format(old, tmp_path / "new"))
    np.testing.assert_allclose(_probs(back), _probs(one_task), rtol=1e-5, atol=1e-6)
    assert len(back.buffer) == len(one_task.buffer)


def test_state_that_would_need_pickle_is_refused_before_touching_the_disk(tmp_path) -> None:
    with pytest.raises(ValueError, match="object array"):
        learner_state.save_generation(tmp_path, {"learner": {"x": np.array([object()], dtype=object)}})
    with pytest.raises(ValueError, match="non-str keys"):
        learner_state.save_generation(tmp_path, {"learner": {"x": {1: 2}}})
    with pytest.raises(ValueError, match="expected tensors"):
        learner_state.save_generation(tmp_path, {"learner": {"x": {1, 2}}})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- item 2: coverage, one commit, RNG
def _flip(path: Path, at: int) -> bytes:
    data = path.read_bytes()
    b = bytearray(data)
    b[at] ^= 0x01
    path.write_bytes(bytes(b))
    return data


def test_a_flipped_byte_in_any_file_falls_back_to_the_previous_generation(saved_pair, tmp_path) -> None:
    import shutil

    d, a, b = saved_pair
    files = sorted(p.name for p in (d / "gen-000002").iterdir())
    assert files == ["buffer.json", "buffer.pt", "learner.json", "learner.pt", "manifest.json"]
    n = 0
    for fname in files:
        size = (d / "gen-000002" / fname).stat().st_size
        for at in sorted({0, size // 3, size // 2, size - 1}):
            n += 1
            copy = tmp_path / f"c{n}"
            shutil.copytree(d, copy)
            _flip(copy / "gen-000002" / fname, at)
            back = Learner.load(copy)
            assert back.load_report.generation == "gen-000001", (fname, at)
            assert back.load_report.skipped[0][0] == "gen-000002" and fname in back.load_report.skipped[0][1]
            _assert_holds(back, a)
    # the corrupt one went to corrupt/: the next save keeps the good previous generation, not it
    back.save(copy)
    assert learner_state.generations(copy) == ["gen-000003", "gen-000001"]  # numbers never repeat
    _assert_holds(Learner.load(copy), a)
    _assert_holds(Learner.load(d), b)  # the original pair is untouched


def test_every_byte_of_a_learner_manifest_is_covered(saved_pair) -> None:
    """Exhaustive: whichever byte of the manifest flips, the generation is refused (no altered count,
    name or digest is ever believed)."""
    d, _, _ = saved_pair
    path = d / "gen-000002" / "manifest.json"
    assert SEAL_KEY in json.loads(path.read_bytes())
    assert_each_byte_flip_refused(path, lambda: learner_state.read_generation(path.parent), ValueError)


def test_rng_states_restored_so_training_continues_identically(tmp_path) -> None:
    import copy

    learner = Learner(DIMS, _config())
    learner.learn_task(_samples([0, 1], 96, 1))
    learner.save(tmp_path)
    at_save = torch.get_rng_state()
    rng_next = copy.deepcopy(learner.strategy.rng).random(4)
    buf_next = copy.deepcopy(learner.buffer._rng).random(4)
    back = Learner.load(tmp_path)
    assert torch.equal(torch.get_rng_state(), at_save)  # torch's generator as saved (modality dropout)
    np.testing.assert_array_equal(back.strategy.rng.random(4), rng_next)  # replay + Fisher samples
    np.testing.assert_array_equal(back.buffer._rng.random(4), buf_next)  # reservoir evictions
    back = Learner.load(tmp_path)  # fresh copies of the generators (the draws above advanced them)
    task_b = _samples([2, 3], 96, 2)
    back.learn_task(task_b)
    torch.set_rng_state(at_save)  # the process as it was when the saved learner went on
    learner.learn_task(task_b)  # the same learner, going on without a save/load
    np.testing.assert_allclose(_probs(back), _probs(learner), rtol=1e-5, atol=1e-6)
    a, b = back.buffer.all(), learner.buffer.all()
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.tasks, b.tasks)
    assert all(np.array_equal(x, y) for m in DIMS for x, y in zip(a.taps[m], b.taps[m], strict=True))


def test_every_byte_of_a_buffer_manifest_is_covered(tmp_path) -> None:
    buf = ReplayBuffer(max_samples=300)
    rng = np.random.default_rng(0)
    for i in range(40):
        buf.add({"image": [rng.normal(size=8)], "audio": [rng.normal(size=4)]}, np.array([1, 1]), i % 3, 0, i)
    buf.save(tmp_path)
    path = tmp_path / BUFFER_MANIFEST
    assert_each_byte_flip_refused(path, lambda: ReplayBuffer.load(tmp_path), BufferCorruptError)
    back = ReplayBuffer.load(tmp_path)
    assert np.array_equal(back.all().stamps, buf.all().stamps)
    np.testing.assert_array_equal(back._rng.random(3), buf._rng.random(3))  # the reservoir's generator too


def test_unsealed_format_1_buffer_manifest_is_still_read(tmp_path) -> None:
    buf = ReplayBuffer(max_samples=50)
    buf.add({"image": [np.ones(8)]}, np.array([1]), 0, 0, 7)
    buf.save(tmp_path)
    m = json.loads((tmp_path / BUFFER_MANIFEST).read_text())
    del m[SEAL_KEY], m["rng"]
    m["format"] = 1
    (tmp_path / BUFFER_MANIFEST).write_text(json.dumps(m))
    assert ReplayBuffer.load(tmp_path).all().stamps.tolist() == [7]
    m["format"] = 2  # a format-2 manifest must be sealed
    (tmp_path / BUFFER_MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BufferCorruptError, match="format"):
        ReplayBuffer.load(tmp_path)


# --------------------------------------------------------------------------- item 3: SIGKILL at each fault point
_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from tests.training.test_learner_state import DIMS, PROBE, _config, _samples
    from training.buffer import ReplayBuffer
    from training.learner import Learner

    out, what = Path(sys.argv[1]), sys.argv[2]
    if what == "learner":
        learner = Learner(DIMS, _config())
        for i, classes in enumerate(([0, 1], [2, 3])):
            learner.learn_task(_samples(classes, 96, i + 1))
            np.save(out / f"probs{i}.npy", learner.predict(PROBE.taps).probs)
            (out / f"meta{i}.json").write_text(json.dumps({"names": learner.class_names,
                                                           "buffer": len(learner.buffer)}))
            learner.save(out / "state")  # the second save is the one killed (FAULT_ENV names hit 2)
    else:
        buf = ReplayBuffer(max_samples=1000)
        rng = np.random.default_rng(0)
        for i in range(2):
            for j in range(300):
                buf.add({"image": [rng.normal(size=8)]}, np.array([1]), j % 3, i, i * 1000 + j)
            np.save(out / f"stamps{i}.npy", buf.all().stamps)
            buf.save(out / "state")
    print("SURVIVED")
""")


def _run_child(out: Path, what: str, point: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if point is not None:
        env[FAULT_ENV] = f"{point}:2"
    return subprocess.run([sys.executable, "-c", _CHILD, str(out), what], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize("point", LEARNER_POINTS)
def test_sigkill_at_each_learner_save_point_leaves_a_consistent_pair(tmp_path, point) -> None:
    got = _run_child(tmp_path, "learner", point)
    assert got.returncode == -9 and f"fault point {point} reached" in got.stderr, got.stderr[-2000:]
    assert "SURVIVED" not in got.stdout
    committed_new = point == "learner.after_rename"
    i = 1 if committed_new else 0
    expect = {"probs": np.load(tmp_path / f"probs{i}.npy"), **json.loads((tmp_path / f"meta{i}.json").read_text())}
    back = Learner.load(tmp_path / "state")
    _assert_holds(back, expect)  # the state and the buffer of the same save, never a new state with an old buffer
    assert back.load_report.skipped == []  # the cut save left nothing that even looks like a generation
    # the next save goes on from there and cleans what the cut one left behind
    back.save(tmp_path / "state")
    assert not list((tmp_path / "state").glob(".tmp-*"))
    _assert_holds(Learner.load(tmp_path / "state"), expect)


@pytest.mark.parametrize("point", BUFFER_POINTS)
def test_sigkill_at_each_buffer_save_point_leaves_the_old_or_new_buffer(tmp_path, point) -> None:
    got = _run_child(tmp_path, "buffer", point)
    assert got.returncode == -9 and f"fault point {point} reached" in got.stderr, got.stderr[-2000:]
    i = 1 if point == "buffer.manifest_replaced" else 0
    back = ReplayBuffer.load(tmp_path / "state")
    assert back.load_report.skipped == []
    np.testing.assert_array_equal(back.all().stamps, np.load(tmp_path / f"stamps{i}.npy"))
    back.save(tmp_path / "state")  # leftovers of the cut save are removed by the next one
    gens = {p.name.split("-")[1] for p in (tmp_path / "state").glob("seg-*.npz")}
    assert len(gens) == 1


def test_fault_hook_is_a_no_op_when_unset_and_reports_unknown_names(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    code = ("from sensors.durable import fault_point, FAULT_POINTS\n"
            "for p in FAULT_POINTS: fault_point(p)\nprint('SURVIVED')")
    plain = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert plain.returncode == 0 and "SURVIVED" in plain.stdout
    typo = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, FAULT_ENV: "learner.befor_rename"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert typo.returncode == 0 and "SURVIVED" in typo.stdout and "names no fault point" in typo.stderr
    armed = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, FAULT_ENV: "buffer.segments_written"},
                           capture_output=True, text=True, timeout=60, check=False)
    assert armed.returncode == -9 and "SURVIVED" not in armed.stdout


def test_learner_directory_is_fsynced_after_the_commit_rename(one_task, tmp_path, monkeypatch) -> None:
    calls: list[tuple[str, bool]] = []
    real = learner_state.fsync_dir

    def spy(path):
        calls.append((Path(path).name, (tmp_path / "gen-000001").is_dir()))
        real(path)

    monkeypatch.setattr(learner_state, "fsync_dir", spy)
    one_task.save(tmp_path)
    assert calls[0][0].startswith(".tmp-gen-000001") and not calls[0][1]  # the new directory's entries first
    assert calls[-1] == (tmp_path.name, True)  # then the parent, once the rename happened
