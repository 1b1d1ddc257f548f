"""The web console's own rules, with a real server on loopback and no agent behind it: tokens,
cookies, roles, origins, bad requests, thumbnails, and the agent-unreachable message."""

from __future__ import annotations

import io
import json
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus

from benchmarks.harness import free_ports
from runtime import keys
from runtime.web import tokens as tok
from runtime.web.config import WebConfig
from runtime.web.feed import Hub, Thumbnailer
from runtime.web.server import WebConsole
from sensors.wire import Image
from tests.runtime.webclient import events, http


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    """A web console whose agent does not exist (ports nobody listens on)."""
    root = tmp_path_factory.mktemp("web")
    keys.create("server", root / "keys")
    keys.create("web", root / "keys")
    control, pred, sensors = free_ports(3)
    cfg = WebConfig(port=0, control=f"tcp://127.0.0.1:{control}", predictions=f"tcp://127.0.0.1:{pred}",
                    sensors=[f"tcp://127.0.0.1:{sensors}"], keys_dir=root / "keys", state_dir=root / "state",
                    timeout_s=0.3, status_hz=5.0)
    web = WebConsole(cfg).start()
    yield web, f"http://127.0.0.1:{web.port}"
    web.stop()


def test_tokens_are_new_private_files(console, tmp_path: Path):
    web, _ = console
    for role in tok.ROLES:
        path = web.cfg.state_dir / f"{role}.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert tok.read(web.cfg.state_dir, role) == getattr(web.tokens, role)
    assert stat.S_IMODE(web.cfg.state_dir.stat().st_mode) == 0o700
    assert web.tokens.operator != web.tokens.viewer and len(web.tokens.operator) >= 32
    first, second = tok.issue(tmp_path), tok.issue(tmp_path)
    assert first.operator != second.operator and tok.read(tmp_path) == second.operator  # new at every start
    assert web.tokens.role_of(web.tokens.viewer) == "viewer" and web.tokens.role_of("nope") is None
    assert web.tokens.role_of("") is None and web.tokens.role_of(None) is None


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/api/state", "/?token=wrong"])
def test_without_the_token_nothing_is_shown(console, path):
    _, base = console
    r = http(base + path)
    assert r.status == 401
    assert b"data-testid" not in r.body and b"token required" in r.body
    assert r.set_cookie == []


def test_websocket_without_the_token_is_refused(console):
    web, base = console
    for token in (None, "wrong"):
        with pytest.raises(InvalidStatus) as exc, events(base, token):
            pass
        assert exc.value.response.status_code == 403


def test_token_url_sets_a_strict_http_only_cookie_then_the_page_loads(console):
    web, base = console
    r = http(f"{base}/?token={web.tokens.operator}")
    assert r.status == 303 and r.headers["location"] == "/"
    (cookie,) = r.set_cookie
    parts = [p.strip().lower() for p in cookie.split(";")]
    assert parts[0] == f"continua_token={web.tokens.operator}".lower()
    assert "httponly" in parts and "samesite=strict" in parts and "path=/" in parts
    page = http(base + "/", headers={"Cookie": cookie.split(";")[0]})
    assert page.status == 200 and b'data-testid="prediction"' in page.body
    headers = {k.lower(): v for k, v in page.headers.items()}
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert http(base + "/static/app.js", headers={"Authorization": f"Bearer {web.tokens.viewer}"}).status == 200


def test_state_never_changes_on_get_and_the_viewer_cannot_command(console):
    web, base = console
    viewer = {"Cookie": f"continua_token={web.tokens.viewer}"}
    operator = {"Cookie": f"continua_token={web.tokens.operator}"}
    assert http(base + "/api/command", headers=operator).status == 405  # GET
    r = http(base + "/api/command", method="POST", body={"cmd": "save"}, headers=viewer)
    assert r.status == 403 and r.json()["error"]["code"] == "forbidden"
    assert http(base + "/api/state", headers=viewer).json()["role"] == "viewer"
    assert http(base + "/api/state", headers=viewer).json()["http"]["forbidden"] >= 1


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "bad_request"),
    ({"args": {}}, 400, "bad_request"),
    ({"cmd": "teach", "args": [1]}, 400, "bad_request"),
    ({"cmd": "shutdown"}, 400, "unknown_command"),
    ({"cmd": "format-disk"}, 400, "unknown_command"),
    (b"x" * (70 << 10), 413, "too_large"),
])
def test_bad_commands_get_a_clear_error(console, body, status, code):
    web, base = console
    r = http(base + "/api/command", method="POST", body=body, headers={"Cookie": f"continua_token={web.tokens.operator}"})
    assert (r.status, r.json()["error"]["code"]) == (status, code)
    assert http(base + "/api/state", headers={"Cookie": f"continua_token={web.tokens.operator}"}
                ).json()["http"][code] >= 1


