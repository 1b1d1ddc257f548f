"""Access control of the agent: who may command it, and what a command may reach.

Allow-list with roles, loopback
endpoints for ``--insecure``, recording paths inside ``recordings_dir``.

Roles come from where a console's public key lies in the key directory (``runtime.keys``)::

    keys/operators/NAME.key   operator: every command
    keys/viewers/NAME.key     viewer: only ``status``, ``tasks`` and ``ping`` (VIEWER_COMMANDS)

Why checked on every request and not only at the handshake: CurveZMQ asks the ZAP handler
once per connection, so a console connected before its key was revoked would keep control
for as long as its TCP connection lives. ``AccessList`` re-reads both directories when they
change. Before every request it looks at the two directories' mtimes (two ``stat`` calls:
adding, removing or renaming a key file, which is what ``python -m runtime.keys
create/revoke`` do); at every handshake (it is the ZAP callback) and every 0.5 s it also
looks at each key file (a file rewritten in place). So a revocation takes effect on the next
request of a connected console and on every new connection, without a restart.

Why a loopback check for ``--insecure``: without CurveZMQ anyone who can reach the port can
command the robot; on 127.0.0.1 (or ipc/inproc) that is only this machine's users.

Why recording paths are resolved and checked for containment: ``learn-new-task --source
mcap:PATH`` makes the agent open PATH; without a root any operator (or a stolen operator key)
could make it read any file the agent's user can read.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from runtime.errors import EndpointError
from runtime.keys import ALLOW_DIRS, OPERATORS, VIEWERS, allow_list_dir, server_keys

log = logging.getLogger(__name__)

ROLES = ("operator", "viewer")
ROLE_DIRS = ALLOW_DIRS  # role -> directory of keys_dir holding its public keys
VIEWER_COMMANDS = frozenset({"status", "tasks", "ping"})  # what a viewer key may send


@dataclass(frozen=True)
class Grant:
    """An allowed key: the file name it was found under and its role."""

    name: str
    role: str  # "operator" | "viewer"

    def __str__(self) -> str:
        return f"{self.name} ({self.role})"


def forbidden(role: str, cmd: str) -> str | None:
    """None when ``role`` may send ``cmd``; else the refusal message."""
    if role == "operator" or (role == "viewer" and cmd in VIEWER_COMMANDS):
        return None
    return (f"{cmd[:64]!r} is forbidden for role {role} (a {role} key may send only "
            f"{', '.join(sorted(VIEWER_COMMANDS))}; the robot's owner can give you an operator key)")


class AccessList:
    """The allowed public keys (Z85 text, as ZAP reports them in ``User-Id``) and their roles.

    Thread-safe: the ZAP thread calls ``callback`` at each handshake, the control thread
    ``lookup`` at each request. A key in both directories is an operator.
    """

    def __init__(self, keys_dir: str | Path) -> None:
        self.root = Path(keys_dir)
        self.reloads = 0
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        self._signature: tuple | None = None
        self.reload_if_changed()

    def _dirs(self) -> tuple:
        """Two ``stat`` calls: changes when a key file is added, removed or renamed (``keys revoke``)."""
        out = []
        for role in ROLES:
            try:
                st = (self.root / ROLE_DIRS[role]).stat()
                out.append((st.st_ino, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def _scan(self) -> tuple:
        """``_dirs`` plus every key file's mtime, size and inode: also sees a file rewritten in place."""
        files: list[tuple] = []
        for role in ROLES:
            try:
                with os.scandir(self.root / ROLE_DIRS[role]) as it:
                    entries = sorted((e for e in it if e.name.endswith(".key")), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                try:
                    st = e.stat()
                except OSError:  # removed between the listing and the stat: the next scan differs again
                    continue
                files.append((role, e.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return self._dirs(), tuple(files)

    def _load(self) -> dict[str, Grant]:
        grants: dict[str, Grant] = {}
        for role in reversed(ROLES):  # operators last: a key in both directories keeps every right
            d = self.root / ROLE_DIRS[role]
            for path in sorted(d.glob("*.key")) if d.is_dir() else []:
                try:
                    public, _ = zmq.auth.load_certificate(path)
                except (OSError, ValueError) as exc:
                    log.warning("allow-list: unreadable key %s skipped: %s", path, exc)
                    continue
                grants[public.decode("ascii", "replace")] = Grant(path.stem, role)
        return grants

    def reload_if_changed(self, *, full: bool = True) -> bool:
        """Re-read the key directories if they changed since the last read; True if they did.

        ``full=False`` (before each request) looks at the directories only: adding, removing or
        renaming a key, which is what ``keys create/revoke`` do. ``full=True`` (each handshake,
        and every 0.5 s) also sees a key file rewritten in place."""
        if not full:
            dirs = self._dirs()
            with self._lock:
                if self._signature is not None and dirs == self._signature[0]:
                    return False
        sig = self._scan()  # taken before reading: a change during the read shows up next time
        with self._lock:
            if sig == self._signature:
                return False
        grants = self._load()
        with self._lock:
            self._grants, self._signature = grants, sig
            self.reloads += 1
        counts = self.counts()
        log.info("allow-list %s: %d operator key(s), %d viewer key(s)", self.root, counts["operator"],
                 counts["viewer"])
        if not grants:
            log.warning("allow-list %s/{%s,%s} is empty: no console can connect (python -m runtime.keys "
                        "create NAME [--role viewer])", self.root, OPERATORS, VIEWERS)
        return True

    def lookup(self, user: str | None) -> Grant | None:
        """The grant of a ZAP ``User-Id`` (Z85 public key), None when it is not allowed (any more)."""
        if not user:
            return None
        with self._lock:
            return self._grants.get(user)

    def check(self, user: str | None) -> Grant | None:
        """``lookup`` after re-reading the directories if they changed: the per-request check."""
        self.reload_if_changed(full=False)
        return self.lookup(user)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials provider (``configure_curve_callback``): is this Z85 client key allowed?"""
        try:
            self.reload_if_changed()
            return self.lookup(key.decode("ascii", "replace")) is not None
        except Exception:  # an exception would end the ZAP thread, and with it every handshake
            log.exception("allow-list check failed: key refused")
            return False

    def counts(self) -> dict[str, int]:
        with self._lock:
            roles = [g.role for g in self._grants.values()]
        return {role: roles.count(role) for role in ROLES}


def serve_curve(ctx: zmq.Context, sock: zmq.Socket, keys_dir: str | Path) -> tuple[AccessList, Any]:
    """Make ``sock`` a CurveZMQ server with the agent's keys whose ZAP handler asks a new
    ``AccessList``; returns it and the started authenticator (``stop()`` it with the socket).
    ``KeyFileError`` for a missing or unprotected server key."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = server_keys(keys_dir)
    allow_list_dir(keys_dir)
    access = AccessList(keys_dir)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("runtime.control.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=access)
    return access, auth


# --------------------------------------------------------------------------- endpoints
def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: ipc://, inproc://, or tcp:// on a loopback
    address (127.0.0.0/8, ::1, ``localhost``, interface ``lo``). ``*``, 0.0.0.0 and any other
    name are not (names are not resolved: a name could point anywhere tomorrow)."""
    scheme, sep, rest = str(endpoint).partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme not in ("tcp", "ws"):
        return False
    for part in rest.split(";"):  # tcp://SOURCE;DESTINATION when connecting
        hostport = part.split("/", 1)[0]
        host = hostport.rpartition(":")[0] if ":" in hostport else hostport
        host = host.strip("[]")
        if host in ("localhost", "lo"):
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def check_insecure_endpoint(endpoint: str, what: str = "control endpoint") -> None:
    """``EndpointError`` unless ``endpoint`` is loopback: ``--insecure`` never leaves this machine."""
    if not is_loopback(endpoint):
        raise EndpointError(f"--insecure refuses the {what} {endpoint}: without CurveZMQ it must be a loopback "
                            "address (tcp://127.0.0.1:PORT, ipc://...); use keys for anything else "
                            "(python -m runtime.keys)")


def bind(sock: zmq.Socket, endpoint: str, what: str = "control endpoint") -> None:
    """``sock.bind`` whose failure (port in use, no such address) is one ``EndpointError`` line."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        hint = " (another agent running? pick another port)" if exc.errno == zmq.EADDRINUSE else ""
        raise EndpointError(f"cannot bind the {what} {endpoint}: {zmq.strerror(exc.errno)}{hint}") from None


# --------------------------------------------------------------------------- recordings
def contained_file(text: str, root: str | Path | None, *, noun: str, where: str) -> Path:
    """The file ``text`` names, relative to ``root`` or absolute inside it, resolved.

    ``..`` is refused outright, and symlinks are resolved before the containment check, so
    neither can leave ``root``: an operator key must not make the agent open arbitrary files.
    ``root=None`` (a console, which cannot see the robot's disk) checks the form only and returns
    ``Path(text)``. ``noun`` names the file in messages ("recording"), ``where`` the config key of
    ``root``. ``ValueError`` names the problem.
    """
    p = Path(text)
    if ".." in p.parts:
        raise ValueError(f"{noun} path {text!r}: '..' is not allowed (paths are inside the agent's {where})")
    if root is None:
        return p
    base = Path(root).resolve()
    if not base.is_dir():
        raise ValueError(f"no {noun}s directory {base} on the robot ({where}): copy {noun}s there first")
    full = (p if p.is_absolute() else base / p).resolve()  # follows symlinks
    if not full.is_relative_to(base):
        raise ValueError(f"{noun} path {text!r} is outside the {noun}s directory {base}"
                         + (" (a symlink leads out of it)" if not p.is_absolute() else ""))
    if not full.is_file():
        raise ValueError(f"no {noun} {text!r} in {base}")
    return full


def recording_path(text: str, recordings_dir: str | Path | None) -> str:
    """A recording named by an ``mcap:`` source, as an absolute path inside ``recordings_dir``
    (``contained_file``); ``recordings_dir=None`` returns ``text`` unchanged after the form check."""
    if not text or "\x00" in text:
        raise ValueError("an mcap source needs a non-empty recording path per label")
    full = contained_file(text, recordings_dir, noun="recording", where="[agent] recordings_dir")
    return text if recordings_dir is None else str(full)
