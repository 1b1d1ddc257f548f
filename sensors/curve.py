"""Optional CurveZMQ on sensor streams: only known sensors feed the agent.

    python -m sensors.curve create camera --dir keys/sensors        # a publisher's key pair
    python -m sensors.curve create agent --dir keys/sensors         # a subscriber's key pair
    python -m sensors.curve allow agent --dir keys/sensors          # let it subscribe (ZAP allow-list)
    python -m sensors.curve list --dir keys/sensors

Why: on a robot's shared network (a lab Wi-Fi, a fleet VLAN) anyone can connect to a plain
ZeroMQ publisher, read its camera, or bind a look-alike publisher and feed the agent made-up
frames. With Curve the *publisher* binds as the Curve server with its own key pair, and a
subscriber (the agent's intake, ``sensors.record``, ``sensors.inspect``) is the Curve client
configured, per endpoint, with the publisher public key(s) it accepts (the allow-list of
sensors): a publisher without the matching secret key cannot complete the handshake, so
nothing from it is ever received, and the traffic is encrypted. Optionally the publisher
also restricts its subscribers to the public keys in a directory (a ZAP allow-list, as
``runtime.control`` does for operators).

Key files are ``zmq.auth`` certificates, the format ``runtime.keys`` writes: ``NAME.key``
(public, safe to copy) and ``NAME.key_secret`` (mode 0600, stays on its machine). Layout::

    keys/sensors/camera.key(_secret)     a publisher (its secret stays on the sensor host)
    keys/sensors/agent.key(_secret)      a subscriber
    keys/sensors/subscribers/agent.key   a publisher's allow-list of subscribers (optional)

Off by default. A key may also be given inline as its 40-character Z85 text.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from common.atomic import atomic_write
from common.config import cli_exit
from sensors.errors import CurveKeyError

log = logging.getLogger(__name__)

SUBSCRIBERS = "subscribers"  # a publisher's allow-list directory, beside the keys
_Z85 = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


# --------------------------------------------------------------------------- key files
def _check_name(name: str) -> None:
    if not name or name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
        raise CurveKeyError(f"key name {name!r} must be letters, digits, '-', '_' or '.'")


def certificate(public: bytes, secret: bytes | None = None, *, by: str = "sensors.curve") -> bytes:
    """A certificate in the format of ``zmq.auth`` (``load_certificate`` reads it)."""
    kind = "Secret" if secret else "Public"
    text = (f"#   ****  Generated on {datetime.datetime.now()} by continua ({by})  ****\n"
            f"#   ZeroMQ CURVE **{kind}** Certificate\n"
            + ("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n" if secret else "")
            + f"\nmetadata\ncurve\n    public-key = \"{public.decode('ascii')}\"\n")
    if secret:
        text += f"    secret-key = \"{secret.decode('ascii')}\"\n"
    return text.encode("ascii")


def write_key_pair(public_path: Path, secret_path: Path, *, by: str = "sensors.curve") -> bytes:
    """A fresh key pair: the secret file 0600 from its first byte (a 0600 temp file renamed into
    place, never chmodded afterwards: no moment where others can read it), the public one 0644.
    Returns the public certificate's bytes, for allow-lists to hold the same file."""
    public, secret = zmq.curve_keypair()
    public_cert = certificate(public, by=by)
    atomic_write(secret_path, certificate(public, secret, by=by), mode=0o600)
    atomic_write(public_path, public_cert, mode=0o644)
    return public_cert


def too_open(path: Path) -> str | None:
    """Why a secret key file must not be used (group or others may access it, as ssh refuses), or None."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        return (f"secret key {path} is accessible by group or others (mode {mode:04o}): run `chmod 600 {path}` "
                "(and consider the key leaked if others could read it)")
    return None


def create_keys(name: str, key_dir: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (0600) in ``key_dir``; never overwrites without ``force``."""
    _check_name(name)
    root = Path(key_dir)
    pub, sec = root / f"{name}.key", root / f"{name}.key_secret"
    if (pub.exists() or sec.exists()) and not force:
        raise CurveKeyError(f"{pub} already exists; use --force to replace it "
                            "(its peers must then be given the new key)")
    try:
        write_key_pair(pub, sec)
    except OSError as exc:
        raise CurveKeyError(f"cannot write keys into {root}: {exc}") from None
    return pub, sec


