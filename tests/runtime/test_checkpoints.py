"""CheckpointStore: atomic round trips, corruption fallback, write failures, retention."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.checkpoints import CheckpointStore
from runtime.errors import CheckpointWriteError, NoCheckpointError
from tests.conftest import assert_each_byte_flip_refused

REPO = Path(__file__).resolve().parents[2]


def _state(seed: int = 0) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _make_state(seed)


def _make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4, generator=g)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "fisher": {"w": torch.rand(3, 4, generator=g, dtype=torch.float64)},
        "buffer_x": np.random.default_rng(seed).integers(0, 255, (5, 8), dtype=np.uint8),
        "nested": {"scale": np.float32(0.5).item(), "arr": np.arange(6, dtype=np.float16).reshape(2, 3)},
        "classes": ["cat", "dog", f"seed{seed}"],
        "cursor": seed,
        "rng": np.random.default_rng(seed).bit_generator.state,  # 128-bit ints
        "torch_rng": torch.get_rng_state(),
        "nothing": None,
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert a.detach().contiguous().numpy().tobytes() == b.detach().contiguous().numpy().tobytes()
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b and type(a) is type(b)


def test_round_trip_bit_identical(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = _state(1)
    info = store.save(state, {"task": 1})
    assert info.name == "ckpt-000001" and info.latest
    res = store.load_latest()
    assert res.name == "ckpt-000001" and not res.fell_back and res.corrupt == []
    assert res.meta == {"task": 1}
    _assert_same(state, res.state)
    # a loaded state dict really restores a model
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(res.state["model"])
    assert torch.equal(model.weight, state["model"]["weight"])
    assert (tmp_path / "LATEST").read_text().strip() == "ckpt-000001"
    manifest = json.loads((tmp_path / "ckpt-000001" / "manifest.json").read_text())
    assert all(len(d) == 64 for e in manifest["entries"].values() for d in e["sha256"].values())
    assert not list(tmp_path.glob(".tmp-*"))


def _newest_pt(path: Path) -> Path:
    return sorted(path.glob("*.pt"))[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_corrupt_newest_falls_back(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1), {"v": 1})
    store.save(_state(2), {"v": 2})
    newest = tmp_path / "ckpt-000002"
    victim = _newest_pt(newest)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "manifest":
        (newest / "manifest.json").write_text("{not json")
    else:
        victim.unlink()
    res = store.load_latest()
    assert res.name == "ckpt-000001" and res.fell_back and res.meta == {"v": 1}
    _assert_same(_state(1), res.state)
    assert [c.name for c in res.corrupt] == ["ckpt-000002"]
    assert res.corrupt[0].moved_to is not None and res.corrupt[0].moved_to.parent == tmp_path / "corrupt"
    assert not newest.exists()
    assert (tmp_path / "LATEST").read_text().strip() == "ckpt-000001"
    # the next save does not reuse the corrupt one's number
    assert store.save(_state(3)).name == "ckpt-000003"


def test_all_corrupt_or_empty_raises(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state")
    with pytest.raises(NoCheckpointError):
        store.load_latest()
    store.save({"x": 1})
    (tmp_path / "state" / "ckpt-000001" / "manifest.json").write_text("")
    with pytest.raises(NoCheckpointError) as err:
        store.load_latest()
    assert [c.name for c in err.value.corrupt] == ["ckpt-000001"]


def test_rollback_and_retention(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for v in range(1, 6):
        store.save({"v": v, "t": torch.full((2,), float(v))})
    infos = store.list()
    assert [i.name for i in infos] == ["ckpt-000005", "ckpt-000004", "ckpt-000003"]
    assert infos[0].latest and not infos[1].latest
    res = store.rollback()
    assert res.name == "ckpt-000004" and res.state["v"] == 4
    assert torch.equal(res.state["t"], torch.full((2,), 4.0))
    assert store.load_latest().name == "ckpt-000004"
    assert len(list((tmp_path / "rolled-back").iterdir())) == 1
    assert store.rollback().name == "ckpt-000003"
    with pytest.raises(NoCheckpointError):
        store.rollback()  # nothing older than 3 is left (retention)
    assert store.load_latest().name == "ckpt-000003"  # a failed rollback changes nothing
    assert store.save({"v": 6}).name == "ckpt-000006"


def test_rejects_unsafe_values(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="object array"):
        store.save({"x": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="non-str key"):
        store.save({"x": {1: 2}})
    with pytest.raises(ValueError, match="expected tensors"):
        store.save({"x": {1, 2}})
    assert store.list() == []


def test_disk_full_raises_and_keeps_previous(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes fail with EFBIG, as a full disk would (works as root too)."""
    store = CheckpointStore(tmp_path)
    store.save(_state(1), {"v": 1})
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, hard))
    try:
        with pytest.raises(CheckpointWriteError):
            store.save({"big": torch.zeros(10_000)}, {"v": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert not list(tmp_path.glob(".tmp-*"))
    assert [i.name for i in store.list()] == ["ckpt-000001"]
    res = store.load_latest()
    assert res.name == "ckpt-000001" and not res.fell_back
    _assert_same(_state(1), res.state)


_READONLY_CHILD = """
import os, sys
from runtime.checkpoints import CheckpointStore
from runtime.errors import CheckpointWriteError
if os.geteuid() == 0:  # imports done: now drop to an unprivileged user
    os.setgid(65534)
    os.setuid(65534)
try:
    CheckpointStore(sys.argv[1]).save({"x": 2})
except CheckpointWriteError as exc:
    print("WRITE_ERROR", exc)
    sys.exit(0)
sys.exit(1)
"""


def test_read_only_dir_raises_and_keeps_previous(tmp_path: Path) -> None:
    root = tmp_path / "state"
    store = CheckpointStore(root)
    store.save({"x": 1})
    root.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root ignores permissions: save as an unprivileged user instead
            out = subprocess.run([sys.executable, "-c", _READONLY_CHILD, str(root)], cwd=REPO,
                                 capture_output=True, text=True, timeout=120, check=False)
            assert out.returncode == 0 and "WRITE_ERROR" in out.stdout, out.stderr
        else:
            with pytest.raises(CheckpointWriteError):
                store.save({"x": 2})
    finally:
        root.chmod(0o755)
    assert [i.name for i in store.list()] == ["ckpt-000001"]
    assert store.load_latest().state == {"x": 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8, np.bool_])
arrays = st.builds(lambda d, shape, seed: np.asarray(np.random.default_rng(seed).normal(size=shape) * 7).astype(d),
                   dtypes, st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(0, 1000))
tensors = arrays.map(lambda a: torch.from_numpy(np.array(a, copy=True)))
values = st.one_of(json_values, arrays, tensors, st.dictionaries(st.text(min_size=1, max_size=6),
                                                                 st.one_of(tensors, arrays, json_values),
                                                                 max_size=3))


@settings(max_examples=30, deadline=None)
@given(state=st.dictionaries(st.text(min_size=1, max_size=10), values, max_size=5))
def test_hypothesis_round_trip(tmp_path_factory: pytest.TempPathFactory, state: dict) -> None:
    root = tmp_path_factory.mktemp("ck")
    store = CheckpointStore(root)
    store.save(state, {"n": len(state)})
    res = store.load_latest()
    _assert_same(state, res.state)
    assert res.meta == {"n": len(state)}


# --------------------------------------------------------------------------- every byte a load reads is checked
def _buffer_state(seed: int) -> dict:
    from training.buffer import ReplayBuffer

    buf = ReplayBuffer(max_samples=64, dtype="int8", seed=seed)
    rng = np.random.default_rng(seed)
    for i in range(40 + seed):
        buf.add({"image": [rng.normal(size=8), rng.normal(size=4)], "imu": [rng.normal(size=3)]},
                np.array([True, i % 2 == 0]), i % 3, 0, i)
    return buf.state_dict()


def _agentlike(seed: int) -> dict:
    """The shape of an agent checkpoint: a torch entry first (the learner), then a buffer of arrays."""
    return {"learner": _state(seed), "buffer": _buffer_state(seed), "reservoir": _buffer_state(seed + 10)}


@pytest.fixture()
def two_checkpoints(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    store = CheckpointStore(root)
    store.save(_agentlike(1), {"version": 1, "tasks": [{"name": "a", "labels": ["x", "y"]}]})
    store.save(_agentlike(2), {"version": 2, "tasks": [{"name": "a", "labels": ["x", "y"]},
                                                       {"name": "b", "labels": ["z", "w"]}]})
    return root


def _flip_copy(root: Path, rel: str, at: int, dest: Path) -> Path:
    import shutil

    shutil.copytree(root, dest)
    path = dest / rel
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    return dest


def test_a_flipped_byte_in_any_checkpoint_file_is_refused_and_the_previous_one_loaded(two_checkpoints, tmp_path):
    """Each file of the newest checkpoint in turn, at its first, middle and last byte: the load
    never returns altered data; it falls back to ckpt-000001 with a reason naming the file, or
    (LATEST, which loads do not trust) loads the intact newest one."""
    root = two_checkpoints
    files = sorted(p.relative_to(root).as_posix() for p in (root / "ckpt-000002").iterdir()) + ["LATEST"]
    assert "ckpt-000002/manifest.json" in files and len(files) > 10
    n = 0
    for rel in files:
        size = (root / rel).stat().st_size
        for at in sorted({0, size // 2, size - 1}):
            n += 1
            store = CheckpointStore(_flip_copy(root, rel, at, tmp_path / f"c{n}"))
            res = store.load_latest()
            if rel == "LATEST":
                assert res.name == "ckpt-000002" and not res.fell_back and res.meta["version"] == 2
                _assert_same(_agentlike(2), res.state)
                continue
            assert res.name == "ckpt-000001" and res.fell_back and res.meta["version"] == 1, (rel, at)
            _assert_same(_agentlike(1), res.state)
            assert [c.name for c in res.corrupt] == ["ckpt-000002"] and Path(rel).name in res.corrupt[0].reason
            assert store.stats()["corrupt"] == 1 and store.stats()["fell_back"] == 1


def test_every_byte_of_a_checkpoint_manifest_is_covered(two_checkpoints) -> None:
    """Exhaustive: whichever byte of the manifest flips (meta, a file name, a digest, the format),
    the checkpoint is refused; before manifests were sealed, a flipped digit in the meta (the
    version, a task name) was loaded as if it were true."""
    from runtime.statefiles import StateFiles

    path = two_checkpoints / "ckpt-000002" / "manifest.json"
    assert_each_byte_flip_refused(path, lambda: StateFiles.read_dir(path.parent), ValueError)
    assert StateFiles.read_dir(path.parent).meta["version"] == 2


def test_latest_pointer_that_lags_is_not_trusted(two_checkpoints) -> None:
    """A save cut between its rename (the commit) and the LATEST update leaves LATEST on the
    previous checkpoint: the newest complete one is loaded and the pointer fixed."""
    (two_checkpoints / "LATEST").write_text("ckpt-000001\n")
    store = CheckpointStore(two_checkpoints)
    res = store.load_latest()
    assert res.name == "ckpt-000002" and res.meta["version"] == 2 and not res.fell_back
    _assert_same(_agentlike(2), res.state)
    assert (two_checkpoints / "LATEST").read_text().strip() == "ckpt-000002"
    (two_checkpoints / "LATEST").write_bytes(b"\xff\x00garbage")
    assert store.load_latest().name == "ckpt-000002"
    assert [i.name for i in store.list() if i.latest] == ["ckpt-000002"]


def test_unsealed_format_1_checkpoint_is_still_read_but_format_2_must_be_sealed(two_checkpoints) -> None:
    from sensors.durable import SEAL_KEY

    path = two_checkpoints / "ckpt-000002" / "manifest.json"
    m = json.loads(path.read_text())
    del m[SEAL_KEY]
    m["format"] = 1  # as checkpoints were written before manifests were sealed
    path.write_text(json.dumps(m))
    res = CheckpointStore(two_checkpoints).load_latest()
    assert res.name == "ckpt-000002" and res.meta["version"] == 2
    m["format"] = 2
    path.write_text(json.dumps(m))
    res = CheckpointStore(two_checkpoints).load_latest()
    assert res.name == "ckpt-000001" and "unsealed" in res.corrupt[0].reason


def test_directories_are_fsynced_after_each_rename(tmp_path: Path, monkeypatch) -> None:
    """A rename is durable only once its directory is fsynced: after the checkpoint's rename, after
    LATEST's, and on both sides of a move to corrupt/."""
    import runtime.checkpoints as ck

    calls: list[tuple[str, bool]] = []
    real = ck.fsync_dir

    def spy(path):
        p = Path(path)
        calls.append((p.name, (tmp_path / "ckpt-000001").is_dir()))
        real(path)

    monkeypatch.setattr(ck, "fsync_dir", spy)
    store = CheckpointStore(tmp_path)
    store.save({"x": 1})
    assert calls[0][0].startswith(".tmp-ckpt-000001") and not calls[0][1]  # the temp dir, before the rename
    assert (tmp_path.name, True) in calls[1:]  # the root, once the checkpoint is in place
    assert calls[-1] == (tmp_path.name, True)  # ... and again after LATEST's rename
    calls.clear()
    (tmp_path / "ckpt-000001" / "manifest.json").write_text("{")
    with pytest.raises(NoCheckpointError):
        store.load_latest()
    assert [c[0] for c in calls] == [tmp_path.name, "corrupt"]
    assert store.stats()["corrupt"] == 1


# --------------------------------------------------------------------------- SIGKILL at each fault point
_FAULT_CHILD = """
import sys
from runtime.checkpoints import CheckpointStore
from tests.runtime.test_checkpoints import _agentlike
CheckpointStore(sys.argv[1]).save(_agentlike(2), {"version": 2})
print("SURVIVED")
"""


def _points():
    from sensors.durable import CHECKPOINT_POINTS

    return CHECKPOINT_POINTS


@pytest.mark.parametrize("point", _points())
def test_sigkill_at_each_checkpoint_point_leaves_the_previous_or_the_new_checkpoint(tmp_path: Path, point) -> None:
    from sensors.durable import FAULT_ENV

    root = tmp_path / "state"
    CheckpointStore(root).save(_agentlike(1), {"version": 1})
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env[FAULT_ENV] = point
    got = subprocess.run([sys.executable, "-c", _FAULT_CHILD, str(root)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert got.returncode == -signal.SIGKILL and f"fault point {point} reached" in got.stderr, got.stderr[-2000:]
    assert "SURVIVED" not in got.stdout
    committed = point in ("checkpoint.after_rename", "checkpoint.after_latest")
    store = CheckpointStore(root)
    res = store.load_latest()
    assert res.corrupt == [] and not res.fell_back  # nothing half-written was ever visible as a checkpoint
    assert res.meta["version"] == (2 if committed else 1)
    _assert_same(_agentlike(2 if committed else 1), res.state)
    assert (root / "LATEST").read_text().strip() == res.name  # the pointer caught up
    # life goes on: the next save cleans the cut one's temp dir, rollback reaches a committed state
    store.save(_agentlike(3), {"version": 3})
    assert not list(root.glob(".tmp-*"))
    back = store.rollback()
    assert back.meta["version"] == (2 if committed else 1)
    _assert_same(_agentlike(2 if committed else 1), back.state)
