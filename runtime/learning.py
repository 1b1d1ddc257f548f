"""The learning job, agent side: collect samples, run a worker process, gate, commit, swap.

``learn-new-task`` is a background job (``runtime.jobs.JobTracker``). Its thread

1. writes a job directory (``job.json``; the serving state's files as ``base/`` unless it is
   committed, then the worker reads the checkpoint itself) and spawns the
   worker (``python -m runtime.worker``) at once, so that its torch import and state loading
   overlap a live capture;
2. collects the samples: a live capture per label through the serving loop (stored in the
   taught store first: what was shown is never lost), or the taught samples; dataset and
   recording sources are extracted by the worker itself (its own backbones, its own core);
3. hands over (``go``), relays the worker's progress, forwards ``cancel``;
4. reads the candidate back verified, asks the pure gate (``runtime.gate.decide``) and, if it
   passes, lets the agent commit it to the checkpoint store and swap it in with one assignment.

A worker that exits without a result (killed, out of memory, crashed) fails the job with the
reason and changes nothing: the worker never touches the checkpoints or the serving model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from runtime.errors import CommandError, JobCancelledError
from runtime.gate import GateConfig, decide
from runtime.jobs import JobHandle
from runtime.serving import Capture
from runtime.statefiles import StateFiles
from runtime.worker import write_task

log = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """The worker process ended without a result."""


def default_work_dir() -> Path:
    """RAM-backed when possible: job files are transient and the state disk may be full or read-only."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


