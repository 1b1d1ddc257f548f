"""The robot-side spool directory: the only contract between the agent and the fleet's ClientApp.

Why a directory and not a call: the agent (which exports and imports skill packages) and the
Flower ClientApp (which moves them) run in different processes, started by different programs
(the agent by ``runtime.launch``, the ClientApp by ``flower-supernode``), and either may be down
while the other runs. Files survive that; every write is atomic (``common.atomic``), so a power
cut leaves the old file or the new one.

Layout under ``root``::

    robot                    the robot's fleet name (the simulation's ClientApp reads it)
    outbox/<id>.skill        packages the agent exported, waiting for (or past) upload
    inbox/<id>.skill         packages received from the fleet, not yet settled by the agent
    inbox/imported/          ... that the agent imported
    inbox/refused/           ... that it refused, each beside <id>.reason.json
    state.json               ids the server acked (uploaded) and ids ever received
    offline                  marker: the robot is out of reach (simulates lost connectivity)

Who writes what: the agent writes ``outbox/`` and settles ``inbox/``; only the ClientApp writes
``state.json`` (under a lock file all the same, so a second ClientApp run cannot lose an update).
Nothing is ever deleted: a settled package is moved, a corrupt ``state.json`` is moved aside and
rebuilt from the directory contents, because the ids it lists can be recovered from file names
(the outbox may then be uploaded once more, which the server's store ignores as a duplicate).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write, fsync_dir
from training.skills import read_header, skill_id

log = logging.getLogger(__name__)

SUFFIX = ".skill"
STATE_FORMAT = 1


@dataclass
class SpoolState:
    """What ``state.json`` holds: ids the server acked, ids the fleet delivered here."""

    uploaded: set[str] = field(default_factory=set)
    received: set[str] = field(default_factory=set)

    def to_bytes(self, robot: str) -> bytes:
        return json.dumps({"format": STATE_FORMAT, "robot": robot, "uploaded": sorted(self.uploaded),
                           "received": sorted(self.received)}, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes) -> SpoolState:
        """The state in ``data``; ``ValueError`` naming what is wrong with it."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise ValueError(f"not a format-{STATE_FORMAT} spool state")
        lists = [raw.get("uploaded"), raw.get("received")]
        if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists):
            raise ValueError("'uploaded'/'received' are not lists of ids")
        return cls(uploaded=set(lists[0]), received=set(lists[1]))


def robot_name(root: str | Path, default: str) -> str:
    """The name recorded in ``root/robot`` (written by ``Spool``), else ``default``."""
    try:
        name = (Path(root) / "robot").read_text().strip()
    except OSError:
        return default
    return name or default


def _ids(directory: Path) -> list[str]:
    return [p.name[: -len(SUFFIX)] for p in directory.glob(f"*{SUFFIX}") if p.is_file()]


def _oldest_first(paths: Iterable[Path]) -> list[Path]:
    def key(p: Path) -> tuple[float, str]:
        try:
            return p.stat().st_mtime, p.name
        except OSError:
            return float("inf"), p.name

    return sorted(paths, key=key)


