"""Scene control for the dataset publishers: "now show class c for S seconds" over ZeroMQ.

Why: a scripted operator (a benchmark that teaches the robot live) drives what the demo's
sensors show, as a person holding an object in front of the robot would. The streamer
(``StreamerConfig.scene_endpoint``) binds a REP socket served by :class:`SceneServer` in its
own thread; :class:`SceneClient` is the operator's side.

Protocol: one msgpack map per request, one msgpack map per reply.

- ``{"cmd": "show", "class": int, "seconds": float}`` -> ``{"ok": true, "start_ns", "end_ns",
  "class", "name"}``: ``class`` (0..9, with samples in the split) is shown during
  [start_ns, end_ns), stamps in the clock of the message stamps (``truth.stamp_ns``,
  ``Image.stamp_ns``); it starts now and replaces any show in progress. 0 < seconds <= 3600.
- ``{"cmd": "resume"}`` -> ``{"ok": true, "resumed": bool, "end_ns": int | None}``: ends the
  show in progress now (``end_ns``: its last instant + 1 ns) and drops pending ones.
- ``{"cmd": "status"}`` -> ``{"ok": true, "class", "name", "override": bool, "until_ns",
  "now_ns"}``: what is shown now and until when (the current segment's end: the end of the
  show, or of the current dwell period).
- Anything else (not msgpack, not one frame, not a map, unknown ``cmd`` or keys, a bad
  ``class`` or ``seconds``) -> ``{"ok": false, "error": "<message>"}``, counted in
  ``SceneServer.errors``. The server always answers and never dies of a request; a request
  over ``max_request_bytes`` makes libzmq drop the connection instead (``ZMQ_MAXMSGSIZE``).

    with SceneClient("tcp://127.0.0.1:5557") as scene:
        shown = scene.show(3, 5.0)   # {"ok": True, "start_ns": ..., "end_ns": ..., ...}
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

import msgpack
import zmq

log = logging.getLogger("continua.demodata.scene")

COMMANDS: dict[str, frozenset[str]] = {
    "show": frozenset({"class", "seconds"}),
    "resume": frozenset(),
    "status": frozenset(),
}
OPTIONAL: dict[str, frozenset[str]] = {"show": frozenset({"pool"})}


class SceneError(ValueError):
    """A scene request that cannot be served; the message names the value and the spec."""


class SceneTarget(Protocol):
    """What a :class:`SceneServer` drives (``DatasetStreamer``); bad arguments raise SceneError."""

    def show(self, class_id: Any, seconds: Any, pool: Any = "scene") -> dict[str, Any]: ...

    def resume(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


def answer(target: SceneTarget, frames: list[bytes]) -> dict[str, Any]:
    """The reply to one request (a list of ZeroMQ frames); a bad request raises SceneError."""
    if len(frames) != 1:
        raise SceneError(f"a request is one msgpack frame, got {len(frames)} frames")
    try:
        req = msgpack.unpackb(frames[0], raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SceneError(f"request is not msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(req, dict):
        raise SceneError(f"request must be a msgpack map, got {type(req).__name__}")
    cmd = req.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise SceneError(f"cmd={cmd!r}: expected one of {sorted(COMMANDS)}")
    keys = {k for k in req if k != "cmd"}
    optional = OPTIONAL.get(cmd, frozenset())
    if not COMMANDS[cmd] <= keys <= COMMANDS[cmd] | optional:
        unknown = sorted(repr(k) for k in keys - COMMANDS[cmd] - optional)
        missing = sorted(COMMANDS[cmd] - keys)
        raise SceneError(
            f"{cmd}: unknown keys {unknown}, missing keys {missing}; expects {sorted(COMMANDS[cmd])}"
        )
    if cmd == "show":
        return target.show(req["class"], req["seconds"], req.get("pool", "scene"))
    return target.resume() if cmd == "resume" else target.status()


class SceneServer:
    """A REP socket on ``endpoint`` answering scene requests for ``target`` in a thread.

    The socket is created, bound and used only by that thread; :meth:`start` waits for the
    bind and raises its error. It polls with ``poll_ms`` timeouts so :meth:`stop` (or the
    context manager's exit) ends it promptly. ``endpoint`` becomes the bound address
    (``tcp://127.0.0.1:*`` resolves to a port).
    """

    def __init__(
        self, endpoint: str, target: SceneTarget, *, poll_ms: int = 100, max_request_bytes: int = 65536
    ) -> None:
        self.endpoint, self.target = endpoint, target
        self.poll_ms, self.max_request_bytes = poll_ms, max_request_bytes
        self.errors = 0  # requests answered with ok=false
        self.served = 0  # requests answered
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="scene-control", daemon=True)

    def start(self, timeout_s: float = 5.0) -> SceneServer:
        self._thread.start()
        if not self._bound.wait(timeout_s):
            self._stop.set()
            raise TimeoutError(f"scene control did not bind {self.endpoint} within {timeout_s} s")
        if self._bind_error is not None:
            raise RuntimeError(f"scene control cannot bind {self.endpoint}: {self._bind_error}")
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> SceneServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        ctx = zmq.Context.instance()
        try:
            sock = ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_request_bytes)
            sock.bind(self.endpoint)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._bind_error = exc
            self._bound.set()
            return
        self._bound.set()
        log.info("scene control on %s", self.endpoint)
        with sock:
            while not self._stop.is_set():
                if not sock.poll(self.poll_ms):
                    continue
                try:
                    frames = sock.recv_multipart()
                    sock.send(self._reply(frames))
                except zmq.ZMQError:  # e.g. the peer vanished mid-request: keep serving
                    log.exception("scene control socket error")

    def _reply(self, frames: list[bytes]) -> bytes:
        """The packed reply; never raises (a REP must answer every request)."""
        try:
            out = msgpack.packb(answer(self.target, frames))
        except SceneError as exc:
            out = self._error(str(exc))
        except Exception as exc:  # a bug in the target must not kill the control thread
            log.exception("scene request failed")
            out = self._error(f"internal error: {type(exc).__name__}: {exc}")
        self.served += 1
        return out

    def _error(self, message: str) -> bytes:
        self.errors += 1
        log.warning("scene request refused: %s", message)
        return msgpack.packb({"ok": False, "error": message})


class SceneClient:
    """The operator's side of the scene control: a REQ socket with timeouts.

    A request without a reply within ``timeout_s`` raises ``TimeoutError``; the REQ socket,
    now stuck waiting for that reply, is closed and a fresh one connected, so the client
    stays usable. :meth:`show`, :meth:`resume` and :meth:`status` raise :class:`SceneError`
    with the server's message when it answers ``ok: false``; :meth:`request` returns any
    reply as it came (raw bytes are sent as they are: for tests of the server).
    """

    def __init__(self, endpoint: str, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r}: expected > 0")
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self._ctx = zmq.Context.instance()
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def request(self, msg: dict[str, Any] | bytes) -> dict[str, Any]:
        payload = msg if isinstance(msg, bytes) else msgpack.packb(msg)
        try:
            self._sock.send(payload, zmq.NOBLOCK)
            ready = self._sock.poll(round(self.timeout_s * 1000))
        except zmq.Again:
            ready = 0
        if not ready:
            self._sock.close()
            self._sock = self._connect()
            raise TimeoutError(
                f"no reply from scene control {self.endpoint} within {self.timeout_s} s "
                "(is the streamer running with scene_endpoint set to this address?)"
            )
        raw = self._sock.recv()
        try:
            reply = msgpack.unpackb(raw, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise SceneError(f"reply from {self.endpoint} is not msgpack: {exc}") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise SceneError(f"reply from {self.endpoint} is not a scene reply: {reply!r}")
        return reply

    def _checked(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply = self.request(msg)
        if not reply["ok"]:
            raise SceneError(f"{msg['cmd']} refused by {self.endpoint}: {reply.get('error')}")
        return reply

    def show(self, class_id: int, seconds: float, pool: str = "scene") -> dict[str, Any]:
        """Show ``class_id`` for ``seconds`` from now; the reply (``start_ns``, ``end_ns``...).
        ``pool``: "scene" (teaching samples) or "base" (the schedule's samples)."""
        return self._checked({"cmd": "show", "class": class_id, "seconds": seconds, "pool": pool})

    def resume(self) -> dict[str, Any]:
        """Back to the schedule now."""
        return self._checked({"cmd": "resume"})

    def status(self) -> dict[str, Any]:
        return self._checked({"cmd": "status"})

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SceneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
