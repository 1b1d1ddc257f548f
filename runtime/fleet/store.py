"""The server-side skill store: every verified package of the fleet, and who already has which.

Why verify here and not only on the receiving robot: the server is the one place every package
passes, so a tampered package (payload changed after signing) or one of another fleet (another
key) is stopped once, counted by its reason for the operator, and never spread to the robots.
The robots verify again on import (the agent's job): a store is not trusted blindly either.

Layout under ``directory``::

    skills/<id>.skill    the packages, content-addressed (``training.skills.skill_id``)
    index.json           id -> origin robot, task, labels, bytes, round received; refusals by
                         reason; ids delivered per robot

    rounds.jsonl         one JSON line per fleet round (``runtime.fleet.apps`` writes them)

Every write is atomic; the index is rewritten after each change, so a restarted server finds
what the last one stored. A corrupt ``index.json`` is moved aside and rebuilt from ``skills/``
(each package's header names its task, labels and origin; refusal counts and deliveries are
lost, which only costs a redelivery the robots' have-lists then decline).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_write, fsync_dir
from training.skills import DEFAULT_MAX_BYTES, SkillRefused, read_header, skill_id

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
SUFFIX = ".skill"
ROUNDS_LOG = "rounds.jsonl"


@dataclass
class SkillEntry:
    """One stored package, as the index lists it."""

    origin: str
    task: str
    labels: list[str]
    bytes: int
    round: int
    received_s: float = 0.0


@dataclass
class StoreIndex:
    """The content of ``index.json``."""

    skills: dict[str, SkillEntry] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, list[str]] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps({"format": INDEX_FORMAT, "skills": {k: asdict(v) for k, v in self.skills.items()},
                           "refused": self.refused, "delivered": self.delivered}, indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> StoreIndex:
        """The index in ``data``; ``ValueError`` naming what is wrong with it."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
                raise ValueError(f"not a format-{INDEX_FORMAT} store index")
            skills = {str(k): SkillEntry(**v) for k, v in raw["skills"].items()}
            refused = {str(k): int(v) for k, v in raw["refused"].items()}
            delivered = {str(k): [str(x) for x in v] for k, v in raw["delivered"].items()}
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed ({type(exc).__name__}: {exc})") from None
        return cls(skills=skills, refused=refused, delivered=delivered)


