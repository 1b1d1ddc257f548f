"""ControlServer over real sockets on 127.0.0.1: replies, error codes, CurveZMQ, roles and
revocation, sessions, jobs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from runtime import keys
from runtime.commands import COMMANDS, Arg, validate_args
from runtime.config import ControlConfig
from runtime.console import ControlClient
from runtime.control import ControlServer
from runtime.errors import CommandError, ControlTimeoutError, EndpointError, KeyFileError, RemoteError
from runtime.jobs import JobHandle, JobTracker

EP = "tcp://127.0.0.1:*"


def wait_until(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    keys.create("server", d)
    keys.create("alice", d)
    return d


class Calls:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def add(self, a: int, b: int) -> dict:
        with self.lock:
            self.n += 1
        return {"sum": a + b}


def _server(cfg: ControlConfig, calls: Calls, jobs: JobTracker | None = None) -> ControlServer:
    server = ControlServer(cfg, jobs=jobs)
    server.register("add", calls.add, {"a": Arg(int, required=True, min=0, max=1000), "b": Arg(int, default=1)})

    @server.command("fail")
    def fail() -> None:
        raise RuntimeError("boom")

    @server.command("refuse")
    def refuse() -> None:
        raise CommandError("not_ready", "no model yet")

    return server


@pytest.fixture
def secure(keydir: Path) -> Iterator[tuple[ControlServer, Calls]]:
    calls = Calls()
    with _server(ControlConfig(endpoint=EP, keys_dir=keydir), calls) as server:
        yield server, calls


@pytest.fixture
def insecure() -> Iterator[tuple[ControlServer, Calls]]:
    calls = Calls()
    with _server(ControlConfig(endpoint=EP, insecure=True, max_request_bytes=4096, hard_max_bytes=65536),
                 calls, JobTracker()) as server:
        yield server, calls


def _raw(server: ControlServer, ctx: zmq.Context, payload: bytes, frames: list[bytes] | None = None,
         timeout_ms: int = 2000) -> dict | None:
    """Insecure raw DEALER: send arbitrary bytes, return the decoded reply or None."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.endpoint)
    try:
        sock.send_multipart(frames if frames is not None else [payload])
        if not sock.poll(timeout_ms):
            return None
        return msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
    finally:
        sock.close()


def test_request_reply_and_errors(secure: tuple[ControlServer, Calls], keydir: Path) -> None:
    server, calls = secure
    with ControlClient(server.endpoint, keys_dir=keydir, timeout_s=5) as client:
        assert client.request("ping")["pong"] is True
        assert client.request("add", {"a": 2, "b": 3}) == {"sum": 5}
        assert client.request("add", {"a": 2}) == {"sum": 3}
        reply = client.call("nope", {})
        assert reply["ok"] is False and reply["error"]["code"] == "unknown_command"
        assert "add" in reply["error"]["message"]
        for args, needle in [({}, "missing required argument 'a'"), ({"a": "2"}, "must be int"),
                             ({"a": True}, "must be int"), ({"a": 5000}, "<= 1000"),
                             ({"a": 1, "c": 1}, "unknown argument")]:
            with pytest.raises(RemoteError) as err:
                client.request("add", args)
            assert err.value.code == "bad_args" and needle in err.value.message
        with pytest.raises(RemoteError) as err:
            client.request("fail")
        assert err.value.code == "internal" and "boom" in err.value.message
        with pytest.raises(RemoteError) as err:
            client.request("refuse")
        assert (err.value.code, err.value.message) == ("not_ready", "no model yet")
        assert client.request("ping")["pong"]  # still alive after all of that
    assert calls.n == 2
    assert wait_until(lambda: server.stats()["replies"] == 12)  # counted just after the send
    stats = server.stats()
    assert stats["errors"] == {"unknown_command": 1, "bad_args": 5, "internal": 1, "not_ready": 1}
    assert stats["replies"] == stats["requests"] == 12
    assert [s["user"] for s in server.sessions()] == [keys.list_keys(keydir)[1].public]


