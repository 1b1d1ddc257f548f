"""The learning worker: ``python -m runtime.worker --job DIR --fd N``, one fresh process per job.

Why a process: training holds a CPU core for seconds and, in the serving process, the GIL for
much of that time (p99 while learning was 1.70x idle). The agent spawns a fresh interpreter
per job at a lower priority (``nice``: the kernel schedules serving first), hands it the
serving state and the task's taps as files in a job directory, and talks to it over a socket
pair (``multiprocessing.connection``). The worker only ever writes into its job directory: a
worker that dies (SIGKILL, out of memory, a bug) is a failed job, and the serving model and
the checkpoints are untouched, because only the agent commits and swaps. It also dies with the
agent (``PR_SET_PDEATHSIG`` and end-of-file on the socket), so no orphan keeps training.

Job directory: ``job.json`` (the spec), ``base/`` (the serving state, ``StateFiles`` layout,
when it is not committed; else ``base_dir`` in the spec names its checkpoint; neither on a fresh
robot), ``task.npz`` (taps of live or taught samples), ``skill.pkg`` (a fleet peer's package to
import), ``candidate/`` (the worker's result), ``skill.header.json`` + ``skill.payload`` (the
unsigned package of the task learned, or of ``export-skill``; the agent signs it). Messages
worker -> agent: ``("progress", fraction | None, phase)``, ``("result", report)``,
``("error", code, message)``, ``("cancelled",)``; agent -> worker: ``("go",)`` once the task's
samples are in place, ``("cancel",)``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("continua.worker")
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_ORPHANED = 0, 1, 4, 3


class Cancelled(Exception):
    """The agent asked the worker to stop."""


class Link:
    """The worker's end of the job channel: progress out, go/cancel in (a reader thread)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.go = threading.Event()
        self.cancel = threading.Event()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name="link", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the agent is gone: nobody will use the result
                log.error("the agent closed the job channel; exiting")
                os._exit(EXIT_ORPHANED)
            if msg == ("go",):
                self.go.set()
            elif msg == ("cancel",):
                self.cancel.set()
                self.go.set()

    def send(self, *msg: Any) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def progress(self, fraction: float | None, phase: str) -> None:
        self.send("progress", fraction, phase)
        if self.cancel.is_set():
            raise Cancelled(f"cancelled during: {phase}")

    def wait_go(self) -> None:
        while not self.go.wait(0.2):
            pass
        if self.cancel.is_set():
            raise Cancelled("cancelled before the samples were handed over")


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the agent's job thread that started it ends."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def _lower_priority(nice: int, idle: bool) -> None:
    """Serving first: SCHED_IDLE (a waking serving thread preempts the worker at once) where the
    kernel allows it, else a nice level (the kernel still favours serving, with wake-up delays)."""
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)
    if idle and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.warning("SCHED_IDLE not permitted (%s); running at nice %d", exc, nice)


def read_task(path: Path) -> Any:
    from runtime.training_job import TaskSamples

    with np.load(path, allow_pickle=False) as z:
        mods = [m for m in ("image", "audio", "imu") if f"{m}_0" in z.files]
        taps = {m: [z[f"{m}_{b}"].astype(np.float32) for b in range(sum(k.startswith(f"{m}_") for k in z.files))]
                for m in mods}
        return TaskSamples(taps=taps, present=z["present"], stamps=z["stamps"], names=[str(n) for n in z["names"]])


def write_task(path: Path, taps: dict[str, list[np.ndarray]], present: np.ndarray, stamps: np.ndarray,
               names: list[str]) -> None:
    arrays = {f"{m}_{b}": np.asarray(x) for m, lv in taps.items() for b, x in enumerate(lv)}
    np.savez(path, present=np.asarray(present, bool), stamps=np.asarray(stamps, np.int64),
             names=np.asarray(names, dtype=str), **arrays)


def _source_samples(spec: dict[str, Any], link: Link) -> Any:
    """Taps of a dataset or recording source, through the same backbones the agent serves with."""
    from runtime.backbone_stage import FeatureExtractor
    from runtime.sources import dataset_samples, mcap_samples
    from runtime.training_job import TaskSamples

    src, labels = spec["source"], spec["labels"]
    if src["kind"] == "dataset":
        samples, names = dataset_samples(labels, src["split"], per_class=int(spec["per_class"]), seed=int(spec["seed"]))
    else:
        samples, names = mcap_samples([Path(p) for p in str(src["path"]).split(",")], labels, topics=spec["topics"])
    fx = FeatureExtractor(kind=spec["backend"], model_dir=spec["model_dir"], threads=int(spec["threads"]),
                          build="missing")
    try:
        parts = []
        for s in range(0, len(samples), 16):
            link.progress(0.05 + 0.25 * s / len(samples), f"extracting features {s}/{len(samples)}")
            parts.append(fx.extract(samples[s : s + 16]))
    finally:
        fx.close()
    taps = {m: [np.concatenate([p.taps[m][b] for p in parts]) for b in range(len(parts[0].taps[m]))]
            for m in parts[0].taps}
    stamps = np.asarray([s.frame_stamp_ns or s.stamp_ns for s in samples], np.int64)
    return TaskSamples(taps=taps, present=np.concatenate([p.present for p in parts]), stamps=stamps, names=names)


