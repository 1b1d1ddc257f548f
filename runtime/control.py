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
- Handlers run on the server thread and must be quick; long work (``learn-new-task``) is
  started with ``JobTracker.start`` and returns a job id at once. Progress is *polled*:
  the built-in ``job`` command returns ``JobTracker.snapshot`` (progress 0..1, phase,
  state, result/error). Polling instead of a PUB event socket: one socket, one Curve
  setup, no slow-joiner losses, and every poll doubles as the console's heartbeat.
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

    server = ControlServer(ControlConfig(), jobs=JobTracker())
    server.register("status", lambda: {"tasks": 2}, COMMANDS["status"])
    server.start(); ...; server.stop()
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from runtime import access as acl
from runtime.config import ControlConfig
from runtime.errors import BusyError, CommandError, JobCancelledError

log = logging.getLogger(__name__)

QUIET_COMMANDS = frozenset({"ping", "job", "status"})  # polled: logged at DEBUG only


# --------------------------------------------------------------------------- argument schemas
@dataclass(frozen=True)
class Arg:
    """One argument of a command: type, required/default, ranges, choices, custom check.

    ``min``/``max`` bound numbers by value and strings/lists by length. ``check`` raises
    ``ValueError`` with a message for anything the other fields cannot say.
    """

    type: type
    _: KW_ONLY
    required: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    items: type | None = None
    check: Callable[[Any], Any] | None = None
    help: str = ""


def _type_ok(value: Any, typ: type) -> bool:
    if typ is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def validate_args(cmd: str, schema: dict[str, Arg], args: dict[str, Any]) -> dict[str, Any]:
    """Checked keyword arguments for a handler; ``CommandError("bad_args")`` naming the problem."""

    def bad(msg: str) -> CommandError:
        return CommandError("bad_args", f"{cmd}: {msg}")

    unknown = sorted(str(k) for k in args if k not in schema)
    if unknown:
        raise bad(f"unknown argument(s) {unknown}; expected {sorted(schema)}")
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if name not in args:
            if spec.required:
                raise bad(f"missing required argument {name!r} ({spec.type.__name__})")
            out[name] = spec.default
            continue
        value = args[name]
        if not _type_ok(value, spec.type):
            raise bad(f"{name}={value!r} must be {spec.type.__name__}")
        if spec.type is float:
            value = float(value)
            if not math.isfinite(value):
                raise bad(f"{name}={value!r} must be finite")
        size = len(value) if isinstance(value, str | list | dict) else value
        if spec.min is not None and size < spec.min:
            raise bad(f"{name}={value!r} must be >= {spec.min}" + (" long" if size is not value else ""))
        if spec.max is not None and size > spec.max:
            raise bad(f"{name}={value!r} must be <= {spec.max}" + (" long" if size is not value else ""))
        if spec.choices is not None and value not in spec.choices:
            raise bad(f"{name}={value!r} must be one of {list(spec.choices)}")
        if spec.items is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if not _type_ok(item, spec.items):
                    raise bad(f"{name}[{i}]={item!r} must be {spec.items.__name__}")
        if spec.check is not None:
            try:
                spec.check(value)
            except ValueError as exc:
                raise bad(f"{name}={value!r}: {exc}") from None
        out[name] = value
    return out


def parse_source(text: str, recordings_dir: str | Path | None = None) -> dict[str, Any]:
    """``live:SECONDS`` | ``mcap:PATH[,PATH...]`` | ``dataset:SPLIT`` -> ``{"kind", "seconds"|"path"|"split"}``.
    mcap paths must lie inside the agent's ``recordings_dir`` (``runtime.access.recording_path``): the agent
    passes it and gets resolved absolute paths; a console passes None (form only)."""
    kind, sep, rest = str(text).partition(":")
    if not sep or not rest:
        raise ValueError("source must be live:SECONDS, mcap:PATH or dataset:SPLIT")
    if kind == "live":
        try:
            seconds = float(rest)
        except ValueError:
            raise ValueError(f"live:{rest} needs a number of seconds") from None
        if not 0 < seconds <= 3600:
            raise ValueError(f"live:{rest} seconds must be in (0, 3600]")
        return {"kind": "live", "seconds": seconds}
    if kind == "mcap":
        return {"kind": "mcap", "path": ",".join(acl.recording_path(p, recordings_dir) for p in rest.split(","))}
    if kind == "dataset":
        return {"kind": "dataset", "split": rest}
    raise ValueError(f"unknown source kind {kind!r}; expected live, mcap or dataset")


def _labels_check(labels: list[str]) -> None:
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    if any(not s.strip() for s in labels):
        raise ValueError("labels must be non-empty")


# The agreed argument schemas of the standard commands: the agent registers its handlers
# with these and the console sends exactly these, so the two cannot drift.
COMMANDS: dict[str, dict[str, Arg]] = {
    "status": {},
    "tasks": {},
    "learn-new-task": {
        "name": Arg(str, required=True, min=1, max=64, help="task name"),
        "labels": Arg(list, required=True, items=str, min=1, max=100, check=_labels_check),
        "source": Arg(str, required=True, max=4096, check=parse_source,
                      help="live:SECONDS | mcap:PATH | dataset:SPLIT"),
    },
    "teach": {
        "label": Arg(str, required=True, min=1, max=64),
        "seconds": Arg(float, default=5.0, min=0.1, max=600.0),
    },
    "cancel": {},
    "rollback": {},
    "save": {},
    "shutdown": {},
}


