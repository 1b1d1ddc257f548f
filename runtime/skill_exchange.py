"""The agent's side of skill packages: sign and publish what it learned, import what peers learned.

Why the agent and not the worker signs: the fleet key never leaves the agent process (a worker
is a fresh interpreter that only ever writes into its job directory). What happens where:

- a local task passes the gate -> its worker already built the unsigned package from the model
  in memory -> ``publish`` signs it, writes ``<skills_dir>/<task>-<id>.skill`` and, with a fleet,
  puts it in the Flower client's outbox (``runtime.fleet.spool.Spool``);
- ``export-skill TASK`` (console) does the same for any learned task, in a worker job;
- ``import-skill FILE`` (console) or a package the fleet delivered to the inbox -> verified here
  (checksum, signature, backbone fingerprints, tap layout, class-name clashes: one-line reasons,
  counted) -> ``Learning.learn`` with the package's exemplars as the task's samples: the same
  worker, the same gate, the same commit-and-swap as a local task, so predictions never stop;
- with ``--fleet ADDRESS`` a ``flower-supernode`` child process (``runtime.fleet.node``) carries
  the outbox up and the inbox down each round; the agent imports inbox packages whenever no other
  job runs, and settles each one as imported or refused (with its reason): nothing is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from runtime.access import contained_file
from runtime.config import FleetConfig
from runtime.errors import BusyError, CommandError
from runtime.jobs import JobHandle
from training import skills

log = logging.getLogger("continua.skills")
MAX_ATTEMPTS = 3  # a package whose import job fails (not refused) this often is settled as refused


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "task"


class SkillExchange:
    def __init__(self, agent: Any, cfg: FleetConfig | None = None) -> None:
        self.agent = agent
        self.cfg = cfg or FleetConfig()
        self.robot = self.cfg.robot or socket.gethostname()
        root = agent.cfg.checkpoint_dir
        self.skills_dir = self.cfg.skills_dir or root / "skills"
        self.spool = None
        if self.cfg.address:
            from runtime.fleet.spool import Spool

            self.spool = Spool(self.cfg.spool_dir or root / "fleet", self.robot)
        self.counts: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._attempts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.node = None  # the flower-supernode process

    # ---- keys and paths
    def key(self) -> bytes:
        try:
            return skills.load_key(self.cfg.key_file)
        except ValueError as exc:
            raise CommandError("no_key", str(exc)) from None

    @property
    def auto_export(self) -> bool:
        return bool(self.cfg.address and self.cfg.auto_export)

    def build_spec(self) -> dict[str, Any]:
        """What a worker needs to build a package (no key)."""
        return {"origin": self.robot, "max_bytes": self.cfg.max_skill_bytes}

    def resolve(self, text: str) -> Path:
        """A package path given by an operator: relative to ``skills_dir`` or absolute inside it
        (``runtime.access.contained_file``, as for recordings)."""
        try:
            return contained_file(text, self.skills_dir, noun="skill package", where="[fleet] skills_dir")
        except ValueError as exc:
            raise CommandError("bad_args", str(exc)) from None

    # ---- export
    def publish(self, header: dict[str, Any], payload: bytes, *, always: bool = False) -> dict[str, Any]:
        """Sign a worker's package, write it to ``skills_dir`` and (fleet) the outbox. A local
        task's copy (``always`` False) is skipped with a notice when there is no key: the task
        itself is learned either way."""
        try:
            key = self.key()
        except CommandError as exc:
            if always:
                raise
            self.agent.notice(f"task {header.get('task')!r} not shared with the fleet: {exc.message}")
            return {"shared": False, "reason": exc.message}
        data = skills.sign(header, payload, key)
        sid = skills.skill_id(data)
        path = self.skills_dir / f"{_safe(header['task'])}-{sid[:12]}.skill"
        try:
            self.skills_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
            if self.spool is not None:
                self.spool.put_outbox(data)
        except (OSError, skills.SkillRefused) as exc:  # the task is committed either way: say so, do not fail it
            if always:
                raise CommandError("io_error", f"skill package of {header['task']!r} not written: {exc}") from None
            self.agent.notice(f"task {header['task']!r} not shared with the fleet: {exc}")
            return {"shared": False, "reason": str(exc)}
        out: dict[str, Any] = {"shared": True, "skill_file": str(path), "skill_id": sid, "skill_bytes": len(data),
                               "exemplars": header.get("exemplars"), "fleet_outbox": self.spool is not None}
        self.counts["exported"] += 1
        log.info("skill %s of task %r: %d bytes, %s exemplars -> %s", sid[:12], header["task"], len(data),
                 header.get("exemplars"), path)
        return out

    # ---- import
    def check(self, data: bytes) -> dict[str, Any]:
        """The package's verified header, or CommandError("refused", reason) (counted)."""
        _, tasks, _ = self.agent.snapshot()
        try:
            header = skills.verify(data, self.key(), fingerprints=self.agent.fingerprints, tap_dims=self.agent.dims,
                                   tasks=tasks)
        except skills.SkillRefused as exc:
            self.refused[exc.reason.split(":")[0]] += 1
            raise CommandError("refused", f"skill package refused: {exc.reason}") from None
        return header

    def import_bytes(self, data: bytes, handle: JobHandle) -> dict[str, Any]:
        header = self.check(data)
        _, tasks, _ = self.agent.snapshot()
        names = {t["name"] for t in tasks}
        name = header["task"] if header["task"] not in names else f"{header['task']}@{header.get('origin', 'peer')}"
        sid = skills.skill_id(data)
        src = {"kind": "skill", "id": sid, "origin": header.get("origin", "")}
        result = self.agent.learning.learn(name, list(header["labels"]), src, handle, skill=data,
                                           entry_extra={"origin": header.get("origin", ""), "skill": sid})
        self.counts["imported" if result.get("accepted") else "gate_rejected"] += 1
        return {"skill_id": sid, "origin": header.get("origin"), **result}

    def import_file(self, path: Path, handle: JobHandle) -> dict[str, Any]:
        """``path``: what ``resolve`` returned when the command came in."""
        return self.import_bytes(path.read_bytes(), handle)

    # ---- the fleet's inbox
    def _import_inbox(self, path: Path, handle: JobHandle) -> dict[str, Any]:
        assert self.spool is not None
        try:
            result = self.import_bytes(path.read_bytes(), handle)
        except (CommandError, OSError) as exc:  # refused, or what the learning job rejects: final
            # (a cancelled import, JobCancelledError, or a dead worker is not settled: tried again)
            self.spool.settle(path, imported=False, reason=getattr(exc, "message", None) or str(exc))
            raise
        self.spool.settle(path, imported=bool(result.get("accepted")),
                          reason="" if result.get("accepted") else f"gate: {result.get('reason')}")
        return result

    def _tick(self) -> None:
        assert self.spool is not None
        if self.agent.jobs.active() is not None:
            return
        path = self.spool.next_inbox()
        if path is None:
            return
        self._attempts[path.name] += 1
        if self._attempts[path.name] > MAX_ATTEMPTS:
            self.spool.settle(path, imported=False, reason=f"import failed {MAX_ATTEMPTS} times (see the agent log)")
            return
        try:
            self.agent.jobs.start("import-skill", lambda h: self.agent._job(h, self._import_inbox, path),
                                  meta={"path": path.name, "from": "fleet"})
        except BusyError:  # another job started in between: next tick
            self._attempts[path.name] -= 1

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.import_poll_s):
            try:
                self._tick()
                self._keep_node()
            except Exception:  # the watcher must outlive any one bad package
                log.exception("fleet inbox watcher")

    def _keep_node(self) -> None:
        if self.node is not None and self.node.poll() is not None:
            self.agent.notice(f"flower-supernode exited with status {self.node.returncode}; restarting it")
            self.node = None
            self._start_node()

    def _start_node(self) -> None:
        from runtime.fleet.node import start_supernode

        assert self.spool is not None
        log_file = (self.spool.root / "supernode.log").open("ab")  # Flower's own log, beside its spool
        self.node = start_supernode(self.cfg.address, spool=self.spool.root, robot=self.robot,
                                    root_certificates=self.cfg.root_certificates, insecure=self.cfg.insecure,
                                    auth_private_key=self.cfg.auth_private_key, runtime_port=self.cfg.node_port,
                                    stdout=log_file, stderr=subprocess.STDOUT,
                                    env={"FLWR_HOME": str(self.spool.root / "flwr-home")})  # where it unpacks the app
        log_file.close()  # the child holds its own descriptor
        log.info("fleet: flower-supernode pid %d -> %s as %r", self.node.pid, self.cfg.address, self.robot)

    def start(self) -> None:
        if self.spool is None:
            return
        self._start_node()
        self._thread = threading.Thread(target=self._watch, name="fleet-inbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.node is not None and self.node.poll() is None:  # its own session: its ClientApps go with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.node.pid, signal.SIGTERM)
            try:
                self.node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.node.pid, signal.SIGKILL)
                self.node.wait(timeout=10)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"robot": self.robot, "fleet": self.cfg.address, **self.counts,
                               "refused": dict(self.refused), "skills_dir": str(self.skills_dir)}
        if self.spool is not None:
            out["spool"] = self.spool.stats()
            out["node_alive"] = self.node is not None and self.node.poll() is None
        return out