class Worker:
    """One ``python -m runtime.worker`` process and the agent's end of its socket pair."""

    def __init__(self, job_dir: Path, *, nice: int, idle_sched: bool = True) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.worker", "--job", str(job_dir), "--fd", str(theirs.fileno()),
                 "--nice", str(nice), *(["--idle-sched"] if idle_sched else []),
                 "--log-level", logging.getLevelName(logging.getLogger().level)],
                pass_fds=[theirs.fileno()], close_fds=True)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.pid = self.proc.pid

    def send(self, *msg: Any) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.conn.send(msg)

    def recv(self, timeout_s: float) -> tuple | None:
        """The next message, None on timeout; WorkerDied when the process is gone."""
        try:
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        else:
            if self.proc.poll() is None:
                return None
        rc = self.proc.wait(timeout=10)
        raise WorkerDied(_exit_reason(rc))

    def close(self, grace_s: float = 5.0) -> None:
        """Let a worker that reported exit on its own; kill it after ``grace_s``."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.conn.close()


def _exit_reason(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"the learning worker was killed by {name}"
    return f"the learning worker exited with status {rc} before reporting a result"


def capture_live(server: Any, label: str, seconds: float, handle: JobHandle | None = None) -> Capture:
    """The live samples of the next ``seconds`` (one per served prediction) under ``label``."""
    cap = Capture(label=label, until=time.monotonic() + seconds)
    server.capture = cap
    try:
        while not cap.done.wait(0.2):
            left = cap.until - time.monotonic()
            if handle is not None:
                handle.check_cancelled()
                handle.update(phase=f"capturing {label!r}: show it now ({max(0.0, left):.0f} s left, {len(cap)} samples)")
            if left < -1.0:  # nothing is being served (no sensor data): do not wait for the loop
                break
    finally:
        server.capture = None
    return cap


def _lead(handle: JobHandle, label: str, lead_s: float) -> None:
    """Tell the operator what to show, and give them ``lead_s`` to show it before the capture."""
    end = time.monotonic() + lead_s
    while (left := end - time.monotonic()) > 0:
        handle.check_cancelled()
        handle.update(phase=f"show {label!r} now: capturing in {left:.1f} s")
        time.sleep(min(0.1, left))


def read_skill_parts(job: Path) -> tuple[dict[str, Any], bytes] | None:
    """The unsigned (header, payload) a worker wrote, or None."""
    h, p = job / "skill.header.json", job / "skill.payload"
    if not (h.is_file() and p.is_file()):
        return None
    try:
        return json.loads(h.read_text()), p.read_bytes()
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"the worker's skill package is unreadable: {exc}") from None


class Learning:
    """The learn-new-task and evaluate jobs of one agent (``runtime.service.Agent``)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.work_dir = Path(agent.serve_cfg.work_dir) if agent.serve_cfg.work_dir else default_work_dir()
        self.worker_pid: int | None = None
        self._clean_stale()

    def _clean_stale(self) -> None:
        """Job directories of agents that died (SIGKILL, power cut) would hold RAM in /dev/shm forever."""
        for d in self.work_dir.glob("continua-job-*"):
            try:
                pid = int(d.name.split("-")[2])
                os.kill(pid, 0)  # still running: not ours to remove
            except (ValueError, IndexError, ProcessLookupError):
                log.info("removing the job directory %s left by a stopped agent", d)
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:  # another user's live agent
                pass

    def job_dirs(self) -> list[Path]:
        """This agent's job directories (one while a job runs)."""
        return sorted(self.work_dir.glob(f"continua-job-{os.getpid()}-*"))

    # ---- job plumbing
    def _job_dir(self, base: StateFiles | None, spec: dict[str, Any]) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        spec["spawned_s"] = time.time()
        job = Path(tempfile.mkdtemp(prefix=f"continua-job-{os.getpid()}-", dir=self.work_dir))
        on_disk = self.agent.checkpoint_path  # the serving state as committed, when it is
        if base is not None and on_disk is not None and on_disk.is_dir():
            spec["base_dir"] = str(on_disk)  # the worker reads and verifies it: no 20 MB copy here
        elif base is not None:
            (job / "base").mkdir()
            base.write_dir(job / "base")
        (job / "job.json").write_text(json.dumps(spec, indent=1, default=str))
        return job

    def _spec(self, kind: str, **kw: Any) -> dict[str, Any]:
        a, s = self.agent, self.agent.serve_cfg
        return {"kind": kind, "tap_dims": a.dims, "model_dir": str(a.cfg.model_dir), "backend": a.cfg.backend,
                "threads": s.backend_threads, "seed": a.cfg.seed,
                "topics": {"image": s.camera_topic, "audio": s.mic_topic, "imu": s.imu_topic}, **kw}

    def _follow(self, worker: Worker, handle: JobHandle) -> dict[str, Any]:
        """Relay progress until the worker's result; cancel is forwarded, then enforced."""
        cancel_sent, last_heard = 0.0, time.monotonic()
        timeout = self.agent.serve_cfg.worker_timeout_s
        while True:
            if handle.cancelled and not cancel_sent:
                worker.send("cancel")
                cancel_sent = time.monotonic()
            if cancel_sent and time.monotonic() - cancel_sent > 10.0:
                worker.kill()
                raise JobCancelledError("cancelled (the worker did not stop within 10 s and was killed)")
            if time.monotonic() - last_heard > timeout:
                worker.kill()
                raise WorkerDied(f"the learning worker sent nothing for {timeout:.0f} s and was killed")
            msg = worker.recv(0.2)
            if msg is None:
                continue
            last_heard = time.monotonic()
            if msg[0] == "progress":
                handle.update(progress=msg[1], phase=msg[2])
            elif msg[0] == "result":
                return msg[1]
            elif msg[0] == "cancelled":
                raise JobCancelledError("cancelled")
            elif msg[0] == "error":
                raise CommandError(msg[1], msg[2])

    def _run_worker(self, spec: dict[str, Any], base: StateFiles | None, handle: JobHandle, prepare: Any = None
                    ) -> tuple[dict[str, Any], Path]:
        job = self._job_dir(base, spec)
        worker = Worker(job, nice=self.agent.serve_cfg.job_nice, idle_sched=self.agent.serve_cfg.worker_idle_sched)
        self.worker_pid = worker.pid
        handle.set_meta(worker_pid=worker.pid)
        try:
            handle.update(progress=0.01, phase="starting the learning worker")
            if prepare is not None:
                prepare(job)
            worker.send("go")
            report = self._follow(worker, handle)
        except BaseException:
            worker.kill()
            shutil.rmtree(job, ignore_errors=True)
            raise
        finally:
            self.worker_pid = None
        threading.Thread(target=worker.close, name="reap-worker", daemon=True).start()  # not on the swap's path
        return report, job

    # ---- jobs
    def learn(self, name: str, labels: list[str], source: dict[str, Any], handle: JobHandle, *,
              skill: bytes | None = None, entry_extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """collect -> worker trains a candidate -> gate -> commit -> swap. ``skill``: a verified
        fleet package (source kind ``skill``), consolidated through the same gate; ``entry_extra``
        goes into the task's entry (its origin)."""
        a = self.agent
        t0 = time.perf_counter()
        base, tasks, version = a.snapshot()
        if any(t["name"] == name for t in tasks):
            raise CommandError("bad_args", f"a task named {name!r} exists already; pick another name")
        clash = [lab for lab in labels if lab in {x for t in tasks for x in t["labels"]}]
        if clash:
            raise CommandError("bad_args", f"labels {clash} belong to a learned task; class-incremental tasks need new labels")
        if source["kind"] == "taught":
            missing = [lab for lab in labels if not a.taught.counts().get(lab)]
            if missing:
                raise CommandError("bad_args", f"no taught samples for {missing}; run `teach LABEL` first or use live:SECONDS")
        s = a.serve_cfg
        spec = self._spec("learn", name=name, labels=labels, source=source, tasks=tasks, per_class=s.dataset_per_class,
                          learner=asdict(a.learner_cfg),
                          settings={"holdout": s.holdout, "holdout_guard_s": s.holdout_guard_s,
                                    "reservoir_size": s.reservoir_size, "reservoir_bytes": s.reservoir_bytes,
                                    "open_set_quantile": s.open_set_quantile, "open_set_margin": s.open_set_margin,
                                    "open_set_rule": s.open_set_rule,
                                    "seed": a.cfg.seed})
        spec["seed"] = a.cfg.seed + len(tasks)
        spec["fingerprints"] = a.fingerprints
        if source["kind"] != "skill" and a.skills.auto_export:  # the fleet's copy, built while the model is in memory
            spec["skill"] = a.skills.build_spec()
        capture_s: list[float] = []

        def prepare(job: Path) -> None:
            if skill is not None:
                (job / "skill.pkg").write_bytes(skill)
            if source["kind"] == "live":
                for i, lab in enumerate(labels):
                    handle.update(progress=0.02 + 0.28 * i / len(labels))
                    _lead(handle, lab, a.serve_cfg.capture_lead_s)
                    cap = capture_live(a.server, lab, float(source["seconds"]), handle)
                    if len(cap):
                        a.taught.add(lab, *cap.arrays())
                capture_s.append(time.perf_counter())
            if source["kind"] in ("live", "taught"):
                try:
                    got = a.taught.get(labels)
                except KeyError as exc:
                    raise CommandError("too_few_samples", f"no live samples captured for {exc.args[0]} "
                                                          "(are the sensors streaming?)") from None
                write_task(job / "task.npz", got.taps, got.present, got.stamps, got.names)

        report, job = self._run_worker(spec, base, handle, prepare)
        try:
            handle.update(progress=0.96, phase="gate")
            files = StateFiles.read_dir(job / "candidate")
            parts = read_skill_parts(job)
        except ValueError as exc:
            raise WorkerDied(f"the worker's candidate is unusable: {exc}") from None
        finally:
            shutil.rmtree(job, ignore_errors=True)
        gate = decide(new_task_acc=report["new_task_acc"], old_acc_before=report["old_acc_before"],
                      old_acc_after=report["old_acc_after"],
                      config=GateConfig(min_new_task_acc=a.cfg.min_new_task_acc, max_old_task_drop=a.cfg.max_old_task_drop))
        result: dict[str, Any] = {"task": name, "labels": labels, **report, "old_drop": round(gate.old_drop, 4)}
        if not gate.accepted:
            result.update(accepted=False, reason=gate.reason)
            a.notice(f"task {name!r} rejected by the gate: {gate.reason}")
            return result
        handle.update(progress=0.98, phase="commit")
        entry = {"name": name, "labels": labels, "task": len(tasks), "new_task_acc": report["new_task_acc"],
                 "samples": report["samples"], "accuracy_row": report["accuracy_row"], **(entry_extra or {})}
        result["checkpoint"], new_version = a.commit_and_swap(files, [*tasks, entry], expected_version=version)
        if source["kind"] in ("live", "taught"):
            a.taught.remove(labels)
        if parts is not None:
            result["skill"] = a.skills.publish(*parts)
        done = time.perf_counter()
        result.update(accepted=True, model_version=new_version, seconds=round(done - t0, 2))
        if capture_s:
            result["capture_to_swap_s"] = round(done - capture_s[0], 2)
        log.info("learned task %r: %s", name, result)
        return result

    def export_skill(self, task: str, handle: JobHandle) -> dict[str, Any]:
        """The skill package of a learned task, built by a worker from the serving state, signed here."""
        a = self.agent
        base, tasks, _ = a.snapshot()
        entry = next((t for t in tasks if t["name"] == task), None)
        if base is None or entry is None:
            raise CommandError("bad_args", f"no learned task {task!r}; learned: {[t['name'] for t in tasks]}")
        spec = self._spec("export-skill", name=task, labels=list(entry["labels"]), learner=asdict(a.learner_cfg),
                          fingerprints=a.fingerprints, skill=a.skills.build_spec())
        report, job = self._run_worker(spec, base, handle)
        try:
            parts = read_skill_parts(job)
        finally:
            shutil.rmtree(job, ignore_errors=True)
        if parts is None:
            raise WorkerDied("the worker reported an exported skill but wrote none")
        return {"task": task, **report, **a.skills.publish(*parts, always=True)}

    def evaluate(self, split: str, handle: JobHandle) -> dict[str, Any]:
        """Accuracy of the served model per learned task on a dataset split (in a worker)."""
        a = self.agent
        base, tasks, version = a.snapshot()
        if base is None or not tasks:
            raise CommandError("bad_args", "nothing learned yet: no model to evaluate")
        labels = [lab for t in tasks for lab in t["labels"]]
        spec = self._spec("evaluate", labels=labels, tasks=tasks, source={"kind": "dataset", "split": split},
                          per_class=a.serve_cfg.eval_per_class)
        spec["seed"] = 1_000 + version
        report, job = self._run_worker(spec, base, handle)
        shutil.rmtree(job, ignore_errors=True)
        return {"split": split, "model_version": version, "tasks": report["tasks"]}