class Spool:
    """<root>/outbox/*.skill (the agent puts packages it exported), <root>/inbox/<id>.skill (the
    ClientApp puts received ones), <root>/inbox/imported/, <root>/inbox/refused/ (+ <id>.reason.json),
    <root>/state.json (ids uploaded/acked by the server, ids received), <root>/offline (marker file:
    simulation of a robot out of reach).

    The state is read from disk by every call, never cached: the agent and the ClientApp each hold
    their own ``Spool`` on the same directory."""

    def __init__(self, root: str | Path, robot: str) -> None:
        if not robot or any(c.isspace() for c in robot) or "/" in robot:
            raise ValueError(f"robot={robot!r} must be a non-empty name without spaces or '/'")
        self.root = Path(root)
        self.robot = robot
        self.outbox = self.root / "outbox"
        self.inbox = self.root / "inbox"
        self.imported = self.inbox / "imported"
        self.refused = self.inbox / "refused"
        self.state_path = self.root / "state.json"
        for d in (self.outbox, self.imported, self.refused):
            d.mkdir(parents=True, exist_ok=True)
        if robot_name(self.root, "") != robot:
            if (self.root / "robot").exists():
                log.warning("spool %s was robot %r; it is now %r", self.root, robot_name(self.root, ""), robot)
            atomic_write(self.root / "robot", (robot + "\n").encode())

    # ---- state -------------------------------------------------------------------------------
    @property
    def offline_marker(self) -> Path:
        return self.root / "offline"

    @property
    def offline(self) -> bool:
        """True while the ``offline`` marker exists (the ClientApp then refuses to answer)."""
        return self.offline_marker.exists()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _rebuilt(self) -> SpoolState:
        """The state recoverable from the files: every package in the inbox was received."""
        received = set(_ids(self.inbox)) | set(_ids(self.imported)) | set(_ids(self.refused))
        return SpoolState(uploaded=set(), received=received)

    def _load(self) -> SpoolState:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return self._rebuilt()
        try:
            return SpoolState.parse(data)
        except ValueError as exc:
            return self._recover(exc)

    def _recover(self, exc: ValueError) -> SpoolState:
        """Move a corrupt ``state.json`` aside (kept for a person) and rebuild the state from the
        files; the next update writes the rebuilt one under the lock."""
        aside = self.state_path.with_name(f"state.json.corrupt-{time.time_ns()}")
        state = self._rebuilt()
        try:
            os.replace(self.state_path, aside)
        except FileNotFoundError:
            return state  # the other process on this spool recovered it first
        fsync_dir(self.root)
        log.warning("spool %s: state.json is corrupt (%s); moved to %s and rebuilt from the directory "
                    "(%d received ids; outbox packages will be offered again)", self.root, exc, aside.name,
                    len(state.received))
        return state

    def _update(self, *, uploaded: Iterable[str] = (), received: Iterable[str] = ()) -> None:
        with self._locked():
            state = self._load()
            up, rec = set(uploaded) - state.uploaded, set(received) - state.received
            if up or rec or not self.state_path.exists():  # a missing (or recovered) file is written
                state.uploaded |= up
                state.received |= rec
                atomic_write(self.state_path, state.to_bytes(self.robot))

    # ---- the agent's side: outbox and settling -------------------------------------------------
    def put_outbox(self, data: bytes) -> Path:
        """Queue an exported package for upload, as ``outbox/<skill_id>.skill`` (atomic, idempotent).
        Checked to be a well-formed package (format and checksum; the key is the server's job)
        so that a broken export fails here, on the robot, and not as a refusal far away."""
        read_header(data, None)
        path = self.outbox / f"{skill_id(data)}{SUFFIX}"
        if not (path.exists() and path.read_bytes() == data):
            atomic_write(path, data)
        return path

    def next_inbox(self) -> Path | None:
        """The oldest received package the agent has not settled yet."""
        pending = _oldest_first(p for p in self.inbox.glob(f"*{SUFFIX}") if p.is_file())
        return pending[0] if pending else None

    def settle(self, path: Path, *, imported: bool, reason: str = "") -> Path:
        """Move an inbox package to ``imported/`` or ``refused/`` (with ``<id>.reason.json``); its
        new path. Nothing is deleted: a refused package stays for a person to look at."""
        path = Path(path)
        if path.parent.resolve() != self.inbox.resolve() or not path.name.endswith(SUFFIX):
            raise ValueError(f"{path} is not an inbox package of {self.inbox}")
        dest_dir = self.imported if imported else self.refused
        dest = dest_dir / path.name
        if not imported:
            ident = path.name[: -len(SUFFIX)]
            note = {"id": ident, "robot": self.robot, "reason": reason, "settled_s": round(time.time(), 3)}
            atomic_write(dest_dir / f"{ident}.reason.json", json.dumps(note, indent=1).encode())
        os.replace(path, dest)
        fsync_dir(self.inbox)
        fsync_dir(dest_dir)
        return dest

    # ---- the ClientApp's side: uploads and deliveries ------------------------------------------
    def pending_uploads(self) -> list[tuple[str, bytes]]:
        """(id, bytes) of the outbox packages the server has not acked, oldest first."""
        done = self._load().uploaded
        out = []
        for p in _oldest_first(self.outbox.glob(f"*{SUFFIX}")):
            if p.name[: -len(SUFFIX)] in done:
                continue
            try:
                data = p.read_bytes()
            except OSError as exc:
                log.warning("spool %s: cannot read %s (%s); skipped this time", self.root, p.name, exc)
                continue
            if skill_id(data) not in done:  # a file not named by its content is acked by its content
                out.append((skill_id(data), data))
        return out

    def mark_uploaded(self, ids: Iterable[str]) -> None:
        """Record that the server acked these ids: they are not offered again."""
        self._update(uploaded=ids)

    def deliver(self, data: bytes) -> Path | None:
        """Write a received package as ``inbox/<id>.skill`` and record its id; None if it was
        received before (whether or not the agent has settled it since)."""
        ident = skill_id(data)
        if ident in self._load().received:
            return None
        path = self.inbox / f"{ident}{SUFFIX}"
        atomic_write(path, data)  # the file first: a crash before the state write only re-delivers it
        self._update(received=[ident])
        return path

    def have(self) -> set[str]:
        """Ids uploaded, in the outbox, or ever received: what the server must never send here."""
        state = self._load()
        return state.uploaded | state.received | set(_ids(self.outbox))

    def stats(self) -> dict[str, int]:
        state = self._load()
        return {"outbox": len(_ids(self.outbox)), "uploaded": len(state.uploaded), "received": len(state.received),
                "inbox_pending": len(_ids(self.inbox)), "imported": len(_ids(self.imported)),
                "refused": len(_ids(self.refused))}
