"""The agent's control server: msgpack request/reply over a CurveZMQ-protected ROUTER.

Wire format (one frame; a REQ-style empty delimiter frame before it is also accepted)::

    request  {"id": str|int, "cmd": str, "args": {...}}
    reply    {"id": <same>, "ok": true,  "result": ...}
             {"id": <same or None>, "ok": false, "error": {"code": str, "message": str}}

Error codes: ``malformed`` (not msgpack, or wrong framing), ``not_map``, ``bad_request``
(missing/ill-typed id, cmd or args), ``too_large`` (frame over ``max_request_bytes``),
``too_deep`` (nesting over ``max_depth``), ``revoked`` (the key left the allow-list; id None),
``forbidden`` (not for this key's role), ``unknown_command``, ``bad_args``, ``busy``,
any ``CommandError.code`` a handler raises, and ``internal`` (a handler bug; logged with
its traceback). Each is counted in ``stats()["errors"]``. Nothing a client sends can stop
the loop. Frames over ``hard_max_bytes`` never reach Python: libzmq drops the connection
(ZMQ_MAXMSGSIZE), so a hostile client cannot make the agent allocate a gigabyte.

Why this shape:
- Handlers run on the server thread and must be quick; long work is a background job
  (``runtime.jobs.JobTracker``) whose progress the console polls with the built-in ``job``
  command, each poll doubling as its heartbeat.
- CurveZMQ with an allow-list with roles (``runtime.access``: ``keys/operators/`` and
  ``keys/viewers/``), asked at the handshake (ZAP) and again before *every* request, so a
  revoked console is refused from its next request on (``revoked``) and a viewer key gets
  ``forbidden`` for anything but status, tasks and ping; an unknown key never gets a byte
  back. ``insecure=True`` (``--insecure``) turns Curve off, on loopback only, with a WARNING.
- ROUTER_MANDATORY off, bounded SNDHWM and non-blocking sends: a console that stopped
  reading loses its replies, the server never waits for it.
- Sessions: every request (``ping`` included) refreshes its client's entry; entries not
  seen for ``heartbeat_timeout_s`` are dropped (``stats()["sessions_dropped"]``).

Usage (the agent)::

    from runtime.commands import COMMANDS
    from runtime.jobs import JobTracker

    server = ControlServer(ControlConfig(), jobs=JobTracker())
    server.register("status", lambda: {"tasks": 2}, COMMANDS["status"])
    server.start(); ...; server.stop()
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from runtime import access as acl
from runtime.commands import QUIET_COMMANDS, Arg, validate_args
from runtime.config import ControlConfig
from runtime.errors import CommandError
from runtime.jobs import JobTracker

log = logging.getLogger(__name__)


@dataclass
class _Command:
    fn: Callable[..., Any]
    schema: dict[str, Arg]
    help: str


@dataclass
class _Session:
    first_ns: int
    last_ns: int
    user: str | None
    grant: acl.Grant | None = None  # key name and role (None: insecure)
    requests: int = 0


@dataclass
class _Stats:
    requests: int = 0
    replies: int = 0
    dropped_replies: int = 0
    sessions_dropped: int = 0
    sessions_revoked: int = 0
    errors: Counter = field(default_factory=Counter)
    commands: Counter = field(default_factory=Counter)


def _depth_exceeds(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def _plain(value: Any) -> Any:
    """msgpack ``default``: numpy scalars/arrays, Paths, tuples-as-keys made plain."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot send {type(value).__name__} in a reply")