# --------------------------------------------------------------------------- jobs
class JobHandle:
    """Given to a job's function: report progress, see cancellation."""

    def __init__(self, tracker: JobTracker, job_id: str) -> None:
        self._tracker = tracker
        self.id = job_id
        self.cancel_event = threading.Event()

    def update(self, progress: float | None = None, phase: str | None = None) -> None:
        self._tracker._update(self.id, progress, phase)

    def set_meta(self, **meta: Any) -> None:
        """Add facts to the job's ``meta`` (e.g. the worker's pid) while it runs."""
        self._tracker._update(self.id, None, None, meta)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        """Raise ``JobCancelledError`` when a cancel was requested (call between steps)."""
        if self.cancel_event.is_set():
            raise JobCancelledError(f"job {self.id} cancelled")


class JobTracker:
    """At most one active background job; a bounded history of finished ones.

    ``start`` raises ``BusyError`` (reply code ``busy``) while a job runs. The job function
    returns its result (msgpack-able) or raises; ``JobCancelledError`` or returning after
    ``cancel`` marks it ``cancelled``, any other exception ``failed`` with its message.
    """

    def __init__(self, *, history: int = 16) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._handles: dict[str, JobHandle] = {}
        self._active: str | None = None
        self._history = history
        self._threads: dict[str, threading.Thread] = {}

    def start(self, name: str, fn: Callable[[JobHandle], Any], *, meta: dict | None = None) -> str:
        with self._lock:
            if self._active is not None:
                job = self._jobs[self._active]
                raise BusyError(f"job {job['id']} ({job['name']}) is running: {job['phase']} "
                                f"{job['progress']:.0%}; cancel it or wait")
            job_id = uuid.uuid4().hex[:12]
            self._jobs[job_id] = {"id": job_id, "name": name, "state": "running", "progress": 0.0,
                                  "phase": "starting", "result": None, "error": None,
                                  "started_ns": time.time_ns(), "ended_ns": None, "meta": dict(meta or {})}
            while len(self._jobs) > self._history:
                oldest = next(iter(self._jobs))
                if oldest == job_id:
                    break
                self._jobs.pop(oldest)
            handle = JobHandle(self, job_id)
            self._handles[job_id] = handle
            self._active = job_id
            thread = threading.Thread(target=self._run, args=(handle, fn), name=f"job-{name}", daemon=True)
            self._threads[job_id] = thread
        thread.start()
        return job_id

    def _run(self, handle: JobHandle, fn: Callable[[JobHandle], Any]) -> None:
        state, result, error = "done", None, None
        try:
            result = fn(handle)
            if handle.cancelled:
                state = "cancelled"
        except JobCancelledError:
            state = "cancelled"
        except Exception as exc:
            log.error("job %s failed: %s", handle.id, traceback.format_exc())
            state, error = "failed", f"{type(exc).__name__}: {exc}"
        with self._lock:
            job = self._jobs.get(handle.id)
            if job is not None:
                job.update(state=state, result=result if state == "done" else None, error=error,
                           ended_ns=time.time_ns())
                if state == "done":
                    job["progress"] = 1.0
            self._active = None
            self._handles.pop(handle.id, None)
            self._threads.pop(handle.id, None)
        log.info("job %s %s", handle.id, state)

    def _update(self, job_id: str, progress: float | None, phase: str | None, meta: dict | None = None) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["state"] != "running":
                return
            if meta:
                job["meta"].update(meta)
            if progress is not None and math.isfinite(progress):
                job["progress"] = min(1.0, max(0.0, float(progress)))
            if phase is not None:
                job["phase"] = str(phase)

    def snapshot(self, job_id: str | None = None) -> dict[str, Any] | None:
        """A copy of one job (default: the active one, else the newest), or None."""
        with self._lock:
            if job_id is None:
                job_id = self._active or (next(reversed(self._jobs)) if self._jobs else None)
            job = self._jobs.get(job_id) if job_id is not None else None
            return dict(job, meta=dict(job["meta"])) if job is not None else None

    def active(self) -> str | None:
        with self._lock:
            return self._active

    def cancel(self, job_id: str | None = None) -> bool:
        """Ask the active job (or ``job_id`` if it is the active one) to stop; True if asked."""
        with self._lock:
            target = self._active if job_id is None else job_id
            handle = self._handles.get(target) if target is not None else None
        if handle is None:
            return False
        handle.cancel_event.set()
        return True

    def wait(self, job_id: str | None = None, timeout_s: float = 10.0) -> dict[str, Any] | None:
        """Join the job's thread (bounded) and return its snapshot."""
        with self._lock:
            target = job_id or self._active
            thread = self._threads.get(target) if target else None
        if thread is not None:
            thread.join(timeout_s)
        return self.snapshot(target)


# --------------------------------------------------------------------------- server
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

