"""CurveZMQ keys for the control channel: create and list them.

Usage::

    python -m runtime.keys create server            # the agent's key pair
    python -m runtime.keys create alice             # an operator: secret + allow-list entry
    python -m runtime.keys list [--dir keys/] [--json]
    python -m runtime.keys revoke alice             # remove alice from the allow-list

Layout of the key directory (default ``keys/``)::

    keys/server.key            agent public key   (copy to every console machine)
    keys/server.key_secret     agent secret key   (stays on the robot, mode 0600)
    keys/operators/NAME.key    allow-list: public keys the agent accepts (one file each)
    keys/clients/NAME.key      operator NAME's public key
    keys/clients/NAME.key_secret  operator NAME's secret key (stays with the operator, 0600)

Why files in a directory: ``zmq.auth`` reads the allow-list straight from
``keys/operators/`` (``configure_curve(location=...)``), adding an operator is copying one
public file, and revoking is deleting it. Nothing is ever overwritten without ``--force``:
regenerating the server key locks every console out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from runtime.errors import KeyFileError

log = logging.getLogger(__name__)

SERVER = "server"
OPERATORS = "operators"
CLIENTS = "clients"


@dataclass(frozen=True, kw_only=True)
class KeyInfo:
    name: str
    role: str  # "server" | "operator"
    public: str  # Z85 text
    has_secret: bool
    allowed: bool  # operator: present in operators/ (server: always True)
    path: Path


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be letters, digits, '-', '_' or '.'")


def _restrict(path: str | Path) -> None:
    os.chmod(path, 0o600)


def create(name: str, key_dir: str | Path = "keys", *, force: bool = False) -> KeyInfo:
    """Create the ``server`` key pair, or an operator pair added to the allow-list."""
    _check_name(name)
    root = Path(key_dir)
    target = root if name == SERVER else root / CLIENTS
    target.mkdir(parents=True, exist_ok=True)
    pub, sec = target / f"{name}.key", target / f"{name}.key_secret"
    if (pub.exists() or sec.exists()) and not force:
        raise KeyFileError(f"{pub} already exists; use --force to replace it (old keys stop working)")
    pub_s, sec_s = zmq.auth.create_certificates(target, name)
    _restrict(sec_s)
    if name != SERVER:
        (root / OPERATORS).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pub_s, root / OPERATORS / f"{name}.key")
    log.info("created %s key pair %s", "server" if name == SERVER else "operator", sec_s)
    return _info(name, Path(pub_s), root)


def revoke(name: str, key_dir: str | Path = "keys") -> bool:
    """Remove an operator from the allow-list; True when it was there."""
    _check_name(name)
    path = Path(key_dir) / OPERATORS / f"{name}.key"
    if not path.exists():
        return False
    path.unlink()
    return True


def _public_z85(path: Path) -> str:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read CurveZMQ key {path}: {exc}") from exc
    return public.decode("ascii")


def _info(name: str, pub: Path, root: Path) -> KeyInfo:
    if name == SERVER and pub.parent == root:
        return KeyInfo(name=name, role="server", public=_public_z85(pub),
                       has_secret=pub.with_suffix(".key_secret").exists(), allowed=True, path=pub)
    return KeyInfo(name=name, role="operator", public=_public_z85(pub),
                   has_secret=(root / CLIENTS / f"{name}.key_secret").exists(),
                   allowed=(root / OPERATORS / f"{name}.key").exists(), path=pub)


def list_keys(key_dir: str | Path = "keys") -> list[KeyInfo]:
    """Server key (if any), then every operator found in clients/ or operators/."""
    root = Path(key_dir)
    out: list[KeyInfo] = []
    if (root / f"{SERVER}.key").exists():
        out.append(_info(SERVER, root / f"{SERVER}.key", root))
    names: dict[str, Path] = {}
    for sub in (OPERATORS, CLIENTS):
        for p in sorted((root / sub).glob("*.key")) if (root / sub).is_dir() else []:
            names.setdefault(p.stem, p)
    out.extend(_info(n, names[n], root) for n in sorted(names))
    return out


def server_keys(key_dir: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) of the agent, for ``curve_publickey``/``curve_secretkey``."""
    path = Path(key_dir) / f"{SERVER}.key_secret"
    if not path.exists():
        raise KeyFileError(f"no server key {path}: run `python -m runtime.keys create server --dir {key_dir}`")
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key")
    return public, secret


def server_public_key(key_dir: str | Path) -> bytes:
    """The agent's public key, which a console needs to connect."""
    path = Path(key_dir) / f"{SERVER}.key"
    if not path.exists():
        raise KeyFileError(f"no server public key {path}: copy it from the robot's key directory")
    return zmq.auth.load_certificate(path)[0]


def client_keys(key_dir: str | Path, name: str | None = None) -> tuple[bytes, bytes]:
    """(public, secret) of operator ``name``; ``None`` picks the only one in clients/."""
    clients = Path(key_dir) / CLIENTS
    if name is None:
        found = sorted(clients.glob("*.key_secret")) if clients.is_dir() else []
        if len(found) != 1:
            raise KeyFileError(
                f"{len(found)} operator keys in {clients}; name one with --key-name "
                f"(create one with `python -m runtime.keys create NAME --dir {key_dir}`)")
        path = found[0]
    else:
        _check_name(name)
        path = clients / f"{name}.key_secret"
    if not path.exists():
        raise KeyFileError(f"no operator key {path}: run `python -m runtime.keys create {name} --dir {key_dir}`")
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key")
    return public, secret


def allow_list_dir(key_dir: str | Path) -> Path:
    """The directory of allowed operator public keys (created empty if missing)."""
    path = Path(key_dir) / OPERATORS
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.keys", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_create = sub.add_parser("create", help="create 'server' or an operator key pair")
    p_create.add_argument("name")
    p_create.add_argument("--force", action="store_true", help="replace existing keys")
    p_list = sub.add_parser("list", help="list keys and the allow-list")
    p_list.add_argument("--json", action="store_true")
    p_revoke = sub.add_parser("revoke", help="remove an operator from the allow-list")
    p_revoke.add_argument("name")
    for p in (p_create, p_list, p_revoke):
        p.add_argument("--dir", default="keys", help="key directory (default: keys/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "create":
            info = create(args.name, args.dir, force=args.force)
            print(f"{info.role} {info.name}: public {info.public} ({info.path})")
        elif args.cmd == "revoke":
            if not revoke(args.name, args.dir):
                print(f"{args.name} is not on the allow-list in {args.dir}", file=sys.stderr)
                return 1
            print(f"revoked {args.name}; restart the agent or send reload-keys")
        else:
            keys = list_keys(args.dir)
            if args.json:
                print(json.dumps([{**k.__dict__, "path": str(k.path)} for k in keys]))
            for k in [] if args.json else keys:
                flags = ("secret " if k.has_secret else "") + ("allowed" if k.allowed else "NOT allowed")
                print(f"{k.role:8s} {k.name:20s} {k.public}  {flags}")
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
