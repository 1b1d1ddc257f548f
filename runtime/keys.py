"""CurveZMQ keys for the control channel: create, list and revoke them.

Usage::

    python -m runtime.keys create server                # the agent's key pair
    python -m runtime.keys create alice                 # an operator: secret + allow-list entry
    python -m runtime.keys create wall --role viewer    # a viewer: status, tasks and ping only
    python -m runtime.keys list [--dir keys/] [--json]  # every key with its role
    python -m runtime.keys revoke alice                 # remove alice from the allow-list

Layout of the key directory (default ``keys/``)::

    keys/server.key            agent public key   (copy to every console machine)
    keys/server.key_secret     agent secret key   (stays on the robot, mode 0600)
    keys/operators/NAME.key    allow-list, role operator: every command
    keys/viewers/NAME.key      allow-list, role viewer: status, tasks, ping (runtime.access)
    keys/clients/NAME.key      console NAME's public key
    keys/clients/NAME.key_secret  console NAME's secret key (stays with its user, 0600)

Why files in a directory: the agent reads the allow-list straight from ``operators/`` and
``viewers/`` (``runtime.access.AccessList``), adding a console is copying one public file, and
revoking is deleting it. The agent re-reads both directories when they change, at every
handshake and before every request: a revoked console is refused from its next request on,
connected or not, with no restart. Nothing is ever overwritten without ``--force``:
regenerating the server key locks every console out.

Why secret keys are written 0600 from the first byte (``atomic_write(mode=0o600)``) and
refused when group or others may read them, as ssh does: a secret key another user can read
is that user's key.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from common.atomic import atomic_write
from common.config import cli_exit
from runtime.errors import KeyFileError
from sensors.curve import key_pair, write_key_pair
from sensors.errors import CurveKeyError

log = logging.getLogger(__name__)

SERVER = "server"
OPERATORS = "operators"
VIEWERS = "viewers"
CLIENTS = "clients"
ALLOW_DIRS = {"operator": OPERATORS, "viewer": VIEWERS}  # role -> allow-list directory


@dataclass(frozen=True, kw_only=True)
class KeyInfo:
    name: str
    role: str  # "server" | "operator" | "viewer" | "none" (a console key on no allow-list: revoked)
    public: str  # Z85 text
    has_secret: bool
    allowed: bool  # console: present in operators/ or viewers/ (server: always True)
    path: Path


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be letters, digits, '-', '_' or '.'")


def create(name: str, key_dir: str | Path = "keys", *, force: bool = False, role: str = "operator") -> KeyInfo:
    """Create the ``server`` key pair, or a console pair added to the allow-list of ``role``."""
    _check_name(name)
    if role not in ALLOW_DIRS:
        raise KeyFileError(f"role={role!r} must be one of {sorted(ALLOW_DIRS)}")
    root = Path(key_dir)
    target = root if name == SERVER else root / CLIENTS
    pub, sec = target / f"{name}.key", target / f"{name}.key_secret"
    if (pub.exists() or sec.exists()) and not force:
        raise KeyFileError(f"{pub} already exists; use --force to replace it (old keys stop working)")
    try:
        public_cert = write_key_pair(pub, sec, by="runtime.keys")  # the secret 0600 from its first byte
        if name != SERVER:
            for other, sub in ALLOW_DIRS.items():  # --force may change the role: one allow-list entry only
                if other != role:
                    (root / sub / f"{name}.key").unlink(missing_ok=True)
            atomic_write(root / ALLOW_DIRS[role] / f"{name}.key", public_cert, mode=0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write keys into {root}: {exc}") from None
    log.info("created %s key pair %s", "server" if name == SERVER else role, sec)
    return _info(name, pub, root)


def revoke(name: str, key_dir: str | Path = "keys") -> bool:
    """Remove a console from the allow-lists; True when it was on one."""
    _check_name(name)
    found = False
    for sub in ALLOW_DIRS.values():
        path = Path(key_dir) / sub / f"{name}.key"
        if path.exists():
            path.unlink()
            found = True
    return found


def _public_z85(path: Path) -> str:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read CurveZMQ key {path}: {exc}") from exc
    return public.decode("ascii")


def role_of(name: str, root: Path) -> str:
    """The allow-list role of console ``name``: operator wins over viewer, "none" on neither."""
    for role in ("operator", "viewer"):
        if (root / ALLOW_DIRS[role] / f"{name}.key").exists():
            return role
    return "none"


def _info(name: str, pub: Path, root: Path) -> KeyInfo:
    if name == SERVER and pub.parent == root:
        return KeyInfo(name=name, role="server", public=_public_z85(pub),
                       has_secret=pub.with_suffix(".key_secret").exists(), allowed=True, path=pub)
    role = role_of(name, root)
    return KeyInfo(name=name, role=role, public=_public_z85(pub),
                   has_secret=(root / CLIENTS / f"{name}.key_secret").exists(), allowed=role != "none", path=pub)


def list_keys(key_dir: str | Path = "keys") -> list[KeyInfo]:
    """Server key (if any), then every console found in clients/, operators/ or viewers/."""
    root = Path(key_dir)
    out: list[KeyInfo] = []
    if (root / f"{SERVER}.key").exists():
        out.append(_info(SERVER, root / f"{SERVER}.key", root))
    names: dict[str, Path] = {}
    for sub in (OPERATORS, VIEWERS, CLIENTS):
        for p in sorted((root / sub).glob("*.key")) if (root / sub).is_dir() else []:
            names.setdefault(p.stem, p)
    out.extend(_info(n, names[n], root) for n in sorted(names))
    return out


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key file that only its owner can read (``KeyFileError`` otherwise)."""
    try:
        return key_pair(path, create="python -m runtime.keys create NAME")
    except CurveKeyError as exc:
        raise KeyFileError(str(exc)) from None


