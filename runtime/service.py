"""The agent: sensors in, predictions out, tasks learned in the background, operated over CurveZMQ.

One process, no torch in it (the serving budget is 500 MB; torch alone is ~570 MB): threads for
sensor intake, the audio and IMU tap streams, serving (``runtime.serving``), the control socket
(``runtime.control``) and at most one background job (``runtime.learning``), whose heavy part
runs in a worker process. What this class owns is the *state* and the commands around it:

- the serving state's checkpoint files in memory (``StateFiles``: learner, replay buffer,
  held-out reservoir, the exported serving model), its tasks and model version;
- ``commit_and_swap``: write a gated candidate to the checkpoint store, then swap it in with one
  assignment (``Server.served``); a failed write keeps it in memory, says so, and ``save``
  retries later;
- taught samples (``runtime.taught``: bounded, persisted beside the checkpoints);
- restore at start, rollback, save, status, shutdown.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from export.backends import load_backend, load_manifest
from export.bundle import ensure_unbundled
from export.incremental import IncrementalAudioExtractor
from export.manifest import fingerprint
from runtime.checkpoints import CheckpointStore
from runtime.commands import COMMANDS, Arg, parse_source
from runtime.config import AgentConfig, ControlConfig, FleetConfig, ServeConfig
from runtime.control import ControlServer
from runtime.errors import CheckpointWriteError, CommandError, NoCheckpointError
from runtime.intake import MODALITIES, IntakeConfig, SensorIntake
from runtime.jobs import JobHandle, JobTracker
from runtime.learning import Learning, capture_live
from runtime.serving import Served, Server
from runtime.serving_model import ServingModel
from runtime.skill_exchange import SkillExchange
from runtime.statefiles import StateFiles
from runtime.streams import AudioTapStream, ImuTapStream
from runtime.taught import TaughtStore
from training.config import LearnerConfig
from training.openset import OpenSet

log = logging.getLogger("continua.agent")


def served_from(files: StateFiles, version: int, threads: int = 1, device: str = "cpu") -> Served:
    """The serving model of a checkpoint (its ONNX export and open-set data; no torch)."""
    entry = files.decode(["serving"])["serving"]
    model = ServingModel.from_entry(entry, threads=threads, device=device)
    openset = OpenSet.from_state_dict(entry["openset"]) if entry.get("openset") else None
    return Served(version=version, class_names=tuple(model.class_names), model=model, openset=openset)


class Agent:
    def __init__(self, cfg: AgentConfig, control: ControlConfig, serve: ServeConfig, learner: LearnerConfig,
                 *, intake: IntakeConfig | None = None, context: zmq.Context | None = None,
                 fleet: FleetConfig | None = None) -> None:
        self.cfg, self.serve_cfg, self.learner_cfg = cfg, serve, learner
        self.ctx = context or zmq.Context.instance()
        if cfg.model_bundle is not None:
            ensure_unbundled(cfg.model_bundle, cfg.model_dir)  # ModelFileError names what is wrong
        manifests = {m: load_manifest(m, cfg.model_dir, build=False if cfg.model_bundle else "missing")
                     for m in MODALITIES}
        self.dims = {m: [int(t["dim"]) for t in man["taps"]] for m, man in manifests.items()}
        self.fingerprints = {m: fingerprint(man) for m, man in manifests.items()}
        th = serve.backend_threads
        self.image = load_backend("image", cfg.backend, cfg.model_dir, build=False, threads=serve.image_threads)
        self.audio = AudioTapStream(IncrementalAudioExtractor(cfg.model_dir, "torch" if cfg.backend == "torch"
                                                              else "onnxruntime", threads=th, build=False))
        self.imu = ImuTapStream(load_backend("imu", cfg.backend, cfg.model_dir, build=False, threads=th))
        icfg = intake or IntakeConfig(endpoints=cfg.sensors, stale_s=cfg.stale_s, camera_topic=serve.camera_topic,
                                      mic_topic=serve.mic_topic, imu_topic=serve.imu_topic)
        self.intake = SensorIntake(icfg, self.ctx, audio=self.audio, imu=self.imu)
        self.server = Server(serve, intake=self.intake, image=self.image, audio=self.audio, imu=self.imu, dims=self.dims,
                             endpoint=cfg.predictions, context=self.ctx)
        self.store = CheckpointStore(cfg.checkpoint_dir, keep=cfg.keep_checkpoints)
        self.taught = TaughtStore(self._taught_dir(), max_bytes=serve.taught_bytes, modalities=MODALITIES)
        self.jobs = JobTracker()
        self.control = ControlServer(control, jobs=self.jobs)
        self.learning = Learning(self)
        self.skills = SkillExchange(self, fleet)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()  # guards files, tasks, version, persisted
        self.files: StateFiles | None = None  # the serving state's checkpoint files
        self.tasks: list[dict[str, Any]] = []
        self.version = 0
        self.persisted = True  # False: the serving state is newer than the last checkpoint
        self.checkpoint_path: Path | None = None  # the serving state's checkpoint, while it is the latest
        self.notices: deque[str] = deque(maxlen=20)
        self._register_commands()

    def _taught_dir(self) -> Path | None:
        d = self.cfg.checkpoint_dir / "taught"
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("taught samples kept in memory only: cannot create %s (%s)", d, exc)
            return None
        return d

    # ------------------------------------------------------------------ state
    def snapshot(self) -> tuple[StateFiles | None, list[dict[str, Any]], int]:
        with self._lock:
            return self.files, [dict(t) for t in self.tasks], self.version

    def notice(self, text: str) -> None:
        log.warning("%s", text)
        self.notices.append(text)

    def _check_fingerprints(self, meta: dict[str, Any], where: str) -> None:
        have = meta.get("fingerprints")
        if have is not None and have != self.fingerprints:
            raise RuntimeError(f"checkpoint {where} was trained on other backbone models: its manifest fingerprints "
                               f"{have} differ from the loaded models' {self.fingerprints}; rebuild the same models "
                               f"(python -m export build) or start from an empty state directory")

    def _adopt(self, files: StateFiles, meta: dict[str, Any], where: str, path: Path | None = None) -> None:
        self._check_fingerprints(meta, where)
        if "serving" not in files.entries:
            raise RuntimeError(f"checkpoint {where} has no exported serving model (written by continua before the "
                               "torch-free serving process); start from an empty state directory")
        served = served_from(files, int(meta.get("version", 0)), self.serve_cfg.side_threads, self.serve_cfg.side_device)
        with self._lock:
            self.files, self.tasks, self.version = files, list(meta.get("tasks", [])), served.version
            self.checkpoint_path = path
            self.server.served = served

    def restore(self) -> bool:
        """Resume from the last good checkpoint; False when there is none."""
        try:
            res = self.store.load_latest(keys=())
        except NoCheckpointError:
            return False
        for bad in res.corrupt:
            self.notice(f"checkpoint {bad.name} is corrupt ({bad.reason}); moved to {bad.moved_to}")
        assert res.files is not None
        self._adopt(res.files, res.meta, res.name, res.path)
        log.info("resumed %s: version %d, %d task(s), classes %s%s", res.name, self.version, len(self.tasks),
                 list(self.server.served.class_names), " (fell back from a corrupt newer one)" if res.fell_back else "")
        return True

    def _commit(self, files: StateFiles) -> tuple[str, Path | None]:
        try:
            info = self.store.save_files(files)
        except CheckpointWriteError as exc:
            self.notice(f"checkpoint write failed, model v{files.meta.get('version')} kept in memory only: {exc}")
            self.persisted = False
            return f"not persisted: {exc}", None
        self.persisted = True
        return info.name, info.path

    def commit_and_swap(self, candidate: StateFiles, tasks: list[dict[str, Any]], *, expected_version: int
                        ) -> tuple[str, int]:
        """Checkpoint the gated candidate, then serve it (one assignment). Returns (checkpoint, version)."""
        with self._lock:
            if self.version != expected_version:
                raise CommandError("conflict", f"the serving model changed to v{self.version} while this task "
                                               f"trained on v{expected_version} (rollback?); learn it again")
            version = self.version + 1
        files = candidate.with_meta({"tasks": tasks, "version": version, "fingerprints": self.fingerprints,
                                     "tap_dims": self.dims})
        served = served_from(files, version, self.serve_cfg.side_threads,  # a broken export fails here, not live
                             self.serve_cfg.side_device)
        name, path = self._commit(files)
        with self._lock:
            self.files, self.tasks, self.version, self.checkpoint_path = files, tasks, version, path
            self.server.served = served  # the atomic swap
        return name, version

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Agent:
        self.audio.start()
        self.imu.start()
        self.server.start()
        self.intake.start()
        self.control.start()
        self.skills.start()
        log.info("agent serving: sensors %s, predictions %s, control %s", self.cfg.sensors, self.cfg.predictions,
                 self.control.config.endpoint)
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.skills.stop()
        self.jobs.cancel()
        self.jobs.wait(timeout_s=15.0)
        self.server.stop()
        if not self.persisted and self.files is not None:
            self.save()
        self.control.stop()
        self.intake.stop()
        self.audio.stop()
        self.imu.stop()
        for b in (self.image, self.imu.backend):
            b.close()

    # ------------------------------------------------------------------ commands
    def status(self) -> dict[str, Any]:
        health = {m: vars(h) for m, h in self.intake.health().items()}
        served = self.server.served
        srv = self.server.stats()
        job = self.jobs.snapshot()
        return {
            "model_version": served.version,
            "classes": list(served.class_names),
            "tasks": [t["name"] for t in self.tasks],
            "persisted": self.persisted,
            "predictions": srv["predictions"],
            "latency_ms": srv["latency_ms"],
            "serving": {"stage_p50_ms": srv["stage_p50_ms"], "stage_p99_ms": srv["stage_p99_ms"], "streams": {"audio": self.audio.stats(),
                                                                          "imu": self.imu.stats()}},
            "sensors": health,
            "stale": [m for m, h in health.items() if not h["healthy"]],
            "intake": self.intake.reader_stats(),
            "control": self.control.stats(),  # requests that reached the server, errors by code
            "checkpoints": self.store.stats(),  # corrupt checkpoints moved aside, by reason
            "errors": srv["errors"],
            "job": job,
            "worker_pid": self.learning.worker_pid,
            "taught": self.taught.counts(),
            "taught_store": self.taught.stats(),
            "skills": self.skills.stats(),
            "rss_mb": _rss_mb(),
            "notices": list(self.notices),
        }

    def rollback(self) -> dict[str, Any]:
        if self.jobs.active() is not None:
            raise CommandError("busy", "a job is running; cancel it first")
        try:
            res = self.store.rollback(keys=())
        except NoCheckpointError as exc:
            raise CommandError("no_checkpoint", str(exc)) from None
        assert res.files is not None
        self._adopt(res.files, res.meta, res.name, res.path)
        self.persisted = True
        return {"checkpoint": res.name, "model_version": self.version, "tasks": [t["name"] for t in self.tasks]}

    def save(self) -> dict[str, Any]:
        files, _, version = self.snapshot()
        if files is None:
            raise CommandError("no_model", "nothing learned yet: there is no model to save")
        name, path = self._commit(files)
        if path is not None:
            self.checkpoint_path = path
        return {"checkpoint": name, "model_version": version}

    def heldout(self) -> dict[str, Any]:
        """Accuracy of the served model per task on the held-out reservoir (never trained on)."""
        files, tasks, version = self.snapshot()
        served = self.server.served
        if files is None or served.model is None or "reservoir" not in files.entries:
            raise CommandError("no_model", "nothing learned yet: no held-out samples")
        from training.buffer import ReplayBuffer

        rb = ReplayBuffer.from_state_dict(files.decode(["reservoir"])["reservoir"]).all()
        probs = served.model.predict(rb.taps, rb.present)
        pred = probs.argmax(1)
        out = []
        for t in tasks:
            ids = [served.class_names.index(lab) for lab in t["labels"] if lab in served.class_names]
            mask = np.isin(rb.labels, ids)
            acc = float((pred[mask] == rb.labels[mask]).mean()) if mask.any() else None
            out.append({"task": t["name"], "accuracy": None if acc is None else round(acc, 4), "samples": int(mask.sum())})
        return {"split": "heldout", "model_version": version, "tasks": out}

    def request_shutdown(self) -> dict[str, Any]:
        self.stop_event.set()
        return {"stopping": True}

    def _register_commands(self) -> None:
        c = self.control
        c.register("status", self.status, COMMANDS["status"], help="model, sensors, latency, job")
        c.register("tasks", lambda: {"tasks": [dict(t) for t in self.tasks]}, COMMANDS["tasks"], help="learned tasks")

        def learn(name: str, labels: list[str], source: str) -> dict[str, Any]:
            src = {"kind": "taught"} if source == "taught" else parse_source(source, self.cfg.recordings_dir)
            job = self.jobs.start("learn-new-task", lambda h: self._job(h, self.learning.learn, name, labels, src),
                                  meta={"task": name, "labels": labels, "source": source})
            return {"job": job}

        schema = dict(COMMANDS["learn-new-task"])
        schema["source"] = Arg(str, required=True, max=4096,  # mcap: inside [agent] recordings_dir only
                               check=lambda s: s == "taught" or parse_source(s, self.cfg.recordings_dir),
                               help="live:SECONDS | mcap:PATH[,PATH...] | dataset:SPLIT | taught")
        c.register("learn-new-task", learn, schema, help="learn a new task in the background")

        def teach(label: str, seconds: float) -> dict[str, Any]:
            def run(h: JobHandle) -> dict[str, Any]:
                cap = capture_live(self.server, label, seconds, h)
                kept = self.taught.add(label, *cap.arrays()) if len(cap) else 0
                return {"label": label, "samples": kept, "captured": len(cap), "taught": self.taught.counts()}

            return {"job": self.jobs.start("teach", lambda h: self._job(h, run), meta={"label": label})}

        c.register("teach", teach, COMMANDS["teach"], help="label the live samples of the next SECONDS")
        c.register("cancel", lambda: {"cancelled": self.jobs.cancel()}, COMMANDS["cancel"], help="cancel the job")
        c.register("rollback", self.rollback, COMMANDS["rollback"], help="back to the previous checkpoint")
        c.register("save", self.save, COMMANDS["save"], help="write a checkpoint now")
        c.register("shutdown", self.request_shutdown, COMMANDS["shutdown"], help="save and exit")

        def evaluate(split: str) -> dict[str, Any]:
            if split == "heldout":
                return {"job": self.jobs.start("evaluate", lambda h: self.heldout(), meta={"split": split})}
            return {"job": self.jobs.start("evaluate", lambda h: self._job(h, self.learning.evaluate, split),
                                           meta={"split": split})}

        def export_skill(task: str) -> dict[str, Any]:
            return {"job": self.jobs.start("export-skill", lambda h: self._job(h, self.learning.export_skill, task),
                                           meta={"task": task})}

        def import_skill(path: str) -> dict[str, Any]:
            full = self.skills.resolve(path)  # bad paths fail now, not in the job
            return {"job": self.jobs.start("import-skill", lambda h: self._job(h, self.skills.import_file, full),
                                           meta={"path": path})}

        c.register("export-skill", export_skill, COMMANDS["export-skill"],
                   help="sign a learned task's skill package into the skills directory (and the fleet's outbox)")
        c.register("import-skill", import_skill, COMMANDS["import-skill"],
                   help="verify a peer's skill package and learn it through the gate (background job)")
        c.register("evaluate", evaluate, {"split": Arg(str, default="test", choices=("train", "test", "heldout"))},
                   help="accuracy per learned task on a dataset split or the held-out reservoir (background job)")

    def _job(self, handle: JobHandle, fn: Any, *args: Any) -> Any:
        """Run a job function at the job priority (the serving threads come first)."""
        _lower_thread_priority(self.serve_cfg.job_nice)
        return fn(*args, handle) if fn is not None and args else fn(handle)


def _lower_thread_priority(nice: int) -> None:
    """Renice the calling thread only (Linux: a thread id is a PRIO_PROCESS target)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # not permitted here: run at normal priority
        log.debug("could not renice the job thread: %s", exc)


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def initial_task(agent: Agent, spec: str, timeout_s: float = 600.0) -> dict[str, Any] | None:
    """Learn ``name:label,label:source`` at first start (no checkpoint yet) and wait for it."""
    name, labels, source = spec.split(":", 2)
    src = {"kind": "taught"} if source == "taught" else parse_source(source, agent.cfg.recordings_dir)
    job = agent.jobs.start("initial-task", lambda h: agent._job(h, agent.learning.learn, name, labels.split(","), src))
    t_end = time.monotonic() + timeout_s
    snap = agent.jobs.wait(job, timeout_s=timeout_s)
    log.info("initial task: %s", snap if time.monotonic() < t_end else "timed out")
    return snap