class ControlServer:
    """ROUTER + msgpack command server on its own thread (see the module docstring)."""

    def __init__(self, config: ControlConfig | None = None, *, jobs: JobTracker | None = None) -> None:
        self.config = config or ControlConfig()
        self.jobs = jobs
        self.endpoint: str | None = None  # the bound endpoint (resolves tcp://...:* ports)
        self._commands: dict[str, _Command] = {}
        self._sessions: dict[bytes, _Session] = {}
        self._stats = _Stats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.access: acl.AccessList | None = None  # None while insecure
        self.register("ping", self._ping, {}, help="heartbeat; refreshes this console's session")
        self.register("help", self._help, {}, help="list commands and their arguments")
        if jobs is not None:
            self.register("job", self._job, {"id": Arg(str, max=64)}, help="progress of a job (default: latest)")

    # ---- registry
    def register(self, name: str, fn: Callable[..., Any], schema: dict[str, Arg] | None = None,
                 *, help: str = "") -> None:
        """Add a command; ``fn(**validated_args)`` returns a msgpack-able result."""
        if not name or not isinstance(name, str):
            raise ValueError(f"command name={name!r} must be a non-empty str")
        if name in self._commands:
            raise ValueError(f"command {name!r} is already registered")
        self._commands[name] = _Command(fn, dict(schema or {}), help)

    def command(self, name: str, schema: dict[str, Arg] | None = None, *, help: str = "") -> Callable:
        """Decorator form of ``register``."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name, fn, schema, help=help)
            return fn

        return deco

    # ---- built-ins
    def _ping(self) -> dict[str, Any]:
        return {"pong": True, "time_ns": time.time_ns()}

    def _help(self) -> dict[str, Any]:
        return {name: {"help": c.help, "args": {a: {"type": s.type.__name__, "required": s.required,
                                                     "default": s.default, "help": s.help}
                                                 for a, s in c.schema.items()}}
                for name, c in sorted(self._commands.items())}

    def _job(self, id: str | None) -> dict[str, Any]:
        assert self.jobs is not None
        snap = self.jobs.snapshot(id)
        if snap is None:
            raise CommandError("not_found", f"no job {id!r}" if id else "no job has run yet")
        return snap

    # ---- lifecycle
    def start(self, timeout_s: float = 10.0) -> ControlServer:
        """Bind and serve on a thread; raises here if binding or key loading failed."""
        if self._thread is not None:
            raise RuntimeError("ControlServer already started")
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"control server did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join(timeout_s)
            raise self._error
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._stats
            return {"requests": s.requests, "replies": s.replies, "dropped_replies": s.dropped_replies,
                    "sessions_dropped": s.sessions_dropped, "sessions_revoked": s.sessions_revoked,
                    "errors": dict(s.errors), "commands": dict(s.commands)}

    def sessions(self) -> list[dict[str, Any]]:
        now = time.time_ns()
        with self._lock:
            return [{"client": ident.hex(), "user": s.user, "key": s.grant.name if s.grant else None,
                     "role": s.grant.role if s.grant else "operator", "requests": s.requests,
                     "idle_s": (now - s.last_ns) / 1e9, "age_s": (now - s.first_ns) / 1e9}
                    for ident, s in self._sessions.items()]

    # ---- thread
    def _setup(self, ctx: zmq.Context, sock: zmq.Socket) -> Any:
        """Options, keys, ZAP and bind; returns the authenticator (None when insecure)."""
        cfg = self.config
        auth = None
        sock.linger = 0
        sock.sndhwm = cfg.sndhwm
        sock.rcvhwm = 1000
        sock.sndtimeo = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.hard_max_bytes)
        if cfg.insecure:
            acl.check_insecure_endpoint(cfg.endpoint)
            log.warning("control server on %s is INSECURE: no CurveZMQ, anyone on this machine "
                        "can command this robot (development only)", cfg.endpoint)
            acl.bind(sock, cfg.endpoint)
        else:
            self.access, auth = acl.serve_curve(ctx, sock, cfg.keys_dir)
            try:
                acl.bind(sock, cfg.endpoint)
            except BaseException:
                auth.stop()
                raise
        self.endpoint = sock.last_endpoint.decode()
        log.info("control server on %s (%s)", self.endpoint, "insecure" if cfg.insecure else "CurveZMQ")
        return auth

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        try:
            auth = self._setup(ctx, sock)
        except BaseException as exc:
            sock.close(0)
            ctx.term()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        last_housekeeping = 0.0
        try:
            while not self._stop.is_set():
                if poller.poll(self.config.poll_ms):
                    for _ in range(256):  # bounded batch, then housekeeping
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._serve(sock, frames)
                now = time.monotonic()
                if now - last_housekeeping > 0.5:
                    last_housekeeping = now
                    self._prune_sessions()
                    if self.access is not None:  # keys revoked while their consoles are silent
                        self.access.reload_if_changed()
                        self._drop_revoked()
        finally:
            sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()

    def _drop_revoked(self, only: bytes | None = None) -> None:
        """Drop the sessions (or the one of ``only``) whose key left the allow-list."""
        with self._lock:
            gone = [k for k, s in self._sessions.items() if only in (None, k) and self.access.lookup(s.user) is None]
            for k in gone:
                s = self._sessions.pop(k)
                self._stats.sessions_revoked += 1
                log.warning("console %s (key %s) revoked: session dropped, its requests are refused", k.hex(),
                            s.grant.name if s.grant else s.user)

    def _prune_sessions(self) -> None:
        limit = time.time_ns() - int(self.config.heartbeat_timeout_s * 1e9)
        with self._lock:
            stale = [k for k, s in self._sessions.items() if s.last_ns < limit]
            for k in stale:
                s = self._sessions.pop(k)
                self._stats.sessions_dropped += 1
                log.info("console %s (%s) silent for %.1f s: session dropped", k.hex(), s.user,
                         self.config.heartbeat_timeout_s)

    def _serve(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        body = frames[1:]
        envelope = [ident]
        if len(body) == 2 and len(body[0]) == 0:
            envelope.append(b"")
            body = body[1:]
        try:
            user = (body[-1].get("User-Id") or None) if body else None
        except (zmq.ZMQError, UnicodeDecodeError):
            user = None
        grant = self.access.check(user) if self.access is not None else None  # per request: revocation acts now
        revoked = self.access is not None and grant is None  # revoked while connected: refused, session dropped
        with self._lock:
            self._stats.requests += 1
            now = time.time_ns()
            sess = self._sessions.get(ident)
            if sess is None and not revoked:
                sess = self._sessions[ident] = _Session(now, now, user, grant)
                log.info("new console session %s (%s)", ident.hex(), grant or "insecure")
            if sess is not None:
                sess.last_ns, sess.requests, sess.grant = now, sess.requests + 1, grant
        if revoked:
            self._drop_revoked(ident)
            return self._send(sock, envelope, None, self._error_reply(None, "revoked", (
                "this console's key is no longer on the agent's allow-list (revoked): request refused")))
        req_id, reply = None, None
        if len(body) != 1:
            reply = self._error_reply(None, "malformed", f"expected 1 frame after the identity, got {len(body)}")
        else:
            req_id, reply = self._handle(body[0], grant)
        self._send(sock, envelope, req_id, reply)

    def _error_reply(self, req_id: Any, code: str, message: str) -> dict[str, Any]:
        with self._lock:
            self._stats.errors[code] += 1
        return {"id": req_id, "ok": False, "error": {"code": code, "message": message}}

    def _handle(self, frame: zmq.Frame, grant: acl.Grant | None) -> tuple[Any, dict[str, Any]]:
        cfg = self.config
        if len(frame) > cfg.max_request_bytes:
            return None, self._error_reply(None, "too_large",
                                           f"request of {len(frame)} bytes > limit {cfg.max_request_bytes}")
        try:
            req = msgpack.unpackb(frame.bytes, raw=False, strict_map_key=True)
        except msgpack.StackError:
            return None, self._error_reply(None, "too_deep", f"nesting deeper than {cfg.max_depth}")
        except Exception as exc:  # untrusted bytes: any decoder failure is "malformed"
            return None, self._error_reply(None, "malformed", f"not a msgpack request: {type(exc).__name__}")
        if _depth_exceeds(req, cfg.max_depth):
            return None, self._error_reply(None, "too_deep", f"nesting deeper than {cfg.max_depth}")
        if not isinstance(req, dict):
            return None, self._error_reply(None, "not_map", f"request must be a map, got {type(req).__name__}")
        req_id = req.get("id")
        if isinstance(req_id, bool) or not isinstance(req_id, str | int) or (
                isinstance(req_id, str) and len(req_id) > 128):
            return None, self._error_reply(None, "bad_request", "'id' must be a str (<= 128) or an int")
        cmd, args = req.get("cmd"), req.get("args", {})
        if args is None:
            args = {}
        if not isinstance(cmd, str) or not isinstance(args, dict) or set(req) - {"id", "cmd", "args"}:
            return req_id, self._error_reply(req_id, "bad_request",
                                             "request must be {'id', 'cmd': str, 'args': map}")
        why = acl.forbidden(grant.role, cmd) if grant is not None else None  # None: insecure, loopback only
        if why is not None:
            return req_id, self._error_reply(req_id, "forbidden", why)
        command = self._commands.get(cmd)
        if command is None:
            return req_id, self._error_reply(req_id, "unknown_command",
                                             f"unknown command {cmd[:64]!r}; known: {sorted(self._commands)}")
        with self._lock:
            self._stats.commands[cmd] += 1
        (log.debug if cmd in QUIET_COMMANDS else log.info)("command %s %s from %s", cmd, args, grant or "insecure")
        t0 = time.monotonic()
        try:
            result = command.fn(**validate_args(cmd, command.schema, args))
        except CommandError as exc:
            return req_id, self._error_reply(req_id, exc.code, exc.message)
        except Exception as exc:
            log.error("command %s failed: %s", cmd, traceback.format_exc())
            return req_id, self._error_reply(req_id, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            took = time.monotonic() - t0
            if took > cfg.slow_handler_s:
                log.warning("command %s took %.2f s: handlers must be quick (use JobTracker)", cmd, took)
        return req_id, {"id": req_id, "ok": True, "result": result}

    def _send(self, sock: zmq.Socket, envelope: list[bytes], req_id: Any, reply: dict[str, Any]) -> None:
        try:
            payload = msgpack.packb(reply, default=_plain)
        except (TypeError, ValueError, OverflowError) as exc:
            payload = msgpack.packb(self._error_reply(req_id, "internal", f"result not serialisable: {exc}"))
        try:
            sock.send_multipart([*envelope, payload], flags=zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as exc:
            with self._lock:
                self._stats.dropped_replies += 1
            log.debug("reply to %s dropped: %s", envelope[0].hex(), exc)
            return
        with self._lock:
            self._stats.replies += 1
