"""``python -m runtime.fleet keygen|server``: the fleet key, and the fleet server for real robots.

Usage::

    python -m runtime.fleet keygen --out /etc/continua/fleet.key
    python -m runtime.fleet server --config fleet.toml     # a [fleet_server] table, see FleetServerConfig

How the server runs on Flower 1.42: a ServerApp cannot be attached to a SuperLink in-process; a
SuperLink runs it, in a ``flwr-serverapp`` process of its own, for a run submitted through its
Control API (``flwr run``) as a Flower App Bundle. So ``server``:

1. writes the app into ``<store_dir>/app/`` (a ``pyproject.toml`` with ``[tool.flwr.app.components]``
   and the run config, and ``fleet_app.py``, two lines importing ``runtime.fleet.apps``) and a
   Flower home ``<store_dir>/flwr-home/`` naming this SuperLink as the CLI's only connection;
2. starts ``flower-superlink`` (subprocess isolation, runtime dependency installation off, state
   in ``<store_dir>/superlink.db``, TLS unless ``insecure``, which only loopback may use);
3. submits the app with ``flwr run`` once the SuperLink listens, and keeps the SuperLink running
   (``rounds = 0``: forever; ``rounds = N``: until N more rounds are in ``rounds.jsonl``).

Robots start ``flower-supernode`` (``runtime.fleet.node``); the SuperLink hands them the app, whose
ClientApp needs only continua installed there (no dependency is installed at run time).
The key never travels: the run config names the key *file* (robots see the run config too).
Caveat of Flower 1.42: the SuperLink serves its Control API on the Fleet API's port, so whoever
reaches the robots' port can also reach ``flwr run``/``flwr stop``; keep that port on the robots'
network (TLS always off loopback) and, for more, enable Flower's SuperNode authentication.
Why ``PATH`` is extended: the SuperLink starts ``flower-superexec`` by name, so the venv's
``bin`` must be on it even when this is started as ``.venv/bin/python -m runtime.fleet``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, add_cli_args, cli_config, cli_exit, read_toml
from runtime.errors import ContinuaRuntimeError
from runtime.fleet.node import is_loopback, split_address
from training.skills import load_key, new_key

log = logging.getLogger("runtime.fleet.server")

TOOLS = ("flower-superlink", "flower-superexec", "flwr-serverapp", "flwr")
CONNECTION = "continua-fleet"
STATUS_EVERY_S = 15.0  # how often the server asks the SuperLink whether the fleet's run still runs


class FleetServerError(ContinuaRuntimeError):
    """The fleet server cannot start or stopped; the message names what is missing or failed."""


@dataclass(kw_only=True)
class FleetServerConfig:
    """The ``[fleet_server]`` table of ``python -m runtime.fleet server`` (the agent reads ``[fleet]``).

    ``superlink``: host:port of the SuperLink; in Flower 1.42 its Fleet API (the robots), Control
    API (``flwr run``) and ServerApp runtime API share this one HTTP port."""

    store_dir: Path = Path("fleet-store")
    key_file: Path = Path("fleet.key")
    rounds: int = 0  # 0: forever (polling; see runtime.fleet.apps)
    round_every_s: float = 300.0
    poll_s: float = 10.0
    min_nodes: int = 1
    reply_timeout_s: float = 120.0
    superlink: str = "127.0.0.1:9092"
    control_address: str = ""  # where `flwr run` reaches it: default superlink (127.0.0.1 for a 0.0.0.0 host)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_ca_certfile: Path | None = None  # what `flwr run` checks the certificate against (default: the cert)
    insecure: bool = False
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        host, _ = split_address(self.superlink)
        if self.control_address:
            split_address(self.control_address)
        for name in ("round_every_s", "poll_s", "reply_timeout_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FleetServerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.rounds < 0 or self.min_nodes < 1:
            raise ValueError(f"FleetServerConfig.rounds must be >= 0 and min_nodes >= 1, got {self.rounds!r}, "
                             f"{self.min_nodes!r}")
        if self.insecure and not is_loopback(host):
            raise ValueError(f"--insecure is refused for the non-loopback superlink "
                             f"{self.superlink!r}: give tls_certfile and tls_keyfile")
        if not self.insecure and (self.tls_certfile is None or self.tls_keyfile is None):
            raise ValueError("FleetServerConfig needs tls_certfile and tls_keyfile (or --insecure on a "
                             "loopback superlink)")


def control_address(cfg: FleetServerConfig) -> str:
    """Where this host's ``flwr`` CLI reaches the SuperLink (a TLS certificate must name it)."""
    if cfg.control_address:
        return cfg.control_address
    host, port = split_address(cfg.superlink)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else cfg.superlink


