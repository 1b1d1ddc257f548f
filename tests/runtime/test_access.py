"""runtime.access: allow-list with roles and its reloads, loopback endpoints, recording paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from runtime import keys
from runtime.access import VIEWER_COMMANDS, AccessList, bind, forbidden, is_loopback, recording_path
from runtime.commands import parse_source
from runtime.errors import EndpointError


def _public(d: Path, name: str) -> str:
    return keys.client_keys(d, name)[0].decode()


def test_allow_list_roles_and_reload_on_change(tmp_path: Path) -> None:
    keys.create("server", tmp_path)
    keys.create("alice", tmp_path)
    keys.create("val", tmp_path, role="viewer")
    acl = AccessList(tmp_path)
    alice, val = _public(tmp_path, "alice"), _public(tmp_path, "val")
    assert acl.lookup(alice).role == "operator" and acl.lookup(alice).name == "alice"
    assert acl.lookup(val).role == "viewer"
    assert acl.lookup(None) is None and acl.lookup("x" * 40) is None
    assert acl.counts() == {"operator": 1, "viewer": 1}
    reloads = acl.reloads
    assert acl.reload_if_changed() is False and acl.reloads == reloads  # nothing changed: no re-read
    keys.revoke("alice", tmp_path)
    assert acl.check(alice) is None and acl.reloads == reloads + 1  # the next check sees the revocation
    # a key file rewritten in place (same name: the directory is unchanged) is seen by the full check
    # (each handshake and every 0.5 s), the per-request check looks at the directories only
    keys.create("bob", tmp_path)
    bob = _public(tmp_path, "bob")
    assert acl.check(bob).name == "bob"
    (tmp_path / "operators" / "bob.key").write_bytes((tmp_path / "clients" / "val.key").read_bytes())
    assert acl.reload_if_changed() is True
    assert acl.check(bob) is None and acl.check(val).role == "operator"  # in both directories: operator
    # the ZAP callback gets the Z85 key as bytes
    assert acl.callback("*", val.encode()) is True and acl.callback("*", alice.encode()) is False


def test_allow_list_survives_missing_dirs_and_bad_files(tmp_path: Path) -> None:
    acl = AccessList(tmp_path / "nowhere")
    assert acl.counts() == {"operator": 0, "viewer": 0} and acl.check("k") is None
    keys.create("alice", tmp_path)
    (tmp_path / "operators" / "junk.key").write_text("not a certificate\n")
    acl = AccessList(tmp_path)
    assert acl.counts() == {"operator": 1, "viewer": 0}
    shutil.rmtree(tmp_path / "operators")
    assert acl.check(_public(tmp_path, "alice")) is None


def test_forbidden_by_role() -> None:
    assert sorted(VIEWER_COMMANDS) == ["ping", "status", "tasks"]
    for cmd in ("status", "tasks", "ping", "shutdown", "rollback", "learn-new-task", "help", "job"):
        assert forbidden("operator", cmd) is None
    for cmd in VIEWER_COMMANDS:
        assert forbidden("viewer", cmd) is None
    for cmd in ("shutdown", "rollback", "save", "cancel", "learn-new-task", "teach", "job", "help", "evaluate"):
        msg = forbidden("viewer", cmd)
        assert msg is not None and "forbidden for role viewer" in msg and cmd in msg


@pytest.mark.parametrize("endpoint, expected", [
    ("tcp://127.0.0.1:5570", True), ("tcp://127.0.0.1:*", True), ("tcp://127.1.2.3:5570", True),
    ("tcp://localhost:5570", True), ("tcp://[::1]:5570", True), ("tcp://lo:5570", True),
    ("ipc:///tmp/continua.sock", True), ("inproc://control", True),
    ("tcp://0.0.0.0:5570", False), ("tcp://*:5570", False), ("tcp://192.168.1.20:5570", False),
    ("tcp://eth0:5570", False), ("tcp://robot.local:5570", False), ("tcp://[::]:5570", False),
    ("tcp://127.0.0.1:0;10.0.0.1:5570", False), ("pgm://eth0;239.192.1.1:5555", False), ("nonsense", False),
])
def test_is_loopback(endpoint: str, expected: bool) -> None:
    assert is_loopback(endpoint) is expected


def test_bind_in_use_is_one_clear_error() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    try:
        a.bind("tcp://127.0.0.1:*")
        ep = a.last_endpoint.decode()
        with pytest.raises(EndpointError, match="cannot bind the control endpoint .* in use"):
            bind(b, ep)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


@pytest.fixture
def recordings(tmp_path: Path) -> Path:
    root = tmp_path / "recordings"
    (root / "day1").mkdir(parents=True)
    (root / "hammer.mcap").write_bytes(b"x")
    (root / "day1" / "wrench.mcap").write_bytes(b"y")
    (tmp_path / "secret.txt").write_text("robot password")
    os.symlink(tmp_path / "secret.txt", root / "escape.mcap")  # a symlink that leaves the directory
    os.symlink(root / "hammer.mcap", root / "alias.mcap")  # one that stays inside
    os.symlink(tmp_path, root / "up")  # a directory symlink out
    return root


def test_recording_paths_stay_inside_the_recordings_dir(recordings: Path, tmp_path: Path) -> None:
    root = recordings.resolve()
    assert recording_path("hammer.mcap", recordings) == str(root / "hammer.mcap")
    assert recording_path("day1/wrench.mcap", recordings) == str(root / "day1" / "wrench.mcap")
    assert recording_path(str(root / "hammer.mcap"), recordings) == str(root / "hammer.mcap")  # absolute inside
    assert recording_path("alias.mcap", recordings) == str(root / "hammer.mcap")
    for text, needle in [("../secret.txt", "'..' is not allowed"), ("day1/../../secret.txt", "'..' is not allowed"),
                         ("/etc/passwd", "outside the recordings directory"),
                         (str(tmp_path / "secret.txt"), "outside the recordings directory"),
                         ("escape.mcap", "symlink"), ("up/secret.txt", "outside"),
                         ("missing.mcap", "no recording"), ("day1", "no recording"), ("", "non-empty"),
                         ("a\x00b", "non-empty")]:
        with pytest.raises(ValueError, match=needle):
            recording_path(text, recordings)
    with pytest.raises(ValueError, match="no recordings directory"):
        recording_path("hammer.mcap", tmp_path / "none")
    # a console (no directory) checks the form only
    assert recording_path("/any/abs.mcap", None) == "/any/abs.mcap"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        recording_path("../x.mcap", None)


def test_parse_source_mcap_resolves_every_path(recordings: Path) -> None:
    root = recordings.resolve()
    src = parse_source("mcap:hammer.mcap,day1/wrench.mcap", recordings)
    assert src == {"kind": "mcap", "path": f"{root / 'hammer.mcap'},{root / 'day1' / 'wrench.mcap'}"}
    with pytest.raises(ValueError, match="outside"):
        parse_source("mcap:hammer.mcap,/etc/passwd", recordings)
    assert parse_source("mcap:/etc/passwd")["path"] == "/etc/passwd"  # console side: form only
    assert parse_source("live:5", recordings) == {"kind": "live", "seconds": 5.0}


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "c.mcap", "/"]), min_size=1, max_size=6))
def test_recording_path_never_leaves_root(tmp_path_factory: pytest.TempPathFactory, parts: list[str]) -> None:
    root = tmp_path_factory.getbasetemp() / "rec-prop"
    (root / "a" / "b").mkdir(parents=True, exist_ok=True)
    (root / "a" / "c.mcap").write_bytes(b"z")
    text = "/".join(parts)
    try:
        out = Path(recording_path(text, root))
    except ValueError:
        return
    assert out.is_relative_to(root.resolve()) and out.is_file()
