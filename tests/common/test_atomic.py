"""common.atomic: whole-or-nothing writes, the documented modes, and no process-wide umask changes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.atomic import atomic_write, current_umask

REPO = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_never_touches_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The umask is process-wide: setting it (even briefly, to read it) races every other thread."""

    def umask(_: int) -> int:
        raise AssertionError("atomic_write called os.umask")

    monkeypatch.setattr(os, "umask", umask)
    atomic_write(tmp_path / "a.bin", b"abc")
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"def"), mode=0o600)
    assert (tmp_path / "a.bin").read_bytes() == b"abc" and (tmp_path / "b.bin").read_bytes() == b"def"
    assert _mode(tmp_path / "b.bin") == 0o600


def test_umask_stays_put_while_threads_write(tmp_path: Path) -> None:
    """A thread reads the umask (from /proc, without setting it) while others write: it never changes."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status")
    before = current_umask()
    seen: set[int] = set()
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            seen.add(current_umask())

    def write(k: int) -> None:
        for i in range(150):
            atomic_write(tmp_path / f"{k}-{i}.bin", bytes([i % 256]) * 64)

    watcher = threading.Thread(target=observe)
    watcher.start()
    writers = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    watcher.join(10)
    assert seen == {before}
    assert len(list(tmp_path.glob("*.bin"))) == 450 and not list(tmp_path.glob(".*.tmp"))


_MODES = r"""
import json, os, stat, sys
from pathlib import Path
from common.atomic import atomic_write, current_umask
d = Path(sys.argv[1])
os.umask(0o027)  # set once, before any thread: what a service unit's UMask= does
atomic_write(d / "default.bin", b"x")
atomic_write(d / "secret.bin", b"x", mode=0o600)
atomic_write(d / "public.bin", b"x", mode=0o644)
(d / "old.bin").write_bytes(b"old")
os.chmod(d / "old.bin", 0o666)
atomic_write(d / "old.bin", b"new", mode=0o600)  # replacing a file takes the new mode, not the old one
print(json.dumps({"umask": current_umask(), **{p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}}))
"""


def test_modes_as_documented(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _MODES, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       check=False, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    modes = json.loads(r.stdout)
    expected_umask = 0o027 if Path("/proc/self/status").exists() else 0o022
    assert modes == {"umask": expected_umask, "default.bin": 0o666 & ~expected_umask, "secret.bin": 0o600,
                     "public.bin": 0o644, "old.bin": 0o600}
    assert (tmp_path / "old.bin").read_bytes() == b"new"


def test_bad_mode_and_failed_write_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        atomic_write(tmp_path / "x.bin", b"x", mode=0o10000)
    (tmp_path / "keep.bin").write_bytes(b"old")

    def boom(f) -> None:
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(tmp_path / "keep.bin", boom, mode=0o600)
    assert (tmp_path / "keep.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=4096), mode=st.sampled_from([0o600, 0o640, 0o644, 0o400]))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, data: bytes, mode: int) -> None:
    path = tmp_path_factory.getbasetemp() / "rt" / "f.bin"
    atomic_write(path, data, mode=mode)
    assert path.read_bytes() == data and _mode(path) == mode
