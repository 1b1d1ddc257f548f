"""Plain HTTP and WebSocket clients for the web console tests (urllib and websockets: no browser)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from websockets.sync.client import connect


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    set_cookie: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


def http(url: str, *, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> Reply:
    """One request, redirects not followed, errors returned as replies."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return Reply(resp.status, dict(resp.headers), resp.read(), resp.headers.get_all("set-cookie") or [])
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers), exc.read(), exc.headers.get_all("set-cookie") or [])


def events(base: str, token: str | None, *, origin: str | None = None):
    """A WebSocket on ``/ws`` with the token as a cookie (a context manager)."""
    headers = {"Cookie": f"continua_token={token}"} if token else {}
    ws_url = base.replace("http://", "ws://") + "/ws"
    return connect(ws_url, additional_headers=headers, origin=origin, open_timeout=10)
