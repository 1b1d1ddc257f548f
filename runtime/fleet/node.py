"""The ``flower-supernode`` command of a real robot: what connects its spool to the fleet's SuperLink.

Why a command and not an in-process client: Flower 1.42 runs a ClientApp only inside a SuperNode,
which fetches the app from the SuperLink and starts it in its own process (``--isolation
subprocess``); the robot's agent keeps running whether the SuperNode is up, down or restarting,
since the two only share the spool directory. The node config carries the spool path and the
robot's name (the ClientApp reads them, ``runtime.fleet.apps``).

Transport security: TLS by default (the SuperLink's certificate checked against
``root_certificates``, or the system's CAs). ``insecure`` (plain text) is refused for any address
but loopback, because skill packages are signed but not encrypted: their class names and
exemplars would cross the network readable by anyone on it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ISOLATIONS = ("subprocess", "process")
_UNSAFE = ('"', "\\", "\n", "\r", "\t")


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ``ValueError`` naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"SuperLink address {address!r} must be host:port (e.g. fleet.example.org:9092 or "
                         "[::1]:9092)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"SuperLink address {address!r}: unbalanced brackets around the IPv6 host")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"SuperLink address {address!r}: write an IPv6 host in brackets, e.g. [::1]:9092")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1); a name is not resolved."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _node_config_value(name: str, value: str) -> str:
    if any(c in value for c in _UNSAFE) or not value:
        raise ValueError(f"{name}={value!r} cannot be passed in --node-config (empty, or holds a quote, a "
                         "backslash or a control character)")
    return f'{name}="{value}"'


def supernode_executable() -> str:
    """``flower-supernode`` beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("flower-supernode")
    if beside.exists():
        return str(beside)
    return shutil.which("flower-supernode") or "flower-supernode"


def supernode_command(address: str, *, spool: str | Path, robot: str, root_certificates: str | Path | None = None,
                      insecure: bool = False, auth_private_key: str | Path | None = None,
                      isolation: str = "subprocess", runtime_port: int | None = None) -> list[str]:
    """The ``flower-supernode`` 1.42 argument list for this robot; ``ValueError`` for a combination
    that is unsafe or that the SuperNode would reject. ``runtime_port``: the port of the SuperNode's
    local runtime API (Flower's default 9094; two SuperNodes on one host need two)."""
    host, _ = split_address(address)
    if insecure and not is_loopback(host):
        raise ValueError(f"insecure=True (plain-text gRPC) is refused for the non-loopback SuperLink {address!r}: "
                         "give root_certificates (the CA of the SuperLink's TLS certificate) instead")
    if insecure and root_certificates is not None:
        raise ValueError("insecure=True and root_certificates are exclusive: plain text has no certificates")
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation={isolation!r} must be one of {ISOLATIONS}")
    cmd = [supernode_executable(), "--superlink", address]
    if insecure:
        cmd.append("--insecure")
    if root_certificates is not None:
        cmd += ["--root-certificates", str(Path(root_certificates).resolve())]
    if auth_private_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(auth_private_key).resolve())]
    config = " ".join([_node_config_value("spool", str(Path(spool).resolve())), _node_config_value("robot", robot)])
    cmd += ["--node-config", config, "--isolation", isolation]
    return cmd + ([] if runtime_port is None else ["--port", str(int(runtime_port))])


def start_supernode(address: str, *, spool: str | Path, robot: str, root_certificates: str | Path | None = None,
                    insecure: bool = False, auth_private_key: str | Path | None = None,
                    isolation: str = "subprocess", runtime_port: int | None = None,
                    **popen: Any) -> subprocess.Popen:
    """Start the robot's SuperNode (its own session, so that stopping it stops its ClientApps too),
    with Flower's telemetry off unless the environment says otherwise and this interpreter's
    ``bin`` on ``PATH`` (the SuperNode starts ``flower-superexec`` by name). ``popen``: more
    ``subprocess.Popen`` arguments (``stdout``, ``cwd``...)."""
    from runtime.fleet.spool import Spool

    Spool(spool, robot)  # the directories exist before the first ClientApp looks for them
    cmd = supernode_command(address, spool=spool, robot=robot, root_certificates=root_certificates,
                            insecure=insecure, auth_private_key=auth_private_key, isolation=isolation,
                            runtime_port=runtime_port)
    env = {**os.environ, **(popen.pop("env", None) or {})}
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    popen.setdefault("start_new_session", True)
    log.info("starting the SuperNode of robot %s: %s", robot, " ".join(cmd))
    return subprocess.Popen(cmd, env=env, **popen)