def test_cross_origin_requests_are_refused(console):
    web, base = console
    cookie = {"Cookie": f"continua_token={web.tokens.operator}"}
    r = http(base + "/api/command", method="POST", body={"cmd": "save"}, headers={**cookie, "Origin": "http://evil.example"})
    assert r.status == 403 and b"cross-origin" in r.body
    with pytest.raises(InvalidStatus) as exc, events(base, web.tokens.operator, origin="http://evil.example"):
        pass
    assert exc.value.response.status_code == 403


def test_an_unreachable_agent_is_said_and_commands_time_out(console):
    web, base = console
    with events(base, web.tokens.operator, origin=base) as ws:
        hello = json.loads(ws.recv(timeout=5))
        assert hello == {"type": "hello", "role": "operator", "agent": web.cfg.control}
        msg = json.loads(ws.recv(timeout=10))
        assert msg["type"] == "agent" and msg["connected"] is False and "no reply" in msg["error"]
    r = http(base + "/api/command", method="POST", body={"cmd": "save"},
             headers={"Cookie": f"continua_token={web.tokens.operator}", "Origin": base})
    assert r.status == 504 and r.json()["error"]["code"] == "timeout"


def test_page_messages_are_strict_json_whatever_the_agent_sends():
    """NaN or inf (a browser's JSON.parse refuses them) become null, numpy numbers plain ones, bytes
    text; a value with no JSON form is left out, never the whole message."""
    hub = Hub()
    hub.publish("prediction", {"label": b"mug", "novelty": float("nan"), "confidence": np.float32(0.5),
                               "topk": [["mug", np.float64(0.5)], ["cup", float("inf")]], "handle": object(),
                               "seq": np.int64(7)})
    (text,) = hub.snapshot()
    msg = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert msg == {"type": "prediction", "label": "mug", "novelty": None, "confidence": 0.5,
                   "topk": [["mug", 0.5], ["cup", None]], "seq": 7}


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8", "jpeg"])
def test_thumbnails_keep_the_picture(encoding):
    from PIL import Image as PILImage

    rgb = np.zeros((240, 640, 3), np.uint8)
    rgb[:, :320, 0] = 255  # left half red, right half blue
    rgb[:, 320:, 2] = 255
    if encoding == "jpeg":
        buf = io.BytesIO()
        PILImage.fromarray(rgb).save(buf, format="JPEG", quality=95)
        msg = Image(data=np.frombuffer(buf.getvalue(), np.uint8), encoding="jpeg", height=240, width=640)
    elif encoding == "mono8":
        msg = Image(data=rgb[..., 0].copy(), encoding="mono8")
    else:
        msg = Image(data=rgb[..., ::-1].copy() if encoding == "bgr8" else rgb, encoding=encoding)
    jpeg, h, w = Thumbnailer(320, 80).encode(msg)
    assert (h, w) == (120, 320)
    out = np.asarray(PILImage.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    assert out.shape == (120, 320, 3)
    left, right = out[:, :150].mean((0, 1)), out[:, 170:].mean((0, 1))
    if encoding == "mono8":
        assert left[0] > 200 and right[0] < 30 and abs(left[0] - left[2]) < 10
    else:
        assert left[0] > 200 and left[2] < 40 and right[2] > 200 and right[0] < 40


def test_startup_errors_are_one_line(tmp_path: Path):
    (port,) = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        r = subprocess.run([sys.executable, "-m", "runtime.web", "--port", str(port), "--insecure"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert r.returncode == 2 and f"cannot listen on http://127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "w.toml").write_text("[web]\ninsecure = true\n")
    r = subprocess.run([sys.executable, "-m", "runtime.web", "--config", "w.toml"], capture_output=True, text=True, check=False,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "command-line flag" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime.web", "--port", "0", "--host", "0.0.0.0"], capture_output=True,
                       text=True, check=False, timeout=60, cwd=tmp_path)  # no keys/ here
    assert r.returncode == 2 and "cannot start" in r.stderr and "Traceback" not in r.stderr
    assert "WARNING" in r.stderr and "reachable from other machines" in r.stderr  # another address: said


def test_the_process_prints_its_urls_serves_them_and_stops_on_sigint(tmp_path: Path):
    """``python -m runtime.web`` as an operator starts it: the console line, a working URL, exit 0 on Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-m", "runtime.web", "--port", "0", "--insecure", "--foxglove", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert lines[0].startswith("console: http://127.0.0.1:") and lines[1].startswith("viewer: http://127.0.0.1:")
        assert lines[2].startswith("foxglove: ws://127.0.0.1:")
        url = lines[0].split(" ", 1)[1]
        token = url.split("?token=")[1]
        assert token == tok.read(tmp_path / "state" / "web")  # the default state_dir, relative to where it runs
        r = http(url)
        assert r.status == 303 and r.set_cookie
        assert http(url.split("?")[0], headers={"Authorization": f"Bearer {token}"}).status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    assert rc == 0 and "Traceback" not in proc.stderr.read()