def run(job: Path, link: Link) -> dict[str, Any]:
    from common.config import from_dict
    from runtime import training_job as tj
    from runtime.statefiles import StateFiles
    from training.config import LearnerConfig

    spec = json.loads((job / "job.json").read_text())
    base_dir = Path(spec["base_dir"]) if spec.get("base_dir") else job / "base"
    base = StateFiles.read_dir(base_dir) if base_dir.is_dir() else None
    tap_dims = {m: [int(d) for d in ds] for m, ds in spec["tap_dims"].items()}
    if spec["kind"] == "evaluate":
        link.wait_go()
        samples = _source_samples(spec, link)
        if base is None:
            raise ValueError("nothing learned yet: no model to evaluate")
        return {"tasks": tj.evaluate(base, samples, spec["tasks"], threads=int(spec["threads"]))}
    config = from_dict(LearnerConfig, spec["learner"])
    if spec["kind"] == "export-skill":
        link.wait_go()
        if base is None:
            raise ValueError("nothing learned yet: no skill to export")
        learner = tj.load_state(base, tap_dims, config)[0]
        return tj.write_skill_parts(job, learner, spec, list(spec["labels"]), spec["name"])
    # everything that does not need the samples happens now, while the operator may still capture
    state = tj.load_state(base, tap_dims, config)
    template = tj.prepare_export(state[0], list(spec["labels"]))
    t_ready = time.time()
    link.progress(0.02, "worker ready: waiting for the task's samples")
    link.wait_go()
    if spec["source"]["kind"] in ("live", "taught"):
        samples = read_task(job / "task.npz")
    elif spec["source"]["kind"] == "skill":  # a fleet peer's package, copied in by the agent
        samples = tj.skill_samples((job / "skill.pkg").read_bytes())
    else:
        samples = _source_samples(spec, link)
    settings = from_dict(tj.LearnSettings, spec["settings"])
    link.progress(None, f"samples ready ({time.time() - spec.get('spawned_s', time.time()):.1f} s after the spawn)")
    cand = tj.learn(state, samples, name=spec["name"], labels=spec["labels"], tasks=spec["tasks"], tap_dims=tap_dims,
                    settings=settings, progress=link.progress, cancel=link.cancel, template=template)
    out = job / "candidate"
    out.mkdir()
    link.progress(0.95, "writing the candidate")
    cand.files.write_dir(out)
    cand.report["startup_s"] = round(t_ready - spec["spawned_s"], 2) if spec.get("spawned_s") else None
    if spec.get("skill") and spec["source"]["kind"] != "skill":  # the fleet's copy of a local task
        try:
            cand.report.update(tj.write_skill_parts(job, state[0], spec, list(spec["labels"]), spec["name"]))
        except ValueError as exc:  # never fail a learned task for its fleet copy
            cand.report["skill_error"] = str(exc)
    return cand.report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--job", type=Path, required=True, help="job directory written by the agent")
    ap.add_argument("--fd", type=int, required=True, help="file descriptor of the job channel")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--idle-sched", action="store_true", help="Linux SCHED_IDLE: run only on otherwise idle cores")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    _die_with_parent()
    _lower_priority(args.nice, args.idle_sched)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s worker[%(process)d] %(name)s: %(message)s")
    link = Link(Connection(args.fd))
    from runtime.errors import CommandError
    from training.errors import TrainingCancelled

    try:
        report = run(args.job, link)
    except (Cancelled, TrainingCancelled) as exc:
        log.info("job cancelled: %s", exc)
        link.send("cancelled")
        return EXIT_CANCELLED
    except CommandError as exc:
        link.send("error", exc.code, exc.message)
        return EXIT_FAILED
    except Exception as exc:  # any failure is the job's, reported with its reason
        log.error("job failed:\n%s", traceback.format_exc())
        link.send("error", "internal" if not isinstance(exc, ValueError | KeyError) else "bad_args",
                  f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    link.send("result", report)
    logging.shutdown()
    # Everything is written and fsynced: skip the interpreter's teardown (torch takes seconds to
    # unload), so the agent is not kept waiting to reap this process.
    os._exit(EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
