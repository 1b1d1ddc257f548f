"""The web console's HTTP side (Starlette): the page, its WebSocket, and commands by POST.

Every request and WebSocket needs a token (``runtime.web.tokens``); without one the answer is
401 (403 for a WebSocket handshake) and nothing else. ``/?token=T`` sets the HttpOnly,
SameSite=Strict cookie and redirects to ``/`` so the token leaves the address bar. Nothing
changes state on GET: commands are ``POST /api/command`` and only for the operator token
(a viewer gets 403). A request whose ``Origin`` is not this server is refused (403) as a
second guard against other sites driving the robot through an operator's browser.

Routes: ``/`` (the page), ``/static/*`` (its script and style), ``/ws`` (server -> page JSON
messages; the newest of each type first), ``GET /api/state`` (the same newest messages as one
JSON object), ``POST /api/command`` (``{"cmd": ..., "args": {...}}`` -> the agent's reply).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from runtime.web import tokens as tok
from runtime.web.feed import Feed, Hub

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
COMMANDS = frozenset({"teach", "learn-new-task", "cancel", "rollback", "save"})  # what the page may send
MAX_BODY = 64 << 10


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": {"code": code, "message": message}}, status_code=status)


def _same_origin(conn: HTTPConnection) -> bool:
    """No Origin (curl, scripts) or one naming this host: the browser says where the page came from."""
    origin = conn.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == conn.headers.get("host", "")


class TokenGate:
    """ASGI middleware: find the caller's role from its token, or refuse before any route runs."""

    def __init__(self, app: ASGIApp, tokens: tok.Tokens, counts: Counter[str]) -> None:
        self.app, self.tokens, self.counts = app, tokens, counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        role = self.tokens.role_of(tok.from_request(dict(conn.headers), dict(conn.cookies),
                                                    dict(conn.query_params)))
        if role is None or not _same_origin(conn):
            why = "unauthorized" if role is None else "cross_origin"
            self.counts[why] += 1
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
                return
            status = 401 if role is None else 403
            text = ("token required: open the console URL printed at start-up (console: http://HOST:PORT/?token=...)"
                    if role is None else "cross-origin request refused")
            await PlainTextResponse(text, status_code=status)(scope, receive, send)
            return
        scope.setdefault("state", {})["role"] = role
        await self.app(scope, receive, _with_headers(send) if scope["type"] == "http" else send)


# The page loads only from this server, may not be framed (clickjacking of the controls) and sends
# no Referer (the first URL carries the token).
SECURITY_HEADERS = [(b"content-security-policy", b"default-src 'self'; img-src 'self' data:; connect-src 'self'; "
                                                 b"frame-ancestors 'none'"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                    (b"x-content-type-options", b"nosniff")]


def _with_headers(send: Send) -> Send:
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return wrapped


def create_app(feed: Feed, hub: Hub, tokens: tok.Tokens, *, agent: str = "") -> Starlette:
    """The Starlette app around a running ``Feed``; the caller owns the feed's lifetime."""
    counts: Counter[str] = Counter()  # refused requests by reason (GET /api/state shows them)

    async def index(request: Request) -> Response:
        if "token" in request.query_params:  # first visit: the token moves into the cookie
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(tok.COOKIE, request.query_params["token"], httponly=True, samesite="strict", path="/")
            return resp
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        messages = [json.loads(text) for text in hub.snapshot()]
        return JSONResponse({"role": request.state.role, "messages": {m["type"]: m for m in messages}, "feed": feed.stats(),
                             "http": dict(counts)})

    async def command(request: Request) -> Response:
        if request.state.role != "operator":
            counts["forbidden"] += 1
            return _error(403, "forbidden", "the viewer token may watch but not command")
        body = await _read_capped(request)
        if body is None:
            counts["too_large"] += 1
            return _error(413, "too_large", f"request body over {MAX_BODY} bytes")
        try:
            req = json.loads(body)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected a JSON object {\"cmd\": NAME, \"args\": {...}}")
            args = req.get("args", {})
            if not isinstance(args, dict):
                raise ValueError("args must be a JSON object")
        except ValueError as exc:
            counts["bad_request"] += 1
            return _error(400, "bad_request", str(exc))
        if req["cmd"] not in COMMANDS:
            counts["unknown_command"] += 1
            return _error(400, "unknown_command", f"{req['cmd']!r} is not one of {sorted(COMMANDS)}")
        reply = await run_in_threadpool(feed.command, req["cmd"], args)
        status = 504 if (reply.get("error") or {}).get("code") == "timeout" else 200
        return JSONResponse({k: reply.get(k) for k in ("ok", "result", "error") if k in reply}, status_code=status)

    async def events(ws: WebSocket) -> None:
        await ws.accept()
        sub = hub.subscribe(asyncio.get_running_loop())
        try:
            await ws.send_text(json.dumps({"type": "hello", "role": ws.state.role, "agent": agent}))
            for text in hub.snapshot():
                await ws.send_text(text)
            receiver = asyncio.ensure_future(_drain(ws))
            while not receiver.done():
                getter = asyncio.ensure_future(sub.queue.get())
                done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    await ws.send_text(getter.result())
                else:
                    getter.cancel()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            hub.unsubscribe(sub)

    app = Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/api/state", state, methods=["GET"]),
        Route("/api/command", command, methods=["POST"]),
        WebSocketRoute("/ws", events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    app.add_middleware(TokenGate, tokens=tokens, counts=counts)
    return app


async def _read_capped(request: Request) -> bytes | None:
    """The body, or None once it passes ``MAX_BODY`` (never held in memory beyond that)."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(ws: WebSocket) -> None:
    """Read (and ignore) what the page sends until it goes away."""
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