def test_malformed_input_never_crashes(insecure: tuple[ControlServer, Calls]) -> None:
    server, calls = insecure
    ctx = zmq.Context()
    try:
        cases = [
            (b"\xc1", "malformed"),  # never-used msgpack byte
            (b"\x92\x01", "malformed"),  # truncated array
            (msgpack.packb([1, 2]), "not_map"),
            (msgpack.packb({"cmd": "ping"}), "bad_request"),  # no id
            (msgpack.packb({"id": 1.5, "cmd": "ping"}), "bad_request"),
            (msgpack.packb({"id": 1, "cmd": "ping", "args": [1]}), "bad_request"),
            (msgpack.packb({"id": 1, "cmd": 7}), "bad_request"),
            (msgpack.packb({1: 2}), "malformed"),  # non-str map key
            (b"\x00" * 5000, "too_large"),  # > max_request_bytes (4096)
            (msgpack.packb({"id": 1, "cmd": "add", "args": {"a": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}}),
             "too_deep"),
            (b"\x91" * 3000 + b"\xc0", "too_deep"),  # deeper than msgpack's own stack
        ]
        for payload, code in cases:
            reply = _raw(server, ctx, payload)
            assert reply is not None and reply["ok"] is False, payload[:20]
            assert reply["error"]["code"] == code, (payload[:20], reply)
        reply = _raw(server, ctx, b"", frames=[b"a", b"b", b"c"])
        assert reply["error"]["code"] == "malformed"
        # REQ-style envelope (empty delimiter) is answered with the same envelope
        reply = _raw(server, ctx, b"", frames=[b"", msgpack.packb({"id": "x", "cmd": "ping"})])
        assert reply["ok"] and reply["id"] == "x"
        # over the hard limit: libzmq drops the connection, no reply, no allocation
        assert _raw(server, ctx, b"\x00" * 100_000, timeout_ms=500) is None
        assert _raw(server, ctx, msgpack.packb({"id": 9, "cmd": "add", "args": {"a": 1}}))["result"] == {"sum": 2}
    finally:
        ctx.term()
    errors = server.stats()["errors"]
    assert errors["malformed"] == 4 and errors["not_map"] == 1 and errors["bad_request"] == 4
    assert errors["too_large"] == 1 and errors["too_deep"] == 2
    assert calls.n == 1


