"""The fleet's Flower transport: spool and store units, the SuperNode command, and a real simulated fleet.

The fleet scenario runs Flower's simulation engine (Ray backend, loopback only, nothing mocked)
twice, once per round, so that a robot can come back online between the rounds and the second
run shows that the server's state survives a restart:

- round 1: robot A offers package pa and a package signed with another fleet's key, robot B
  offers pb and a package whose payload was changed after signing, robot C is offline (marker);
- round 2: C is back and offers pc.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.fleet.node import is_loopback, split_address, supernode_command
from runtime.fleet.spool import Spool, robot_name
from runtime.fleet.store import SkillStore
from training.skills import SkillRefused, sign, skill_id

REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def package(task: str, *, key: bytes = KEY, n: int = 16, origin: str = "test") -> bytes:
    """A signed skill package with a small npz payload (its content does not matter to the fleet)."""
    buf = io.BytesIO()
    np.savez(buf, x=np.arange(n, dtype=np.int16))
    header = {"task": task, "labels": [f"{task}-a", f"{task}-b"], "origin": origin, "fingerprints": {"image": "f"},
              "tap_dims": {"image": [8]}, "modalities": ["image"], "stored_dims": {"image": [8]}}
    return sign(header, buf.getvalue(), key)


def flip_payload_byte(data: bytes, at: int = -1) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


# ---- the simulated fleet -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from runtime.fleet.apps import simulate

    root = tmp_path_factory.mktemp("fleet")
    a, b, c = (Spool(root / name, f"robot-{name}") for name in "abc")
    pkgs = {"pa": package("pa"), "pb": package("pb"), "pc": package("pc"), "foreign": package("fx", key=OTHER_KEY)}
    pkgs["tampered"] = flip_payload_byte(package("tx"))
    a.put_outbox(pkgs["pa"])
    a.put_outbox(pkgs["foreign"])  # well-formed: only the server knows it is another fleet's
    b.put_outbox(pkgs["pb"])
    (b.outbox / f"{skill_id(pkgs['tampered'])}.skill").write_bytes(pkgs["tampered"])  # put_outbox would refuse it
    c.put_outbox(pkgs["pc"])
    c.offline_marker.touch()
    spools = [(s.root, s.robot) for s in (a, b, c)]
    store_dir = root / "store"
    first = simulate(spools, store_dir, KEY, rounds=1)
    after_first = {s.robot: {p.name: p.read_bytes() for p in s.inbox.glob("*.skill")} for s in (a, b, c)}
    c.offline_marker.unlink()
    second = simulate(spools, store_dir, KEY, rounds=1)  # a second run in this process, a restarted server
    return {"rounds": first + second, "after_first": after_first, "spools": {s.robot: s for s in (a, b, c)},
            "pkgs": pkgs, "store_dir": store_dir}


def _inbox(spool: Spool) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in spool.inbox.glob("*.skill")}


def test_fleet_runs_two_numbered_rounds_and_leaves_no_ray_behind(fleet):
    import ray

    assert [r["round"] for r in fleet["rounds"]] == [1, 2]
    assert not ray.is_initialized()
    children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, check=False,
                              text=True).stdout.splitlines()
    assert [c for c in children if "ray" in c or "flwr" in c or "gcs_server" in c] == []
    assert all(r["seconds"] > 0 for r in fleet["rounds"])


def test_package_reaches_the_other_robot_bit_identical_and_not_back(fleet):
    a, b = fleet["spools"]["robot-a"], fleet["spools"]["robot-b"]
    pa, pb = fleet["pkgs"]["pa"], fleet["pkgs"]["pb"]
    first = fleet["after_first"]
    assert first["robot-b"] == {f"{skill_id(pa)}.skill": pa}  # after round 1, exactly that file
    assert first["robot-a"] == {f"{skill_id(pb)}.skill": pb}
    r1 = fleet["rounds"][0]
    assert r1["nodes"] == ["robot-a", "robot-b"]
    assert r1["uploaded"] == 2 and sorted(r1["uploaded_ids"]) == sorted([skill_id(pa), skill_id(pb)])
    assert r1["delivered"] == {"robot-a": 1, "robot-b": 1}
    assert a.pending_uploads() == [] and b.pending_uploads() == []  # acked: not offered again
    assert a.stats()["uploaded"] == 2 and a.stats()["received"] == 2  # pb in round 1, pc in round 2


def test_tampered_and_foreign_packages_are_refused_with_reasons_and_reach_no_inbox(fleet):
    r1, r2 = fleet["rounds"]
    reasons = sorted(r1["refused"])
    assert len(reasons) == 2 and sum(r1["refused"].values()) == 2
    assert reasons[0].startswith("checksum mismatch")
    assert reasons[1].startswith("signed with another fleet's key")
    assert r2["refused"] == {}  # acked as settled: not offered (nor counted) again
    store = SkillStore(fleet["store_dir"], KEY).stats()
    assert store["refused"] == r1["refused"]
    assert store["skills"] == 3
    bad = {skill_id(fleet["pkgs"]["tampered"]), skill_id(fleet["pkgs"]["foreign"])}
    for spool in fleet["spools"].values():
        assert not {p.name[:-6] for p in spool.inbox.rglob("*.skill")} & bad
    assert not {p.name[:-6] for p in (fleet["store_dir"] / "skills").glob("*.skill")} & bad


def test_offline_robot_misses_round_one_and_catches_up_in_round_two(fleet):
    r1, r2 = fleet["rounds"]
    c = fleet["spools"]["robot-c"]
    pkgs = fleet["pkgs"]
    assert len(r1["missed"]) == 1 and "robot-c" not in r1["nodes"]
    assert "robot robot-c is offline" in r1["missed_why"][r1["missed"][0]]
    assert fleet["after_first"]["robot-c"] == {}
    assert r2["nodes"] == ["robot-a", "robot-b", "robot-c"] and r2["missed"] == []
    assert r2["uploaded"] == 1 and r2["uploaded_ids"] == [skill_id(pkgs["pc"])]
    assert r2["delivered"] == {"robot-a": 1, "robot-b": 1, "robot-c": 2}
    assert _inbox(c) == {f"{skill_id(pkgs[k])}.skill": pkgs[k] for k in ("pa", "pb")}
    assert _inbox(fleet["spools"]["robot-b"])[f"{skill_id(pkgs['pc'])}.skill"] == pkgs["pc"]
    log = [json.loads(line) for line in (fleet["store_dir"] / "rounds.jsonl").read_text().splitlines()]
    assert log == fleet["rounds"]
    assert SkillStore(fleet["store_dir"], KEY).stats()["delivered"] == {"robot-a": 2, "robot-b": 2, "robot-c": 2}


# ---- Spool ---------------------------------------------------------------------------------------
def test_spool_outbox_is_idempotent_and_acked_uploads_are_not_offered(tmp_path):
    s = Spool(tmp_path / "s", "r1")
    data = package("t")
    p1, p2 = s.put_outbox(data), s.put_outbox(data)
    assert p1 == p2 == s.outbox / f"{skill_id(data)}.skill" and p1.read_bytes() == data
    assert [p.name for p in s.outbox.iterdir()] == [p1.name]  # no temp file left
    assert s.pending_uploads() == [(skill_id(data), data)]
    s.mark_uploaded([skill_id(data)])
    assert s.pending_uploads() == [] and s.have() == {skill_id(data)}
    assert robot_name(s.root, "x") == "r1"
    with pytest.raises(SkillRefused, match="bad magic"):
        s.put_outbox(b"not a package")
    with pytest.raises(ValueError, match="robot="):
        Spool(tmp_path / "t", "two words")


@settings(max_examples=20, deadline=None)
@given(payload=st.integers(min_value=1, max_value=400))
def test_spool_delivers_once_and_settles_without_deleting(tmp_path_factory, payload):
    s = Spool(tmp_path_factory.mktemp("spool"), "r1")
    first, second = package("t1", n=payload), package("t2", n=payload + 1)
    p1 = s.deliver(first)
    assert p1 is not None and p1.read_bytes() == first
    assert s.deliver(first) is None
    p2 = s.deliver(second)
    os.utime(p1, (1, 1))  # oldest first
    assert s.next_inbox() == p1
    moved = s.settle(p1, imported=True)
    assert moved == s.imported / p1.name and moved.read_bytes() == first
    assert s.next_inbox() == p2
    refused = s.settle(p2, imported=False, reason="labels clash")
    assert refused.read_bytes() == second
    note = json.loads((s.refused / f"{skill_id(second)}.reason.json").read_text())
    assert note["reason"] == "labels clash" and note["id"] == skill_id(second)
    assert s.next_inbox() is None
    assert s.deliver(first) is None  # settled packages stay received
    assert s.stats() == {"outbox": 0, "uploaded": 0, "received": 2, "inbox_pending": 0, "imported": 1, "refused": 1}
    with pytest.raises(ValueError, match="not an inbox package"):
        s.settle(moved, imported=True)


def test_spool_state_persists_across_reopen_and_a_failed_write_changes_nothing(tmp_path, monkeypatch):
    s = Spool(tmp_path / "s", "r1")
    data, other = package("t"), package("u")
    s.put_outbox(data)
    s.mark_uploaded([skill_id(data)])
    s.deliver(other)
    again = Spool(tmp_path / "s", "r1")
    assert again.have() == {skill_id(data), skill_id(other)} and again.pending_uploads() == []
    state_before = (tmp_path / "s" / "state.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        again.deliver(package("v"))
    monkeypatch.undo()
    assert (tmp_path / "s" / "state.json").read_bytes() == state_before
    assert sorted(p.name for p in again.inbox.iterdir() if p.is_file()) == [f"{skill_id(other)}.skill"]


def test_corrupt_spool_state_is_moved_aside_and_rebuilt(tmp_path, caplog):
    s = Spool(tmp_path / "s", "r1")
    got, done = package("t"), package("u")
    s.deliver(got)
    s.settle(s.deliver(done), imported=True)
    s.put_outbox(package("w"))
    (s.root / "state.json").write_text("{ torn")
    with caplog.at_level("WARNING", logger="runtime.fleet.spool"):
        have = s.have()
    assert {skill_id(got), skill_id(done)} <= have
    assert "state.json is corrupt" in caplog.text
    aside = list(s.root.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{ torn"
    assert len(s.pending_uploads()) == 1  # the upload acks are lost: offered again (the store dedups)
    s.mark_uploaded([])
    assert json.loads((s.root / "state.json").read_text())["received"] == sorted([skill_id(got), skill_id(done)])


# ---- SkillStore --------------------------------------------------------------------------------------
def test_store_keeps_verified_packages_across_reopen_and_knows_who_lacks_what(tmp_path):
    store = SkillStore(tmp_path / "st", KEY)
    pa, pb = package("a"), package("b")
    assert store.add(pa, robot="r1", round=1) == (skill_id(pa), "")
    assert store.add(pa, robot="r1", round=2) == (skill_id(pa), "")  # a duplicate is not stored twice
    store.add(pb, robot="r2", round=2)
    assert (tmp_path / "st" / "skills" / f"{skill_id(pa)}.skill").read_bytes() == pa
    assert store.missing_for("r1", set()) == [(skill_id(pb), pb)]
    assert store.missing_for("r3", {skill_id(pa)}) == [(skill_id(pb), pb)]
    assert store.missing_for("r3", set()) == [(skill_id(pa), pa), (skill_id(pb), pb)]
    store.mark_delivered("r3", [skill_id(pa), skill_id(pa)])
    again = SkillStore(tmp_path / "st", KEY)
    assert again.stats() == {"skills": 2, "bytes": len(pa) + len(pb), "refused": {}, "delivered": {"r3": 1}}
    entry = again.entry(skill_id(pb))
    assert (entry.origin, entry.task, entry.labels, entry.round) == ("r2", "b", ["b-a", "b-b"], 2)


@settings(max_examples=25, deadline=None)
@given(at=st.integers(min_value=1, max_value=60))
def test_store_refuses_any_flipped_payload_byte(tmp_path_factory, at):
    store = SkillStore(tmp_path_factory.mktemp("st"), KEY)
    ident, reason = store.add(flip_payload_byte(package("t"), -at), robot="r1", round=1)
    assert ident is None and reason.startswith("checksum mismatch")
    assert store.stats()["skills"] == 0 and list(store.skills_dir.iterdir()) == []


def test_store_counts_refusals_by_reason(tmp_path):
    store = SkillStore(tmp_path / "st", KEY, max_bytes=5000)
    good = package("t")
    header_changed = good.replace(b'"task": "t"', b'"task": "T"')
    cases = [package("t", key=OTHER_KEY), header_changed, b"junk", package("big", n=4000), package("u", key=OTHER_KEY)]
    reasons = [store.add(d, robot="r1", round=1)[1] for d in cases]
    assert reasons[0].startswith("signed with another fleet's key") and reasons[4] == reasons[0]
    assert reasons[1].startswith("bad signature")
    assert "bad magic" in reasons[2]
    assert "exceeds the store's limit of 5000" in reasons[3]
    assert SkillStore(tmp_path / "st", KEY).stats()["refused"] == {r: (2 if r == reasons[0] else 1) for r in reasons}


def test_corrupt_store_index_is_rebuilt_from_the_packages(tmp_path, caplog):
    store = SkillStore(tmp_path / "st", KEY)
    data = package("a", origin="r9")
    store.add(data, robot="r9", round=3)
    (tmp_path / "st" / "index.json").write_text("[]")
    with caplog.at_level("WARNING", logger="runtime.fleet.store"):
        again = SkillStore(tmp_path / "st", KEY)
    assert "index.json is corrupt" in caplog.text
    assert again.stats()["skills"] == 1 and again.entry(skill_id(data)).origin == "r9"
    assert [p.read_text() for p in (tmp_path / "st").glob("index.json.corrupt-*")] == ["[]"]


# ---- the SuperNode command and the CLI -------------------------------------------------------------
def test_supernode_command_flags(tmp_path):
    cmd = supernode_command("fleet.example.org:9092", spool=tmp_path / "sp", robot="r1",
                            root_certificates=tmp_path / "ca.pem", auth_private_key=tmp_path / "node.key")
    assert Path(cmd[0]).name == "flower-supernode"
    assert cmd[1:] == ["--superlink", "fleet.example.org:9092", "--root-certificates", str(tmp_path / "ca.pem"),
                       "--auth-supernode-private-key", str(tmp_path / "node.key"),
                       "--node-config", f'spool="{tmp_path / "sp"}" robot="r1"', "--isolation", "subprocess"]
    local = supernode_command("[::1]:9092", spool=tmp_path, robot="r2", insecure=True, isolation="process")
    assert local[1:4] == ["--superlink", "[::1]:9092", "--insecure"] and local[-1] == "process"
    assert "--insecure" in supernode_command("127.0.0.1:9092", spool=tmp_path, robot="r", insecure=True)


@pytest.mark.parametrize("address", ["10.0.0.5:9092", "fleet.example.org:9092", "[2001:db8::1]:9092"])
def test_supernode_command_refuses_insecure_off_loopback(tmp_path, address):
    with pytest.raises(ValueError, match="insecure=True .* refused for the non-loopback"):
        supernode_command(address, spool=tmp_path, robot="r1", insecure=True)


def test_supernode_command_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="host:port"):
        supernode_command("fleet.example.org", spool=tmp_path, robot="r1")
    with pytest.raises(ValueError, match="node-config"):
        supernode_command("localhost:9092", spool=tmp_path, robot='r"1')
    with pytest.raises(ValueError, match="isolation"):
        supernode_command("localhost:9092", spool=tmp_path, robot="r1", isolation="thread")
    assert split_address("[::1]:80") == ("::1", 80) and is_loopback("localhost") and not is_loopback("10.1.1.1")


def test_keygen_cli_writes_a_private_key_and_refuses_to_overwrite(tmp_path):
    from training.skills import load_key

    out = tmp_path / "fleet.key"
    run = [sys.executable, "-m", "runtime.fleet", "keygen", "--out", str(out)]
    first = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    key = load_key(out)
    assert len(key) == 32 and out.stat().st_mode & 0o777 == 0o600
    again = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode != 0 and "exists" in again.stderr and load_key(out) == key
    assert subprocess.run([*run, "--force"], cwd=REPO, capture_output=True, timeout=120, check=False).returncode == 0
    assert load_key(out) != key


def _fleet_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.fleet", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_cli_refuses_unsafe_or_incomplete_configs_in_one_line(tmp_path):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('[fleet_server]\nsuperlink = "10.0.0.5:9092"\n')
    res = _fleet_cli("server", "--config", str(cfg), "--insecure")
    assert res.returncode == 2 and "--insecure is refused for the non-loopback superlink" in res.stderr
    cfg.write_text('[fleet_server]\nsuperlink = "127.0.0.1:9092"\ninsecure = true\n')
    res = _fleet_cli("server", "--config", str(cfg))
    assert res.returncode == 2 and "'insecure' is a command-line flag only" in res.stderr
    cfg.write_text(f'[fleet_server]\nsuperlink = "127.0.0.1:9092"\nkey_file = "{tmp_path / "none.key"}"\n')
    res = _fleet_cli("server", "--config", str(cfg), "--insecure")
    assert res.returncode == 2 and "cannot read the fleet key" in res.stderr.strip().splitlines()[-1]
    assert "effective config: FleetServerConfig" in res.stderr  # printed before anything starts
    cfg.write_text('[fleet_server]\nsuperlink = "fleet.example.org:9092"\n')
    res = _fleet_cli("server", "--config", str(cfg))
    assert res.returncode == 2 and "needs tls_certfile and tls_keyfile" in res.stderr


def test_deployed_fleet_on_loopback_superlink_and_two_supernodes(tmp_path):
    """The real deployment path: ``python -m runtime.fleet server`` (SuperLink + ``flwr run``) and two
    ``flower-supernode`` processes, all on loopback (about 20 s on 2 cores)."""
    from runtime.fleet.node import start_supernode
    from training.skills import load_key, new_key

    key = load_key(new_key(tmp_path / "fleet.key"))
    a, b = Spool(tmp_path / "a", "robot-a"), Spool(tmp_path / "b", "robot-b")
    pa = package("pa", key=key)
    a.put_outbox(pa)
    port = _free_port()
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'[fleet_server]\nstore_dir = "{tmp_path / "store"}"\nkey_file = "{tmp_path / "fleet.key"}"\nrounds = 1\n'
                   f'poll_s = 1.0\nmin_nodes = 2\nreply_timeout_s = 90.0\nsuperlink = "127.0.0.1:{port}"\n')
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "runtime.fleet", "server", "--config", str(cfg), "--insecure"],
                              cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    nodes = [start_supernode(f"127.0.0.1:{port}", spool=s.root, robot=s.robot, insecure=True,
                             runtime_port=_free_port(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={"FLWR_HOME": str(tmp_path / f"home-{s.robot}")})  # where it installs the app
             for s in (a, b)]
    try:
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for proc in [server, *nodes]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        log.close()
    assert _inbox(b) == {f"{skill_id(pa)}.skill": pa} and _inbox(a) == {}
    rec = json.loads((tmp_path / "store" / "rounds.jsonl").read_text())
    assert rec["nodes"] == ["robot-a", "robot-b"] and rec["delivered"] == {"robot-a": 0, "robot-b": 1}