class SkillStore:
    """Server side: <dir>/skills/<id>.skill + <dir>/index.json (id -> origin robot, task, labels, bytes, received round)
    + per-robot delivered ids. Verifies each upload with training.skills.read_header(data, key): a refused upload is
    counted by reason and never stored or forwarded.

    ``max_bytes``: the largest package accepted (the fleet's budget is ``DEFAULT_MAX_BYTES`` per
    task; the margin allows for the header), so that one robot cannot fill the server's disk."""

    def __init__(self, directory: str | Path, key: bytes, *, max_bytes: int = 4 * DEFAULT_MAX_BYTES) -> None:
        if len(key) < 16:
            raise ValueError(f"the fleet key has {len(key)} bytes; at least 16 are needed")
        self.directory = Path(directory)
        self.skills_dir = self.directory / "skills"
        self.index_path = self.directory / "index.json"
        self.max_bytes = max_bytes
        self._key = key
        self.skills_dir.mkdir(parents=True, exist_ok=True)
        self._index = self._load()

    def _load(self) -> StoreIndex:
        try:
            return StoreIndex.parse(self.index_path.read_bytes())
        except FileNotFoundError:
            index = self._rebuilt()
        except ValueError as exc:
            aside = self.index_path.with_name(f"index.json.corrupt-{time.time_ns()}")
            os.replace(self.index_path, aside)
            fsync_dir(self.directory)
            index = self._rebuilt()
            log.warning("skill store %s: index.json is corrupt (%s); moved to %s and rebuilt from %d packages "
                        "(refusal counts and deliveries restart from zero)", self.directory, exc, aside.name,
                        len(index.skills))
        atomic_write(self.index_path, index.to_bytes())
        return index

    def _rebuilt(self) -> StoreIndex:
        index = StoreIndex()
        for p in sorted(self.skills_dir.glob(f"*{SUFFIX}")):
            data = p.read_bytes()
            ident = p.name[: -len(SUFFIX)]
            try:
                if skill_id(data) != ident:
                    raise SkillRefused(f"content does not match its name (id {skill_id(data)})")
                h = read_header(data, self._key)
            except SkillRefused as exc:
                log.warning("skill store %s: %s is left out of the rebuilt index: %s", self.directory, p.name, exc)
                continue
            index.skills[ident] = SkillEntry(origin=str(h.get("origin", "unknown")), task=str(h["task"]),
                                             labels=list(h["labels"]), bytes=len(data), round=0,
                                             received_s=p.stat().st_mtime)
        return index

    def _save(self) -> None:
        atomic_write(self.index_path, self._index.to_bytes())

    # ---- the API ---------------------------------------------------------------------------
    def add(self, data: bytes, *, robot: str, round: int) -> tuple[str | None, str]:
        """(id, "") for a verified package, stored now or before; (None, reason) for a refused one."""
        try:
            if len(data) > self.max_bytes:
                raise SkillRefused(f"package of {len(data)} bytes exceeds the store's limit of {self.max_bytes}")
            header = read_header(data, self._key)
        except SkillRefused as exc:
            self._index.refused[exc.reason] = self._index.refused.get(exc.reason, 0) + 1
            self._save()
            log.warning("refused a package from robot %s in round %d: %s", robot, round, exc.reason)
            return None, exc.reason
        ident = skill_id(data)
        if ident in self._index.skills:
            return ident, ""
        atomic_write(self.skills_dir / f"{ident}{SUFFIX}", data)
        self._index.skills[ident] = SkillEntry(origin=robot, task=str(header["task"]), labels=list(header["labels"]),
                                               bytes=len(data), round=round, received_s=round_s())
        self._save()
        log.info("stored skill %s (task %r, %d bytes) from robot %s in round %d", ident, header["task"], len(data),
                 robot, round)
        return ident, ""

    def missing_for(self, robot: str, have: set[str]) -> list[tuple[str, bytes]]:
        """(id, bytes) of the skills other robots uploaded that ``robot`` lacks, oldest first.
        ``have`` (the robot's own list) is the truth, not what was delivered before: a robot whose
        spool was wiped gets everything again."""
        out = []
        entries = sorted(self._index.skills.items(), key=lambda kv: (kv[1].round, kv[1].received_s, kv[0]))
        for ident, entry in entries:
            if entry.origin == robot or ident in have:
                continue
            try:
                data = (self.skills_dir / f"{ident}{SUFFIX}").read_bytes()
            except OSError as exc:
                log.error("skill store %s: cannot read skill %s (%s); not sent", self.directory, ident, exc)
                continue
            if skill_id(data) != ident:
                log.error("skill store %s: skill %s changed on disk (now %s); not sent", self.directory, ident,
                          skill_id(data))
                continue
            out.append((ident, data))
        return out

    def mark_delivered(self, robot: str, ids: Iterable[str]) -> None:
        known = self._index.delivered.setdefault(robot, [])
        seen = set(known)
        new = [i for i in dict.fromkeys(ids) if i not in seen]
        if new:
            known.extend(new)
            self._save()

    def entry(self, ident: str) -> SkillEntry | None:
        return self._index.skills.get(ident)

    def stats(self) -> dict[str, Any]:
        return {"skills": len(self._index.skills), "bytes": sum(e.bytes for e in self._index.skills.values()),
                "refused": dict(self._index.refused),
                "delivered": {r: len(ids) for r, ids in sorted(self._index.delivered.items())}}


def round_s() -> float:
    return round(time.time(), 3)


def read_rounds(directory: str | Path) -> list[dict[str, Any]]:
    """The round records of a store (a line torn by a crash is skipped)."""
    out = []
    try:
        lines = (Path(directory) / ROUNDS_LOG).read_text().splitlines()
    except FileNotFoundError:
        return out
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped", ROUNDS_LOG, n)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("round"), int):
            out.append(rec)
    return out


def append_round(directory: str | Path, record: dict[str, Any]) -> None:
    """Append one round record to ``rounds.jsonl``, fsynced. An append, not an atomic rewrite,
    because the log only grows; a line torn by a crash is ended first, so it costs only itself."""
    with open(Path(directory) / ROUNDS_LOG, "a+b") as f:
        torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(record, sort_keys=True).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
