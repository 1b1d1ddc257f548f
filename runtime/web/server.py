"""The web console process: ``python -m runtime.web --config FILE``.

Usage::

    python -m runtime.web                                   # agent on 127.0.0.1, page on 127.0.0.1:8080
    python -m runtime.web --config launch/web-demo.toml     # the [web] table
    python -m runtime.web --config launch/web-demo.toml --foxglove        # + Foxglove on ws://127.0.0.1:8765
    python -m runtime.web --port 0 --foxglove 0             # any free ports (the start-up lines name them)

At start it prints, on stdout, one line per token::

    console: http://127.0.0.1:8080/?token=...        (operator: may command)
    viewer: http://127.0.0.1:8080/?token=...         (may only watch)

and, with ``--foxglove``, ``foxglove: ws://127.0.0.1:8765``. The tokens are also in
``[web] state_dir`` (``operator.token``, ``viewer.token``, mode 0600), new at every start. The
process needs its own console key on the agent's allow-list (``python -m runtime.keys create
web``), unless the agent runs ``--insecure`` (then ``--insecure`` here, loopback only).

Start-up errors are one line and exit status 2: a bad config, a missing or unprotected key, an
HTTP or Foxglove port in use.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from typing import Any

from common.config import ConfigError, format_config
from runtime.config import load_section
from runtime.errors import KeyFileError
from runtime.web import tokens as tok
from runtime.web.config import WebConfig
from runtime.web.feed import Feed, Hub
from sensors.errors import CurveKeyError

log = logging.getLogger("continua.web")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear error (and port 0 works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on http://{host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class WebConsole:
    """Feed + HTTP server in one object, for the command line and for tests in one process."""

    def __init__(self, cfg: WebConfig) -> None:
        import uvicorn

        from runtime.web.app import create_app

        self.cfg = cfg
        self.hub = Hub(cfg.client_queue)
        self.foxglove: Any = None
        self._sock = bind(cfg.host, cfg.port)
        try:
            if cfg.foxglove:
                from runtime.web.foxglove import FoxgloveLive

                self.foxglove = FoxgloveLive(cfg.foxglove_host, cfg.foxglove_port)
            self.feed = Feed(cfg, self.hub, self.foxglove)
        except BaseException:
            self._sock.close()
            if self.foxglove is not None:
                self.foxglove.close()
            raise
        self.tokens = tok.issue(cfg.state_dir)
        self.port = self._sock.getsockname()[1]
        app = create_app(self.feed, self.hub, self.tokens, agent=cfg.control)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", ws="websockets-sansio",
                                                     access_log=False))
        self._thread: threading.Thread | None = None

    def url(self, role: str = "operator") -> str:
        return f"http://{url_host(self.cfg.host)}:{self.port}/?token={getattr(self.tokens, role)}"

    def start(self) -> WebConsole:
        """Serve in a background thread (tests); ``run`` serves in this one."""
        self.feed.start()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="web-http", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        self.feed.start()
        self._server.run(sockets=[self._sock])  # uvicorn handles SIGINT/SIGTERM and returns

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.feed.stop()
        if self.foxglove is not None:
            self.foxglove.close()
        self._sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.web", description="continua web operator console",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="TOML file with a [web] table")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1; another one is logged as a warning)")
    p.add_argument("--port", type=int, help="HTTP port (default 8080; 0: any free port)")
    p.add_argument("--foxglove", nargs="?", type=int, const=-1, default=None, metavar="PORT",
                   help="also stream to the Foxglove app (foxglove-sdk WebSocket server; default port 8765)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="no CurveZMQ towards an agent started with --insecure (loopback only; a flag only)")
    p.add_argument("--log-level", default="INFO")
    ns = p.parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fox: dict[str, Any] = {}
    if ns.foxglove is not None:
        fox = {"foxglove": True} if ns.foxglove < 0 else {"foxglove": True, "foxglove_port": ns.foxglove}
    try:
        cfg = load_section(WebConfig, ns.config, "web", host=ns.host, port=ns.port, insecure=ns.insecure, **fox)
    except ConfigError as exc:
        log.error("bad config: %s", exc)
        return 2
    log.info("config: %s", format_config(cfg))
    if not cfg.loopback:
        log.warning("the web console listens on %s, reachable from other machines: anyone with the token can "
                    "command the robot (use a loopback host and an SSH tunnel where you can)", cfg.host)
    try:
        console = WebConsole(cfg)
    except (OSError, KeyFileError, CurveKeyError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    print(f"console: {console.url('operator')}", flush=True)
    print(f"viewer: {console.url('viewer')}", flush=True)
    if console.foxglove is not None:
        print(f"foxglove: ws://{url_host(cfg.foxglove_host)}:{console.foxglove.port}", flush=True)
    # uvicorn handles SIGTERM while it runs, then raises it again: this handler makes that a clean exit 0
    signal.signal(signal.SIGTERM, lambda *_: setattr(console._server, "should_exit", True))
    try:
        console.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down
        pass
    finally:
        console.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