def test_two_clients_concurrently(insecure: tuple[ControlServer, Calls]) -> None:
    server, calls = insecure
    results: dict[int, list[int]] = {}

    def worker(k: int) -> None:
        with ControlClient(server.endpoint, insecure=True, timeout_s=5) as c:
            results[k] = [c.request("add", {"a": i, "b": 1000 * k})["sum"] for i in range(50)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {k: [i + 1000 * k for i in range(50)] for k in (1, 2)}
    assert calls.n == 100


def test_client_that_never_reads_does_not_block(insecure: tuple[ControlServer, Calls]) -> None:
    server, _ = insecure
    ctx = zmq.Context()
    hog = ctx.socket(zmq.DEALER)
    hog.linger = 0
    hog.rcvhwm = 1
    hog.connect(server.endpoint)
    try:
        for i in range(2000):
            hog.send(msgpack.packb({"id": i, "cmd": "ping"}))
        with ControlClient(server.endpoint, insecure=True, timeout_s=5) as c:
            assert wait_until(lambda: server.stats()["requests"] >= 2000, 10)
            assert c.request("add", {"a": 1}) == {"sum": 2}
    finally:
        hog.close()
        ctx.term()


def test_unknown_key_and_no_key_get_no_reply(secure: tuple[ControlServer, Calls], tmp_path: Path) -> None:
    server, calls = secure
    keydir = server.config.keys_dir
    # eve has a valid key pair and the right server key, but is not on the allow-list
    keys.create("eve", tmp_path)
    (tmp_path / "server.key").write_bytes((keydir / "server.key").read_bytes())
    with (ControlClient(server.endpoint, keys_dir=tmp_path, timeout_s=0.7) as eve,
          pytest.raises(ControlTimeoutError, match="allow-list")):
        eve.request("add", {"a": 1})
    with (ControlClient(server.endpoint, insecure=True, timeout_s=0.7) as nokey,
          pytest.raises(ControlTimeoutError)):
        nokey.request("add", {"a": 1})
    assert calls.n == 0 and server.stats()["requests"] == 0
    # adding eve's key to the allow-list lets her in without a restart
    (keydir / "operators" / "eve.key").write_bytes((tmp_path / "clients" / "eve.key").read_bytes())
    try:
        assert wait_until(lambda: _try(server.endpoint, tmp_path), 10)
    finally:
        (keydir / "operators" / "eve.key").unlink()
    assert calls.n == 1


def _try(endpoint: str, keydir: Path) -> bool:
    """A fresh connection each time: the allow-list is checked once per connection handshake."""
    with ControlClient(endpoint, keys_dir=keydir, timeout_s=0.5) as client:
        try:
            return client.request("add", {"a": 1}) == {"sum": 2}
        except ControlTimeoutError:
            return False


def test_insecure_warns(caplog: pytest.LogCaptureFixture) -> None:
    with (caplog.at_level(logging.WARNING, logger="runtime.control"),
          ControlServer(ControlConfig(endpoint=EP, insecure=True)) as server,
          ControlClient(server.endpoint, insecure=True, timeout_s=5) as c):
        assert c.request("ping")["pong"]
    assert any("INSECURE" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_missing_server_key_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no server key"):
        ControlServer(ControlConfig(endpoint=EP, keys_dir=tmp_path)).start()


def test_too_open_server_key_fails_at_start(tmp_path: Path) -> None:
    keys.create("server", tmp_path)
    (tmp_path / "server.key_secret").chmod(0o644)
    with pytest.raises(KeyFileError, match=r"server.key_secret is accessible by group or others \(mode 0644\).*chmod 600"):
        ControlServer(ControlConfig(endpoint=EP, keys_dir=tmp_path)).start()


def test_insecure_only_on_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        ControlConfig(endpoint="tcp://0.0.0.0:5570", insecure=True)
    cfg = ControlConfig(endpoint="tcp://*:*")
    cfg.insecure = True  # switched on behind the config's checks: the server refuses it before binding
    with pytest.raises(EndpointError, match="--insecure refuses the control endpoint tcp://\\*:\\*"):
        ControlServer(cfg).start()


def test_control_port_in_use_is_one_clear_error() -> None:
    with ControlServer(ControlConfig(endpoint=EP, insecure=True)) as first:
        second = ControlServer(ControlConfig(endpoint=first.endpoint, insecure=True))
        with pytest.raises(EndpointError, match=f"cannot bind the control endpoint {first.endpoint}: .*in use"):
            second.start()


def test_revoked_key_loses_its_live_session(tmp_path: Path) -> None:
    """Item: a key revoked while its console is connected must not keep control."""
    keys.create("server", tmp_path)
    keys.create("alice", tmp_path)
    keys.create("bob", tmp_path)
    calls = Calls()
    with (_server(ControlConfig(endpoint=EP, keys_dir=tmp_path), calls) as server,
          ControlClient(server.endpoint, keys_dir=tmp_path, key_name="alice", timeout_s=5) as alice,
          ControlClient(server.endpoint, keys_dir=tmp_path, key_name="bob", timeout_s=5) as bob):
        assert alice.request("add", {"a": 1}) == {"sum": 2}
        assert bob.request("ping")["pong"]
        assert sorted((s["key"], s["role"]) for s in server.sessions()) == [("alice", "operator"), ("bob", "operator")]
        assert keys.revoke("alice", tmp_path)
        # the same connection, the very next request: refused, nothing runs
        reply = alice.call("add", {"a": 1})
        assert reply["ok"] is False and reply["error"]["code"] == "revoked"
        assert "no longer on the agent's allow-list" in reply["error"]["message"]
        with pytest.raises(RemoteError, match="revoked"):
            alice.request("ping")
        assert calls.n == 1
        assert [s["key"] for s in server.sessions()] == ["bob"]
        assert bob.request("add", {"a": 2}) == {"sum": 3}  # the others keep working
        stats = server.stats()
        assert stats["errors"]["revoked"] == 2 and stats["sessions_revoked"] == 1
        # a new connection with the revoked key gets nothing at all (refused at the handshake)
        with (ControlClient(server.endpoint, keys_dir=tmp_path, key_name="alice", timeout_s=0.7) as again,
              pytest.raises(ControlTimeoutError)):
            again.request("ping")
        # a silent console whose key is revoked leaves the session table without sending anything
        assert keys.revoke("bob", tmp_path)
        assert wait_until(lambda: not server.sessions(), 5)
        assert server.stats()["sessions_revoked"] == 2 and server.stats()["errors"]["revoked"] == 2
        with pytest.raises(RemoteError, match="revoked"):
            bob.request("ping")
    assert calls.n == 2


def test_viewer_key_may_only_look(tmp_path: Path) -> None:
    """Item: a viewer key gets status, tasks and ping; anything else is "forbidden for role viewer"."""
    keys.create("server", tmp_path)
    keys.create("val", tmp_path, role="viewer")
    calls, stops = Calls(), []
    server = _server(ControlConfig(endpoint=EP, keys_dir=tmp_path), calls, JobTracker())
    server.register("status", lambda: {"model_version": 3}, COMMANDS["status"])
    server.register("tasks", lambda: {"tasks": ["a"]}, COMMANDS["tasks"])
    server.register("shutdown", lambda: stops.append(1) or {"stopping": True}, COMMANDS["shutdown"])
    server.register("rollback", lambda: stops.append(2) or {}, COMMANDS["rollback"])
    with server, ControlClient(server.endpoint, keys_dir=tmp_path, key_name="val", timeout_s=5) as viewer:
        assert viewer.request("status") == {"model_version": 3}
        assert viewer.request("tasks") == {"tasks": ["a"]}
        assert viewer.request("ping")["pong"] is True
        refused = [("shutdown", {}), ("rollback", {}), ("add", {"a": 1}), ("job", {}), ("help", {}), ("nope", {})]
        for cmd, args in refused:
            with pytest.raises(RemoteError) as err:
                viewer.request(cmd, args)
            assert err.value.code == "forbidden" and "forbidden for role viewer" in err.value.message, cmd
        assert stops == [] and calls.n == 0
        stats = server.stats()
        assert stats["errors"] == {"forbidden": len(refused)} and "shutdown" not in stats["commands"]
        assert [s["role"] for s in server.sessions()] == ["viewer"]
        # promoted to operator (its key moved to operators/): the next request may shut down
        (tmp_path / "viewers" / "val.key").rename(tmp_path / "operators" / "val.key")
        assert viewer.request("shutdown") == {"stopping": True} and stops == [1]
        assert [s["role"] for s in server.sessions()] == ["operator"]


def test_silent_console_is_dropped() -> None:
    with (ControlServer(ControlConfig(endpoint=EP, insecure=True, heartbeat_timeout_s=0.3)) as server,
          ControlClient(server.endpoint, insecure=True, timeout_s=5) as c):
        c.request("ping")
        assert len(server.sessions()) == 1
        assert wait_until(lambda: not server.sessions(), 5)
        assert server.stats()["sessions_dropped"] == 1
        c.request("ping")  # coming back opens a new session
        assert len(server.sessions()) == 1


def test_jobs_busy_progress_cancel(insecure: tuple[ControlServer, Calls]) -> None:
    server, _ = insecure
    jobs = server.jobs
    gate = threading.Event()

    def learn(h: JobHandle) -> dict:
        h.update(0.5, "training")
        while not gate.wait(0.01):
            h.check_cancelled()
        return {"acc": 0.9}

    def start(name: str, labels: list[str], source: str) -> dict:
        return {"job": jobs.start(name, learn)}

    server.register("learn-new-task", start, COMMANDS["learn-new-task"])
    server.register("cancel", lambda: {"cancelled": jobs.cancel()}, COMMANDS["cancel"])
    with ControlClient(server.endpoint, insecure=True, timeout_s=5) as c:
        args = {"name": "t", "labels": ["a", "b"], "source": "live:5"}
        job = c.request("learn-new-task", args)["job"]
        assert wait_until(lambda: c.request("job", {"id": job})["phase"] == "training")
        with pytest.raises(RemoteError) as err:
            c.request("learn-new-task", args)
        assert err.value.code == "busy" and job in err.value.message
        gate.set()
        assert wait_until(lambda: c.request("job", {"id": job})["state"] == "done")
        snap = c.request("job", {"id": job})
        assert snap["progress"] == 1.0 and snap["result"] == {"acc": 0.9}
        gate.clear()
        job2 = c.request("learn-new-task", args)["job"]
        assert c.request("cancel") == {"cancelled": True}
        assert wait_until(lambda: c.request("job")["state"] == "cancelled")
        assert c.request("job")["id"] == job2
        with pytest.raises(RemoteError, match="not_found"):
            c.request("job", {"id": "nope"})
        for bad in ({**args, "source": "usb:1"}, {**args, "labels": ["a", "a"]}, {**args, "labels": [1]}):
            with pytest.raises(RemoteError, match="bad_args"):
                c.request("learn-new-task", bad)


def test_failed_job_reports_error() -> None:
    jobs = JobTracker()

    def broken(h: JobHandle) -> None:
        raise ValueError("no samples for label 'a'")

    jid = jobs.start("t", broken)
    snap = jobs.wait(jid, 5)
    assert snap["state"] == "failed" and "no samples" in snap["error"] and jobs.active() is None


def test_validate_args_floats() -> None:
    schema = COMMANDS["teach"]
    assert validate_args("teach", schema, {"label": "a", "seconds": 2}) == {"label": "a", "seconds": 2.0}
    assert validate_args("teach", schema, {"label": "a"})["seconds"] == 5.0
    for bad in ({"label": "a", "seconds": float("nan")}, {"label": "a", "seconds": 0.0}, {"label": ""}):
        with pytest.raises(CommandError):
            validate_args("teach", schema, bad)
