"""runtime.keys: layout, roles, permissions, list/revoke, loaders used by server and console."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from runtime import keys
from runtime.errors import KeyFileError


def test_create_layout_and_permissions(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    server = keys.create("server", d)
    alice = keys.create("alice", d)
    assert server.role == "server" and alice.role == "operator"
    assert (d / "server.key").exists() and (d / "server.key_secret").exists()
    assert (d / "clients" / "alice.key_secret").exists()
    assert (d / "operators" / "alice.key").read_bytes() == (d / "clients" / "alice.key").read_bytes()
    for secret in (d / "server.key_secret", d / "clients" / "alice.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = keys.server_keys(d)
    assert len(pub) == 40 and len(sec) == 40 and pub.decode() == server.public
    assert keys.server_public_key(d) == pub
    cpub, csec = keys.client_keys(d)  # the only operator
    assert cpub.decode() == alice.public and csec
    # the allow-list is exactly what zmq.auth reads
    assert set(zmq.auth.load_certificates(d / "operators")) == {cpub}


def test_no_overwrite_without_force(tmp_path: Path) -> None:
    first = keys.create("server", tmp_path)
    with pytest.raises(KeyFileError, match="already exists"):
        keys.create("server", tmp_path)
    assert keys.create("server", tmp_path, force=True).public != first.public


def test_list_revoke_and_errors(tmp_path: Path) -> None:
    keys.create("server", tmp_path)
    keys.create("alice", tmp_path)
    keys.create("bob", tmp_path)
    listed = {k.name: k for k in keys.list_keys(tmp_path)}
    assert set(listed) == {"server", "alice", "bob"} and all(k.allowed for k in listed.values())
    assert keys.revoke("bob", tmp_path) and not keys.revoke("bob", tmp_path)
    assert not {k.name: k for k in keys.list_keys(tmp_path)}["bob"].allowed
    with pytest.raises(KeyFileError, match="2 console keys"):
        keys.client_keys(tmp_path)
    assert keys.client_keys(tmp_path, "bob")[1]
    with pytest.raises(KeyFileError, match="must be letters"):
        keys.create("../evil", tmp_path)
    with pytest.raises(KeyFileError, match="no server key"):
        keys.server_keys(tmp_path / "nowhere")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "k")
    assert keys.main(["create", "server", "--dir", d]) == 0
    assert keys.main(["create", "op1", "--dir", d]) == 0
    assert keys.main(["create", "op1", "--dir", d]) == 1
    capsys.readouterr()
    assert keys.main(["list", "--dir", d, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["role"], r["allowed"]) for r in rows] == [("server", "server", True),
                                                                     ("op1", "operator", True)]
    assert keys.main(["revoke", "op1", "--dir", d]) == 0
    assert keys.main(["revoke", "op1", "--dir", d]) == 1


def test_viewer_role_cli_list_and_true_revoke_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert keys.main(["create", "server", "--dir", d]) == 0
    assert keys.main(["create", "op", "--dir", d]) == 0
    assert keys.main(["create", "wall", "--role", "viewer", "--dir", d]) == 0
    assert (tmp_path / "viewers" / "wall.key").read_bytes() == (tmp_path / "clients" / "wall.key").read_bytes()
    assert not (tmp_path / "operators" / "wall.key").exists()
    capsys.readouterr()
    assert keys.main(["list", "--dir", d]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert {r[1]: (r[0], r[-1]) for r in rows} == {"server": ("server", "allowed"), "op": ("operator", "allowed"),
                                                   "wall": ("viewer", "allowed")}
    assert keys.main(["list", "--dir", d, "--json"]) == 0
    assert {r["name"]: r["role"] for r in json.loads(capsys.readouterr().out)} == {
        "server": "server", "op": "operator", "wall": "viewer"}
    # --force may change the role; the key is then on one allow-list only
    assert keys.main(["create", "wall", "--role", "operator", "--force", "--dir", d]) == 0
    assert (tmp_path / "operators" / "wall.key").exists() and not (tmp_path / "viewers" / "wall.key").exists()
    capsys.readouterr()
    # revoke: the message says what really happens (there is no reload-keys command)
    assert keys.main(["revoke", "wall", "--dir", d]) == 0
    out = capsys.readouterr().out
    assert "reload-keys" not in out and "next request" in out and "no restart" in out
    wall = {k.name: k for k in keys.list_keys(tmp_path)}["wall"]
    assert wall.role == "none" and not wall.allowed and wall.has_secret
    with pytest.raises(KeyFileError, match="role='admin'"):
        keys.create("eve", tmp_path, role="admin")
    with pytest.raises(SystemExit):
        keys.main(["create", "eve", "--role", "admin", "--dir", d])


_WATCH = r"""
import os, stat, sys
from pathlib import Path
from runtime import keys
d, seen, busy = Path(sys.argv[1]), set(), [False]
def watch(event, args):  # at every audit event (open, chmod, rename...): the modes of every secret file so far
    if busy[0]:
        return
    busy[0] = True
    try:
        for p in d.rglob("*key_secret*"):  # the secret files and their temp files
            try:
                seen.add(stat.S_IMODE(p.lstat().st_mode))
            except OSError:
                pass
    finally:
        busy[0] = False
os.umask(0o022)
sys.addaudithook(watch)
keys.create("server", d)
keys.create("alice", d)
keys.create("alice", d, force=True)
print(sorted(seen))
"""


def test_secret_keys_are_0600_from_their_first_byte(tmp_path: Path) -> None:
    """Created 0600, not created with the umask's 0644 and chmodded afterwards (watched at every
    audit event of a real process, under umask 022)."""
    r = subprocess.run([sys.executable, "-c", _WATCH, str(tmp_path / "k")], capture_output=True, text=True,
                       timeout=60, check=False, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == [0o600]
    for secret in (tmp_path / "k" / "server.key_secret", tmp_path / "k" / "clients" / "alice.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k" / "server.key").stat().st_mode) == 0o644
    assert not list((tmp_path / "k").rglob("*.tmp"))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_refuses_secret_keys_others_can_read(tmp_path: Path) -> None:
    keys.create("server", tmp_path)
    keys.create("alice", tmp_path)
    loaders = [(tmp_path / "server.key_secret", lambda: keys.server_keys(tmp_path)),
               (tmp_path / "clients" / "alice.key_secret", lambda: keys.client_keys(tmp_path, "alice"))]
    for path, load in loaders:
        for mode in (0o640, 0o604, 0o644, 0o660, 0o601, 0o620):
            path.chmod(mode)
            with pytest.raises(KeyFileError) as err:
                load()
            msg = str(err.value)
            assert f"{path} is accessible by group or others (mode {mode:04o})" in msg and f"chmod 600 {path}" in msg
        path.chmod(0o400)  # owner read-only is fine, as for ssh
        assert len(load()[1]) == 40
        path.chmod(0o600)
        assert len(load()[1]) == 40
    (tmp_path / "server.key_secret").write_text("garbage\n")
    (tmp_path / "server.key_secret").chmod(0o600)
    with pytest.raises(KeyFileError, match="cannot read CurveZMQ key"):
        keys.server_keys(tmp_path)