def server_keys(key_dir: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) of the agent, for ``curve_publickey``/``curve_secretkey``."""
    path = Path(key_dir) / f"{SERVER}.key_secret"
    if not path.exists():
        raise KeyFileError(f"no server key {path}: run `python -m runtime.keys create server --dir {key_dir}`")
    return load_secret(path)


def server_public_key(key_dir: str | Path) -> bytes:
    """The agent's public key, which a console needs to connect."""
    path = Path(key_dir) / f"{SERVER}.key"
    if not path.exists():
        raise KeyFileError(f"no server public key {path}: copy it from the robot's key directory")
    return _public_z85(path).encode("ascii")


def client_keys(key_dir: str | Path, name: str | None = None) -> tuple[bytes, bytes]:
    """(public, secret) of console key ``name``; ``None`` picks the only one in clients/."""
    clients = Path(key_dir) / CLIENTS
    if name is None:
        found = sorted(clients.glob("*.key_secret")) if clients.is_dir() else []
        if len(found) != 1:
            raise KeyFileError(
                f"{len(found)} console keys in {clients}; name one with --key-name "
                f"(create one with `python -m runtime.keys create NAME --dir {key_dir}`)")
        path = found[0]
    else:
        _check_name(name)
        path = clients / f"{name}.key_secret"
    if not path.exists():
        raise KeyFileError(f"no console key {path}: run `python -m runtime.keys create {name} --dir {key_dir}`")
    return load_secret(path)


def allow_list_dir(key_dir: str | Path) -> Path:
    """The directory of allowed operator public keys (created empty if missing)."""
    path = Path(key_dir) / OPERATORS
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.keys", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_create = sub.add_parser("create", help="create 'server' or a console key pair (operator or viewer)")
    p_create.add_argument("name")
    p_create.add_argument("--role", choices=sorted(ALLOW_DIRS), default="operator",
                          help="operator: every command (default); viewer: status, tasks and ping only")
    p_create.add_argument("--force", action="store_true", help="replace existing keys")
    p_list = sub.add_parser("list", help="list keys with their roles and the allow-lists")
    p_list.add_argument("--json", action="store_true")
    p_revoke = sub.add_parser("revoke", help="remove a console from the allow-lists (operators/ and viewers/)")
    p_revoke.add_argument("name")
    for p in (p_create, p_list, p_revoke):
        p.add_argument("--dir", default="keys", help="key directory (default: keys/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return cli_exit(lambda: _command(args), ((KeyFileError, "error: ", 1),))


def _command(args: argparse.Namespace) -> int:
    if args.cmd == "create":
        info = create(args.name, args.dir, force=args.force, role=args.role)
        print(f"{info.role} {info.name}: public {info.public} ({info.path})")
    elif args.cmd == "revoke":
        if not revoke(args.name, args.dir):
            print(f"{args.name} is not on the allow-list in {args.dir}", file=sys.stderr)
            return 1
        print(f"revoked {args.name}: a running agent refuses it from the next request of any console "
              "connected with it, and at every new connection (no restart needed)")
    else:
        keys = list_keys(args.dir)
        if args.json:
            print(json.dumps([{**k.__dict__, "path": str(k.path)} for k in keys]))
        for k in [] if args.json else keys:
            flags = ("secret " if k.has_secret else "") + ("allowed" if k.allowed else "NOT allowed")
            print(f"{k.role:8s} {k.name:20s} {k.public}  {flags}")
        if not keys and not args.json:
            print(f"no keys in {args.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