def public_key(value: str | Path) -> bytes:
    """A Z85 public key from a certificate file (``.key`` or ``.key_secret``) or inline Z85 text."""
    text = str(value)
    if len(text) == 40 and set(text) <= _Z85 and not Path(text).exists():
        return text.encode("ascii")
    public, _ = _load(Path(text))
    return public


def key_pair(path: str | Path, *, create: str = "python -m sensors.curve create NAME") -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate that only its owner can read;
    ``create`` is the command a missing file's message names."""
    path = Path(path)
    public, secret = _load(path, create)
    if not secret:
        raise CurveKeyError(f"{path} holds no secret key (give the .key_secret file, not the public .key)")
    try:
        why = too_open(path)
    except OSError as exc:
        raise CurveKeyError(f"cannot read secret key {path}: {exc.strerror}") from None
    if why:  # never used, as ssh refuses such a key
        raise CurveKeyError(why)
    return public, secret


def _load(path: Path, create: str = "python -m sensors.curve create NAME") -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise CurveKeyError(f"no CurveZMQ key file {path} (create one with `{create}`)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CurveZMQ key {path}: {exc}") from exc
    if not public:
        raise CurveKeyError(f"{path} holds no public key")
    return public, secret


# --------------------------------------------------------------------------- roles
@dataclass(frozen=True, kw_only=True)
class CurveServer:
    """A publisher's side: its key pair and, optionally, the subscribers it lets in."""

    public: bytes
    secret: bytes
    allow_dir: Path | None = None  # directory of subscriber *.key files; None = any subscriber

    @classmethod
    def from_files(cls, secret_key: str | Path, allow_dir: str | Path = "") -> CurveServer:
        public, secret = key_pair(secret_key)
        allow = Path(allow_dir) if str(allow_dir) else None
        if allow is not None and not allow.is_dir():
            raise CurveKeyError(f"subscriber allow-list {allow} is not a directory of *.key files")
        return cls(public=public, secret=secret, allow_dir=allow)

    def start_authenticator(self, ctx: zmq.Context) -> Any:
        """The ZAP handler of ``ctx`` for the allow-list (None without one). Must run before bind:
        libzmq lets every Curve client in when a context has no ZAP handler."""
        if self.allow_dir is None:
            return None
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
        try:
            auth.start()
        except zmq.ZMQError as exc:
            raise RuntimeError(f"cannot start the ZAP handler ({exc}): a context holds one; give this publisher "
                               "its own zmq.Context") from exc
        auth.configure_curve(domain="*", location=str(self.allow_dir))
        return auth

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


@dataclass(frozen=True, kw_only=True)
class CurveClient:
    """A subscriber's side: its key pair and, per endpoint, the publisher keys it accepts."""

    public: bytes
    secret: bytes
    servers: dict[str, tuple[bytes, ...]] = field(default_factory=dict)

    @classmethod
    def from_files(cls, publisher_keys: Mapping[str, str | Sequence[str]], secret_key: str | Path = "") -> CurveClient:
        """``publisher_keys``: endpoint -> key file(s) of the publisher(s) allowed there (more
        than one while a sensor's key is being replaced). Without ``secret_key`` the client uses
        a fresh key pair, which is fine unless the publisher has a subscriber allow-list."""
        servers: dict[str, tuple[bytes, ...]] = {}
        for endpoint, keys in publisher_keys.items():
            items = [keys] if isinstance(keys, str | Path) else list(keys)
            if not items:
                raise CurveKeyError(f"no publisher key for {endpoint!r}")
            servers[endpoint] = tuple(public_key(k) for k in items)
        public, secret = key_pair(secret_key) if str(secret_key) else zmq.curve_keypair()
        return cls(public=public, secret=secret, servers=servers)

    def check(self, endpoints: Sequence[str]) -> None:
        """Every endpoint needs a publisher key: data from an endpoint without one would be unauthenticated."""
        missing = [ep for ep in endpoints if ep not in self.servers]
        if missing:
            raise CurveKeyError(f"Curve is on but {missing} have no publisher key; known: {sorted(self.servers)}")

    def connect(self, sock: zmq.Socket, endpoint: str) -> None:
        """Connect once per accepted publisher key (options apply to the connects that follow)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        for key in self.servers[endpoint]:
            sock.curve_serverkey = key
            sock.connect(endpoint)


def server_from(secret_key: str, allow_dir: str = "") -> CurveServer | None:
    """A publisher config's Curve fields as a ``CurveServer`` (None: Curve off)."""
    if not secret_key:
        if allow_dir:
            raise CurveKeyError("curve_allow_dir needs curve_secret_key (the publisher's key pair)")
        return None
    return CurveServer.from_files(secret_key, allow_dir)