def _toml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_app(cfg: FleetServerConfig) -> tuple[Path, Path]:
    """The Flower app directory and Flower home of this server, (re)written from ``cfg``."""
    store = cfg.store_dir.resolve()
    app, home = store / "app", store / "flwr-home"
    app.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    run_config = {"store-dir": str(store), "key-file": str(cfg.key_file.resolve()), "rounds": cfg.rounds,
                  "round-every-s": cfg.round_every_s, "poll-s": cfg.poll_s, "min-nodes": cfg.min_nodes,
                  "reply-timeout-s": cfg.reply_timeout_s}
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "continua-fleet"', 'version = "1.0.0"',
             'description = "continua: robots share skill packages"', 'license = "Apache-2.0"', "dependencies = []",
             "", "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "", "[tool.flwr.app]",
             'publisher = "continua"', "", "[tool.flwr.app.components]", 'serverapp = "fleet_app:server"',
             'clientapp = "fleet_app:client"', "", "[tool.flwr.app.config]"]
    lines += [f"{k} = {_toml_str(v) if isinstance(v, str) else json.dumps(v)}" for k, v in run_config.items()]
    (app / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (app / "fleet_app.py").write_text('"""The continua fleet as a Flower app (written by python -m runtime.fleet '
                                      'server)."""\n\nfrom runtime.fleet.apps import deployed_server_app, '
                                      "make_client_app\n\nserver = deployed_server_app()\nclient = make_client_app()\n")
    conn = [f"address = {_toml_str(control_address(cfg))}"]
    conn += ["insecure = true"] if cfg.insecure else \
        [f"root-certificates = {_toml_str((cfg.tls_ca_certfile or cfg.tls_certfile).resolve())}"]  # type: ignore[union-attr]
    (home / "config.toml").write_text("\n".join(["[superlink]", f'default = "{CONNECTION}"', "",
                                                 f"[superlink.{CONNECTION}]", *conn]) + "\n")
    return app, home


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise FleetServerError(f"{name} is missing beside {sys.executable}: install the fleet extra "
                               "(pip install -e '.[fleet]', Flower 1.42)")
    return str(path)


def superlink_command(cfg: FleetServerConfig) -> list[str]:
    host, port = split_address(cfg.superlink)
    cmd = [_tool("flower-superlink"), "--isolation", "subprocess", "--disable-runtime-dependency-installation",
           "--database", str(cfg.store_dir.resolve() / "superlink.db"), "--host", host, "--port", str(port)]
    if cfg.insecure:
        return [*cmd, "--insecure"]
    cmd += ["--ssl-certfile", str(cfg.tls_certfile), "--ssl-keyfile", str(cfg.tls_keyfile)]
    return cmd + (["--ssl-ca-certfile", str(cfg.tls_ca_certfile)] if cfg.tls_ca_certfile else [])


def _listening(address: str) -> bool:
    try:
        with socket.create_connection(split_address(address), timeout=1.0):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _flwr(args: list[str], env: dict[str, str], cfg_timeout_s: float) -> dict:
    """``flwr ARGS --format json`` against this server's SuperLink, its JSON reply."""
    res = subprocess.run([_tool("flwr"), *args, CONNECTION, "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=cfg_timeout_s, check=False, cwd=env["FLWR_HOME"])
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError:
        out = {}
    if res.returncode != 0 or not out.get("success", False):
        raise FleetServerError(f"flwr {args[0]} failed ({res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()[-500:]}")
    return out


def _submit(cfg: FleetServerConfig, app: Path, env: dict[str, str]) -> str:
    run_id = str(_flwr(["run", str(app)], env, cfg.start_timeout_s).get("run-id"))
    log.info("fleet app submitted to the SuperLink on %s as run %s", cfg.superlink, run_id)
    return run_id


def _check_run(run_id: str, env: dict[str, str]) -> None:
    """FleetServerError once the fleet's run has finished (the ServerApp failed or was stopped)."""
    runs = _flwr(["ls", "--run-id", run_id], env, 60.0).get("runs") or [{}]
    status = str(runs[0].get("status", ""))
    if status.startswith("finished"):
        raise FleetServerError(f"the fleet's run {run_id} ended ({status}: {runs[0].get('status-details', '')}); "
                               "see the SuperLink's log above")


def run_server(cfg: FleetServerConfig) -> int:
    """Start the SuperLink, submit the fleet's app, keep serving (see the module docstring)."""
    from runtime.fleet.store import read_rounds

    load_key(cfg.key_file)  # fail here, not in a process the SuperLink starts
    for name in TOOLS:
        _tool(name)
    if _listening(control_address(cfg)):
        raise FleetServerError(f"something already listens on {cfg.superlink}: another SuperLink? stop it or "
                               "change [fleet_server] superlink")
    app, home = write_app(cfg)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    done_before = len(read_rounds(cfg.store_dir))
    link = subprocess.Popen(superlink_command(cfg), env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        deadline = time.monotonic() + cfg.start_timeout_s
        while not _listening(control_address(cfg)):
            if link.poll() is not None:
                raise FleetServerError(f"flower-superlink exited with code {link.returncode} before listening on "
                                       f"{cfg.superlink} (its log is above)")
            if time.monotonic() > deadline:
                raise FleetServerError(f"flower-superlink did not listen on {cfg.superlink} within "
                                       f"{cfg.start_timeout_s} s")
            time.sleep(0.5)
        run_id = _submit(cfg, app, env)
        checked = time.monotonic()
        while link.poll() is None:
            if cfg.rounds and len(read_rounds(cfg.store_dir)) - done_before >= cfg.rounds:
                log.info("%d round(s) done; stopping the SuperLink", cfg.rounds)
                return 0
            if time.monotonic() - checked > STATUS_EVERY_S:
                _check_run(run_id, env)
                checked = time.monotonic()
            time.sleep(1.0)
        raise FleetServerError(f"flower-superlink exited with code {link.returncode}")
    finally:
        _stop(link)


def _keygen(args: argparse.Namespace) -> int:
    path = new_key(args.out, force=args.force)
    logging.getLogger("runtime.fleet").info("wrote a new fleet key to %s (mode 600): copy it to every robot", path)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="write a new fleet key (32 random bytes, hex, mode 600)")
    keygen.add_argument("--out", required=True, type=Path)
    keygen.add_argument("--force", action="store_true", help="replace an existing key (locks every robot out)")
    server = sub.add_parser("server", help="run the fleet server (SuperLink + the fleet's ServerApp)")
    add_cli_args(server, "fleet_server")
    server.add_argument("--insecure", action="store_true", default=None,
                        help="no TLS (a loopback superlink only, development only; a flag only, refused in the file)")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return cli_exit(lambda: _keygen(args), ((FileExistsError, "error: ", 1),))
    if args.config and "insecure" in (read_toml(args.config).get("fleet_server") or {}):
        print(f"config error: [fleet_server] insecure in {args.config}: 'insecure' is a command-line flag only "
              "(--insecure, loopback only), as for the agent and the console; remove it from the file", file=sys.stderr)
        return 2
    cfg = cli_config(FleetServerConfig, args, "fleet_server", insecure=args.insecure)
    if cfg is None:
        return 2
    return cli_exit(lambda: run_server(cfg), ((FleetServerError, "fleet server: ", 1),
                                              ((ValueError, ConfigError), "fleet server: ", 2)))


if __name__ == "__main__":
    sys.exit(main())
