"""runtime.keys: layout, permissions, list/revoke, loaders used by server and console."""

from __future__ import annotations

import json
import stat
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
    with pytest.raises(KeyFileError, match="2 operator keys"):
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