@dataclass(kw_only=True)
class CurveServerConfig:
    """The Curve fields of every publisher's config (``sensors.publish``, ``sensors.play``,
    ``sensors.bridge``), declared once so that their TOML keys and meaning cannot drift."""

    curve_secret_key: str = ""  # CurveZMQ: this publisher's NAME.key_secret ("" = plain)
    curve_allow_dir: str = ""  # CurveZMQ: directory of the subscriber public keys let in ("" = any)

    def curve_server(self) -> CurveServer | None:
        """These fields as a ``CurveServer`` for ``Publisher(curve=...)`` (None: Curve off)."""
        return server_from(self.curve_secret_key, self.curve_allow_dir)


def client_from(publisher_keys: Mapping[str, Any], secret_key: str = "",
                endpoints: Sequence[str] = ()) -> CurveClient | None:
    """A subscriber config's Curve fields as a ``CurveClient`` (None: Curve off)."""
    if not publisher_keys:
        if secret_key:
            raise CurveKeyError("curve_secret_key needs curve_publisher_keys (endpoint -> publisher key)")
        return None
    client = CurveClient.from_files(publisher_keys, secret_key)
    client.check(endpoints)
    return client


def parse_endpoint_keys(items: Sequence[str] | None) -> dict[str, str] | None:
    """``--curve-key ENDPOINT=KEYFILE`` flags as a mapping (None when there are none)."""
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        endpoint, sep, key = item.rpartition("=")
        if not sep or not endpoint or not key:
            raise CurveKeyError(f"--curve-key {item!r} must be ENDPOINT=KEYFILE")
        out[endpoint] = key
    return out


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensors.curve", description="CurveZMQ key pairs for sensor publishers and subscribers (zmq.auth certificates)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_create = sub.add_parser("create", help="create a key pair NAME.key / NAME.key_secret")
    p_create.add_argument("name")
    p_create.add_argument("--force", action="store_true")
    p_allow = sub.add_parser("allow", help=f"copy NAME.key into {SUBSCRIBERS}/ (a publisher's allow-list)")
    p_allow.add_argument("name")
    sub.add_parser("list", help="list the key files")
    for p in sub.choices.values():
        p.add_argument("--dir", default="keys/sensors", help="key directory (default keys/sensors)")
    args = parser.parse_args(argv)
    return cli_exit(lambda: _command(args), ((CurveKeyError, "error: ", 1),))


def _command(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if args.cmd == "create":
        pub, sec = create_keys(args.name, root, force=args.force)
        print(f"{args.name}: public {public_key(pub).decode()} ({pub}); secret {sec}")
    elif args.cmd == "allow":
        _check_name(args.name)
        src = root / f"{args.name}.key"
        public_key(src)
        (root / SUBSCRIBERS).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / SUBSCRIBERS / src.name)
        print(f"{args.name} may subscribe to publishers whose curve_allow_dir is {root / SUBSCRIBERS}")
    else:
        for path in sorted(root.glob("*.key")) + sorted((root / SUBSCRIBERS).glob("*.key")):
            secret = path.with_suffix(".key_secret").exists()
            print(f"{path}  {public_key(path).decode()}{'  (secret beside it)' if secret else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
