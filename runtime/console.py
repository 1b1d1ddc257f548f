"""Operator console: send one command to a running agent and show the answer.

Usage::

    python -m runtime.console status
    python -m runtime.console --connect tcp://robot:5570 --keys keys/ tasks
    python -m runtime.console learn-new-task tools --labels hammer,wrench --source live:30
    python -m runtime.console teach hammer --seconds 5
    python -m runtime.console --json learn-new-task digits --labels 0,1,2 --source dataset:train
    python -m runtime.console --insecure ping        # agent started with --insecure (dev only, loopback only)

Subcommands: status, tasks, learn-new-task, teach, export-skill, import-skill, cancel, rollback,
save, shutdown, ping.

When a reply carries ``{"job": ID}`` (``learn-new-task``, and ``teach`` if the agent runs
it as a job) the console polls the agent's ``job`` command every ``poll_s`` and draws a
tqdm bar (progress, phase) on stderr until the job is done, failed or cancelled; Ctrl-C
sends ``cancel``. ``--no-wait`` returns right after the job started. With ``--json`` every
reply is printed as one JSON object per line on stdout (job polls only when they change)
and the last line is the final result.

Keys: ``--keys DIR`` (default ``keys/``) holds ``server.key`` (the agent's public key) and
``clients/NAME.key_secret`` (this console; ``--key-name`` picks one when there are
several; it must be mode 0600); see ``python -m runtime.keys``. A key the agent does not
allow gets no reply at all, which shows up here as a timeout; a key revoked while this
console is connected gets ``error revoked``, and a viewer key ``error forbidden`` for
anything but status, tasks and ping. ``--insecure`` is a flag only (refused in a TOML file)
and only for a loopback endpoint.

Exit status: 0 ok, 1 the agent answered with an error (forbidden, revoked...) or the job
failed, 2 usage or config error, 3 no reply (timeout) or unusable keys, 4 job cancelled,
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from common.config import ConfigError, format_config
from runtime.commands import parse_source
from runtime.config import ConsoleConfig, load_section
from runtime.errors import ControlTimeoutError, KeyFileError, RemoteError
from runtime.keys import client_keys, server_public_key

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_TIMEOUT, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 3, 4, 130


class ControlClient:
    """DEALER client of ``ControlServer``: one request at a time, no retries.

    A reply that does not come within ``timeout_s`` raises ``ControlTimeoutError``; a late
    reply to an earlier request is recognised by its id and discarded.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5570", *, keys_dir: str | Path | None = "keys",
                 key_name: str | None = None, insecure: bool = False, timeout_s: float = 5.0,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.insecure = insecure
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._ids = itertools.count(1)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        try:
            if not insecure:
                if keys_dir is None:
                    raise KeyFileError("keys_dir is required unless insecure=True")
                public, secret = client_keys(keys_dir, key_name)
                self._sock.curve_serverkey = server_public_key(keys_dir)
                self._sock.curve_publickey = public
                self._sock.curve_secretkey = secret
            self._sock.connect(endpoint)
        except BaseException:
            self.close()
            raise

    def call(self, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> dict:
        """Send one request; return the whole reply map (``ok`` true or false)."""
        req_id = next(self._ids)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        payload = msgpack.packb({"id": req_id, "cmd": cmd, "args": args or {}})
        # a DEALER with no usable connection (refused key, no agent) blocks on send: never wait past the deadline
        try:
            if not self._sock.poll(max(1, int(timeout * 1000)), zmq.POLLOUT):
                raise zmq.Again()
            self._sock.send(payload, zmq.NOBLOCK)  # the connection may have been refused since the poll
        except zmq.Again:
            raise ControlTimeoutError(self._timeout_message(cmd, timeout)) from None
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms, zmq.POLLIN):
                raise ControlTimeoutError(self._timeout_message(cmd, timeout))
            frames = self._sock.recv_multipart()
            try:
                reply = msgpack.unpackb(frames[-1], raw=False)
            except Exception:  # a garbled reply is skipped, like a stale one
                log.warning("undecodable reply from %s skipped", self.endpoint)
                continue
            if isinstance(reply, dict) and reply.get("id") in (req_id, None):
                return reply
            log.debug("stale reply %r skipped", reply.get("id") if isinstance(reply, dict) else reply)

    def _timeout_message(self, cmd: str, timeout: float) -> str:
        why = ("the agent requires CurveZMQ keys (drop --insecure)" if self.insecure else
               "this console's key is not on the agent's allow-list, or the agent runs --insecure")
        return (f"no reply to {cmd!r} from {self.endpoint} within {timeout:g} s: "
                f"agent not running, wrong endpoint, or {why}")

    def request(self, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> Any:
        """The ``result`` of a successful reply; ``RemoteError`` for ``ok: false``."""
        reply = self.call(cmd, args, timeout_s=timeout_s)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise RemoteError(str(err.get("code", "unknown")), str(err.get("message", reply)))
        return reply.get("result")

    def close(self) -> None:
        self._sock.close(0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.console", description="continua operator console",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="TOML file with a [console] table")
    p.add_argument("--connect", help="agent control endpoint (default tcp://127.0.0.1:5570)")
    sec = p.add_mutually_exclusive_group()
    sec.add_argument("--keys", dest="keys_dir", help="key directory (default keys/)")
    sec.add_argument("--insecure", action="store_true", default=None,
                     help="no CurveZMQ (an agent started with --insecure; loopback endpoints only)")
    p.add_argument("--key-name", help="console key name in KEYS/clients/ (operator or viewer)")
    p.add_argument("--timeout", dest="timeout_s", type=float, help="seconds to wait for each reply")
    p.add_argument("--json", action="store_true", help="one JSON object per reply on stdout")
    p.add_argument("--no-wait", action="store_true", help="do not follow a started job")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("status", "tasks", "cancel", "rollback", "save", "shutdown", "ping"):
        sub.add_parser(name)
    learn = sub.add_parser("learn-new-task", help="collect samples and learn a new task in the background")
    learn.add_argument("name")
    learn.add_argument("--labels", required=True, help="comma-separated class labels, e.g. a,b,c")
    learn.add_argument("--source", required=True,
                       help="live:SECONDS | mcap:PATH[,PATH...] | dataset:SPLIT | taught (samples from earlier teach)")
    teach = sub.add_parser("teach", help="label the live samples of the next seconds")
    teach.add_argument("label")
    teach.add_argument("--seconds", type=float, default=5.0)
    exp = sub.add_parser("export-skill", help="sign a learned task's skill package (for a peer or the fleet)")
    exp.add_argument("task")
    imp = sub.add_parser("import-skill", help="learn a peer's skill package (in the agent's skills directory)")
    imp.add_argument("path")
    return p


def _command_args(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.cmd == "learn-new-task":
        labels = [s.strip() for s in ns.labels.split(",") if s.strip()]
        if not labels:
            raise ValueError("--labels needs at least one label")
        if ns.source != "taught":
            parse_source(ns.source)  # fail here, before the agent sees it
        return {"name": ns.name, "labels": labels, "source": ns.source}
    if ns.cmd == "teach":
        return {"label": ns.label, "seconds": ns.seconds}
    if ns.cmd == "export-skill":
        return {"task": ns.task}
    if ns.cmd == "import-skill":
        return {"path": ns.path}
    return {}


def _json_line(obj: Any) -> None:
    print(json.dumps(obj, default=lambda v: v.decode(errors="replace") if isinstance(v, bytes) else str(v)),
          flush=True)


def _human(result: Any) -> str:
    if isinstance(result, dict):
        return "\n".join(f"{k}: {json.dumps(v, default=str) if isinstance(v, dict | list) else v}"
                         for k, v in result.items())
    return json.dumps(result, default=str) if isinstance(result, list) else str(result)


def _follow(client: ControlClient, job_id: str, cfg: ConsoleConfig, as_json: bool) -> tuple[dict, dict]:
    """Poll ``job`` until it ends; returns (last reply, job snapshot)."""
    from tqdm import tqdm

    bar = None if as_json else tqdm(total=100, unit="%", desc="starting", file=sys.stderr,
                                    bar_format="{desc:<24} {percentage:3.0f}%|{bar}| {elapsed}")
    last_key = None
    try:
        while True:
            reply = client.call("job", {"id": job_id})
            if not reply.get("ok"):
                return reply, {}
            job = reply["result"]
            key = (job.get("state"), job.get("phase"), round(float(job.get("progress", 0.0)), 3))
            if as_json and key != last_key:
                _json_line(reply)
            elif bar is not None:
                bar.n = round(100 * float(job.get("progress", 0.0)))
                bar.set_description_str(str(job.get("phase", ""))[:24], refresh=False)
                bar.refresh()
            last_key = key
            if job.get("state") != "running":
                return reply, job
            time.sleep(cfg.poll_s)
    finally:
        if bar is not None:
            bar.close()


def _run(client: ControlClient, ns: argparse.Namespace, cfg: ConsoleConfig) -> int:
    args = _command_args(ns)
    t0 = time.perf_counter()
    reply = client.call(ns.cmd, args)
    rtt_ms = (time.perf_counter() - t0) * 1e3
    if ns.json:
        _json_line(reply)
    if not reply.get("ok"):
        err = reply.get("error") or {}
        if not ns.json:
            print(f"error {err.get('code')}: {err.get('message')}", file=sys.stderr)
        return EXIT_ERROR
    result = reply.get("result")
    job_id = result.get("job") if isinstance(result, dict) else None
    if not isinstance(job_id, str) or ns.no_wait:
        if not ns.json:
            print(f"pong in {rtt_ms:.1f} ms" if ns.cmd == "ping" else _human(result))
        return EXIT_OK
    if not ns.json:
        print(f"job {job_id} started", file=sys.stderr)
    try:
        last, job = _follow(client, job_id, cfg, ns.json)
    except KeyboardInterrupt:
        print(f"interrupted: cancelling job {job_id}", file=sys.stderr)
        with contextlib.suppress(ControlTimeoutError):
            client.call("cancel")
        return EXIT_INTERRUPTED
    if not last.get("ok"):
        if ns.json:
            _json_line(last)
        else:
            print(f"error {last['error'].get('code')}: {last['error'].get('message')}", file=sys.stderr)
        return EXIT_ERROR
    state = job.get("state")
    if not ns.json:
        if state == "done":
            print(_human(job.get("result")))
        else:
            print(f"job {job_id} {state}: {job.get('error') or job.get('phase')}", file=sys.stderr)
    return {"done": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(state, EXIT_ERROR)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_section(ConsoleConfig, ns.config, "console", connect=ns.connect, keys_dir=ns.keys_dir,
                          insecure=ns.insecure, key_name=ns.key_name, timeout_s=ns.timeout_s)
        _command_args(ns)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("%s", format_config(cfg))
    try:
        with ControlClient(cfg.connect, keys_dir=cfg.keys_dir, key_name=cfg.key_name, insecure=cfg.insecure,
                           timeout_s=cfg.timeout_s) as client:
            return _run(client, ns, cfg)
    except (ControlTimeoutError, KeyFileError) as exc:
        if ns.json:
            _json_line({"id": None, "ok": False, "error": {"code": "timeout" if isinstance(
                exc, ControlTimeoutError) else "keys", "message": str(exc)}})
        else:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
