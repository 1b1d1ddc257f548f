"""The robot's continual-learning agent.

Usage::

    python -m runtime.agent                                   # defaults: sensors on tcp://127.0.0.1:5556
    python -m runtime.agent --config launch/robot.toml
    python -m runtime.agent --config launch/demo.toml --insecure   # development only: no CurveZMQ

Threads: ``intake`` (every sensor message in, newest sample out), ``serve`` (this module:
backbones once per sample, learner, predictions PUB), ``control`` (ROUTER, CurveZMQ) and at
most one background ``job`` (capture, learn, gate, commit). Predictions never wait for
learning: a job trains a *copy* of the serving learner and the serving reference is swapped
in one assignment after the copy passed the gate and was committed to disk.

Predictions are published on ``predictions`` as ``[b"prediction", msgpack map]`` with
``stamp_ns`` (the sensor stamp of the newest data used), ``label``, ``class_id``,
``confidence``, ``topk`` ([[label, p], ...]), ``present`` (modality -> bool),
``latency_ms`` (sensor stamp -> publish), ``model_version`` and ``seq``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

from runtime.checkpoints import CheckpointStore
from runtime.config import AgentConfig, ControlConfig
from runtime.control import COMMANDS, Arg, ControlServer, JobHandle, JobTracker, parse_source
from runtime.errors import CheckpointWriteError, CommandError, NoCheckpointError
from runtime.features import FeatureExtractor, SampleTaps
from runtime.intake import MODALITIES, IntakeConfig, Sample, SensorIntake
from runtime.sources import dataset_samples, mcap_samples
from sensors.config import ConfigError, format_config, load_config
from training.buffer import ReplayBuffer
from training.learner import LabelledSamples, Learner, LearnerConfig
from training.taskdata import TaskData

log = logging.getLogger("continua.agent")


@dataclass(kw_only=True)
class ServeConfig:
    """Serving and learning knobs that are not in ``AgentConfig``."""

    topk: int = 3
    torch_threads: int = 1  # the side network is tiny; the other core stays with the backbones
    backend_threads: int = 1
    idle_rate_hz: float = 30.0  # prediction rate when the camera is stale
    job_nice: int = 10  # background jobs (capture, training) run at this nice level: serving comes first
    holdout: float = 0.2  # share of a new task's samples kept for the gate
    dataset_per_class: int = 60  # samples per class for a dataset:SPLIT source
    eval_per_class: int = 40  # samples per class for the evaluate command
    initial_task: str = ""  # "name:label,label:source" learned at first start (no checkpoint)
    camera_topic: str = "camera"
    mic_topic: str = "mic"
    imu_topic: str = "imu"

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 0.9:
            raise ValueError(f"holdout={self.holdout} must be in (0, 0.9)")
        if self.dataset_per_class < 5:
            raise ValueError(f"dataset_per_class={self.dataset_per_class} must be >= 5")


@dataclass
class Capture:
    """Live samples being collected for a label (teach / live source)."""

    label: str
    until: float
    samples: list[tuple[dict[str, list[np.ndarray]], np.ndarray]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


class Agent:
    def __init__(self, cfg: AgentConfig, control: ControlConfig, serve: ServeConfig, learner: LearnerConfig,
                 *, context: zmq.Context | None = None) -> None:
        self.cfg, self.serve_cfg, self.learner_cfg = cfg, serve, learner
        self.ctx = context or zmq.Context.instance()
        torch.set_num_threads(serve.torch_threads)
        self.features = FeatureExtractor(kind=cfg.backend, model_dir=cfg.model_dir, threads=serve.backend_threads)
        self.intake = SensorIntake(IntakeConfig(endpoints=cfg.sensors, stale_s=cfg.stale_s, camera_topic=serve.camera_topic,
                                                mic_topic=serve.mic_topic, imu_topic=serve.imu_topic), self.ctx)
        self.store = CheckpointStore(cfg.checkpoint_dir, keep=cfg.keep_checkpoints)
        self.jobs = JobTracker()
        self.control = ControlServer(control, jobs=self.jobs)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()  # guards learner swap, tasks, pending samples, captures
        self.learner: Learner = self._new_learner()
        self.tasks: list[dict[str, Any]] = []
        self.version = 0
        self.persisted = True  # False: the serving model is newer than the last checkpoint
        self.notices: deque[str] = deque(maxlen=20)
        self.taught: dict[str, list[tuple[dict[str, list[np.ndarray]], np.ndarray]]] = {}
        self.capture: Capture | None = None
        self.latency_ms: deque[float] = deque(maxlen=2000)
        self.predictions = 0
        self.errors: dict[str, int] = {}
        self._pub: zmq.Socket | None = None
        self._serve_thread: threading.Thread | None = None
        self._register_commands()

    # ------------------------------------------------------------------ learner & state
    def _new_learner(self) -> Learner:
        return Learner(self.features.dims, self.learner_cfg)

    def _learner_state(self, learner: Learner) -> dict[str, Any]:
        buf = learner.buffer
        return {"learner": learner.state_dict(), "buffer": None if buf is None else buf.state_dict()}

    def _learner_from(self, state: dict[str, Any], meta: dict[str, Any], where: str) -> Learner:
        want = self.features.fingerprints()
        have = meta.get("fingerprints")
        if have is not None and have != want:
            raise RuntimeError(f"checkpoint {where} was trained on other backbone models: its manifest fingerprints "
                               f"{have} differ from the loaded models' {want}; rebuild the same models "
                               f"(python -m export build) or start from an empty state directory")
        learner = self._new_learner()
        learner.load_state_dict(state["learner"])
        if state.get("buffer") is not None:
            learner.strategy.buffer = ReplayBuffer.from_state_dict(state["buffer"])
        return learner

    def restore(self) -> bool:
        """Resume from the last good checkpoint; False when there is none."""
        try:
            res = self.store.load_latest()
        except NoCheckpointError:
            return False
        for bad in res.corrupt:
            self._notice(f"checkpoint {bad.name} is corrupt ({bad.reason}); moved to {bad.moved_to}")
        learner = self._learner_from(res.state, res.meta, res.name)
        with self._lock:
            self.learner = learner
            self.tasks = list(res.meta.get("tasks", []))
            self.version = int(res.meta.get("version", 0))
        log.info("resumed %s: version %d, %d task(s), classes %s%s", res.name, self.version, len(self.tasks),
                 learner.class_names, " (fell back from a corrupt newer one)" if res.fell_back else "")
        return True

    def _commit(self, learner: Learner, tasks: list[dict[str, Any]], version: int) -> str:
        """Write a checkpoint; on failure keep the model in memory and tell the operator."""
        try:
            info = self.store.save(self._learner_state(learner),
                                   meta={"tasks": tasks, "version": version, "fingerprints": self.features.fingerprints()})
        except CheckpointWriteError as exc:
            self._notice(f"checkpoint write failed, model v{version} kept in memory only: {exc}")
            self.persisted = False
            return f"not persisted: {exc}"
        self.persisted = True
        return info.name

    def _notice(self, text: str) -> None:
        log.warning("%s", text)
        self.notices.append(text)

    def _count(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    # ------------------------------------------------------------------ serving
    def start(self) -> Agent:
        self._pub = self.ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100)
        self._pub.bind(self.cfg.predictions)
        self.intake.start()
        self.control.start()
        self._serve_thread = threading.Thread(target=self._serve, name="serve", daemon=True)
        self._serve_thread.start()
        log.info("agent serving: sensors %s, predictions %s, control %s", self.cfg.sensors, self.cfg.predictions,
                 self.control.config.endpoint if hasattr(self.control, "config") else "")
        return self

    def _serve(self) -> None:
        last_seq = -1
        idle_period = 1.0 / self.serve_cfg.idle_rate_hz
        last_t = 0.0
        while not self.stop_event.is_set():
            sample = self.intake.sample(wait_s=0.1, after_seq=last_seq)
            if sample is None:
                continue
            no_new_frame = sample.frame_seq == last_seq or sample.image is None
            if no_new_frame and time.monotonic() - last_t < idle_period:
                # predict from what is there, at most idle_rate_hz
                time.sleep(max(0.0, idle_period - (time.monotonic() - last_t)))
                continue
            last_seq, last_t = sample.frame_seq, time.monotonic()
            try:
                self._predict_and_publish(sample)
            except Exception as exc:  # never let one bad sample stop serving
                self._count(type(exc).__name__)
                log.exception("prediction failed: %s", exc)

    def _predict_and_publish(self, sample: Sample) -> None:
        st = self.features.extract([sample])
        self._maybe_capture(st)
        learner = self.learner  # one read: a swap during this call does not tear the prediction
        msg: dict[str, Any] = {"seq": self.predictions, "stamp_ns": sample.stamp_ns,
                               "frame_stamp_ns": sample.frame_stamp_ns, "present": sample.present,
                               "model_version": self.version}
        if not learner.class_names:
            msg.update(label=None, class_id=-1, confidence=0.0, topk=[])
        else:
            probs = learner.predict(st.taps, st.present).probs[0]
            order = np.argsort(probs)[::-1][: self.serve_cfg.topk]
            names = learner.class_names
            msg.update(label=names[order[0]], class_id=int(order[0]), confidence=float(probs[order[0]]),
                       topk=[[names[i], float(probs[i])] for i in order])
        latency = (time.time_ns() - sample.stamp_ns) / 1e6
        msg["latency_ms"] = round(latency, 3)
        assert self._pub is not None
        try:
            self._pub.send_multipart([b"prediction", msgpack.packb(msg)], flags=zmq.NOBLOCK)
        except zmq.Again:
            self._count("prediction_hwm")
        self.latency_ms.append(latency)
        self.predictions += 1

    def _maybe_capture(self, st: SampleTaps) -> None:
        cap = self.capture
        if cap is None:
            return
        if time.monotonic() > cap.until:
            cap.done.set()
            return
        cap.samples.append(({m: [x[0:1] for x in lv] for m, lv in st.taps.items()}, st.present[0:1]))

    def capture_live(self, label: str, seconds: float, handle: JobHandle | None = None) -> int:
        """Collect the live samples of the next ``seconds`` under ``label``."""
        cap = Capture(label=label, until=time.monotonic() + seconds)
        self.capture = cap
        try:
            end = cap.until
            while not cap.done.wait(0.2):
                if handle is not None:
                    handle.check_cancelled()
                    left = max(0.0, end - time.monotonic())
                    handle.update(phase=f"capturing {label!r}: show it now ({left:.0f} s left, {len(cap.samples)} samples)")
                if time.monotonic() > end + 1.0:  # no samples arriving: do not wait for the serve loop
                    break
        finally:
            self.capture = None
        with self._lock:
            self.taught.setdefault(label, []).extend(cap.samples)
        return len(cap.samples)

    # ------------------------------------------------------------------ learning
    def _samples_for(self, source: dict[str, Any], labels: list[str], handle: JobHandle) -> SampleTaps:
        """Taps and label names of a learn-new-task source."""
        kind = source["kind"]
        if kind == "live":
            for i, lab in enumerate(labels):
                handle.update(progress=0.3 * i / len(labels))
                self.capture_live(lab, float(source["seconds"]), handle)
            return self._taught(labels)
        if kind == "taught":
            return self._taught(labels)
        if kind == "dataset":
            samples, names = dataset_samples(labels, source["split"], per_class=self.serve_cfg.dataset_per_class,
                                             seed=self.cfg.seed + len(self.tasks))
        else:
            paths = [Path(p) for p in str(source["path"]).split(",")]
            topics = {"image": self.serve_cfg.camera_topic, "audio": self.serve_cfg.mic_topic, "imu": self.serve_cfg.imu_topic}
            samples, names = mcap_samples(paths, labels, topics=topics)
        return self._extract(samples, names, handle)

    def _extract(self, samples: list[Sample], names: list[str], handle: JobHandle, batch: int = 16) -> SampleTaps:
        parts: list[SampleTaps] = []
        for s in range(0, len(samples), batch):
            handle.check_cancelled()
            handle.update(progress=0.3 * s / len(samples), phase=f"extracting features {s}/{len(samples)}")
            parts.append(self.features.extract(samples[s : s + batch]))
        taps = {m: [np.concatenate([p.taps[m][b] for p in parts]) for b in range(len(parts[0].taps[m]))] for m in MODALITIES}
        st = SampleTaps(taps=taps, present=np.concatenate([p.present for p in parts]))
        st.names = names  # type: ignore[attr-defined]
        return st

    def _taught(self, labels: list[str]) -> SampleTaps:
        with self._lock:
            missing = [lab for lab in labels if not self.taught.get(lab)]
            if missing:
                raise CommandError("bad_args", f"no taught samples for {missing}; run `teach LABEL` first or use live:SECONDS")
            items = [(lab, t, p) for lab in labels for t, p in self.taught[lab]]
        taps = {m: [np.concatenate([t[m][b] for _, t, _ in items]) for b in range(len(items[0][1][m]))] for m in MODALITIES}
        st = SampleTaps(taps=taps, present=np.concatenate([p for _, _, p in items]))
        st.names = [lab for lab, _, _ in items]  # type: ignore[attr-defined]
        return st

    def learn(self, name: str, labels: list[str], source: dict[str, Any], handle: JobHandle) -> dict[str, Any]:
        """The learn-new-task job: collect -> train a copy -> gate -> commit -> swap."""
        t0 = time.perf_counter()
        _lower_thread_priority(self.serve_cfg.job_nice)
        with self._lock:
            if any(t["name"] == name for t in self.tasks):
                raise CommandError("bad_args", f"a task named {name!r} exists already; pick another name")
            known = [lab for t in self.tasks for lab in t["labels"]]
        clash = [lab for lab in labels if lab in known]
        if clash:
            raise CommandError("bad_args", f"labels {clash} belong to a learned task; class-incremental tasks need new labels")
        handle.update(progress=0.0, phase="collecting samples")
        st = self._samples_for(source, labels, handle)
        names = np.asarray(st.names)  # type: ignore[attr-defined]
        counts = {lab: int((names == lab).sum()) for lab in labels}
        if min(counts.values()) < 3:
            raise CommandError("too_few_samples", f"need >= 3 samples per label, got {counts}")
        serving = self.learner
        candidate = _clone(serving)
        task_id = len(self.tasks)
        rng = np.random.default_rng(self.cfg.seed + task_id)
        hold = np.zeros(len(names), dtype=bool)
        for lab in labels:
            idx = rng.permutation(np.flatnonzero(names == lab))
            hold[idx[: max(1, int(round(len(idx) * self.serve_cfg.holdout)))]] = True

        def part(mask: np.ndarray) -> LabelledSamples:
            return LabelledSamples(taps={m: [x[mask] for x in lv] for m, lv in st.taps.items()}, present=st.present[mask],
                                   names=[str(n) for n in names[mask]])

        train, held = part(~hold), part(hold)
        old = _replay_data(serving)
        before_old = serving.evaluate(old) if old is not None else None
        handle.update(progress=0.3, phase=f"training on {len(train.names)} samples")

        def progress(step: int, total: int) -> None:
            handle.update(progress=0.3 + 0.6 * step / max(total, 1), phase=f"training step {step}/{total}")

        report = candidate.learn_task(train, progress=progress, cancel=handle.cancel_event)
        handle.check_cancelled()
        handle.update(progress=0.92, phase="gate")
        new_acc = candidate.evaluate(held)
        after_old = candidate.evaluate(old) if old is not None else None
        drop = (before_old - after_old) if before_old is not None and after_old is not None else 0.0
        result: dict[str, Any] = {"task": name, "labels": labels, "samples": counts, "new_task_acc": round(new_acc, 4),
                                  "old_acc_before": before_old, "old_acc_after": after_old, "old_drop": round(drop, 4),
                                  "train_seconds": round(report.seconds, 2)}
        reasons = []
        if new_acc < self.cfg.min_new_task_acc:
            reasons.append(f"new-task accuracy {new_acc:.3f} < {self.cfg.min_new_task_acc}")
        if drop > self.cfg.max_old_task_drop:
            reasons.append(f"old-task accuracy dropped {drop:.3f} > {self.cfg.max_old_task_drop}")
        if reasons:
            result.update(accepted=False, reason="; ".join(reasons))
            self._notice(f"task {name!r} rejected by the gate: {result['reason']}")
            return result
        handle.update(progress=0.96, phase="commit")
        with self._lock:
            ids = [candidate.class_names.index(lab) for lab in labels]
            tasks = [*self.tasks, {"name": name, "labels": labels, "classes": ids, "task": task_id,
                                   "new_task_acc": round(new_acc, 4), "samples": counts}]
            version = self.version + 1
        result["checkpoint"] = self._commit(candidate, tasks, version)
        with self._lock:
            self.learner, self.tasks, self.version = candidate, tasks, version  # the atomic swap
            for lab in labels:
                self.taught.pop(lab, None)
        result.update(accepted=True, model_version=version, seconds=round(time.perf_counter() - t0, 2))
        log.info("learned task %r: %s", name, result)
        return result

    def evaluate(self, split: str, handle: JobHandle | None = None) -> dict[str, Any]:
        """Accuracy of the serving model on each learned task's classes from a dataset split."""
        learner, tasks = self.learner, list(self.tasks)
        out = []
        for t in tasks:
            samples, names = dataset_samples(t["labels"], split, per_class=self.serve_cfg.eval_per_class, seed=1_000 + t["task"])
            st = self.features.extract(samples) if handle is None else self._extract(samples, names, handle)
            acc = learner.evaluate(LabelledSamples(taps=st.taps, present=st.present, names=names))
            out.append({"task": t["name"], "accuracy": round(acc, 4), "samples": len(names)})
        return {"split": split, "model_version": self.version, "tasks": out}

    # ------------------------------------------------------------------ control commands
    def status(self) -> dict[str, Any]:
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(0)
        health = {m: vars(h) for m, h in self.intake.health().items()}
        return {
            "model_version": self.version,
            "classes": self.learner.class_names,
            "tasks": [t["name"] for t in self.tasks],
            "persisted": self.persisted,
            "predictions": self.predictions,
            "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat.size else None,
                           "p99": float(np.percentile(lat, 99)) if lat.size else None, "n": int(lat.size)},
            "sensors": health,
            "stale": [m for m, h in health.items() if not h["healthy"]],
            "intake": self.intake.reader_stats(),
            "errors": dict(self.errors),
            "job": self.jobs.snapshot(),
            "taught": {k: len(v) for k, v in self.taught.items()},
            "notices": list(self.notices),
        }

    def _register_commands(self) -> None:
        c = self.control
        c.register("status", self.status, COMMANDS["status"], help="model, sensors, latency, job")
        c.register("tasks", lambda: {"tasks": list(self.tasks)}, COMMANDS["tasks"], help="learned tasks")

        def learn(name: str, labels: list[str], source: str) -> dict[str, Any]:
            src = {"kind": "taught"} if source == "taught" else parse_source(source)
            job = self.jobs.start("learn-new-task", lambda h: self.learn(name, labels, src, h),
                                  meta={"task": name, "labels": labels, "source": source})
            return {"job": job}

        schema = dict(COMMANDS["learn-new-task"])
        schema["source"] = Arg(str, required=True, max=4096, check=lambda s: s == "taught" or parse_source(s),
                               help="live:SECONDS | mcap:PATH[,PATH...] | dataset:SPLIT | taught")
        c.register("learn-new-task", learn, schema, help="learn a new task in the background")

        def teach(label: str, seconds: float) -> dict[str, Any]:
            job = self.jobs.start("teach", lambda h: {"label": label, "samples": self.capture_live(label, seconds, h)},
                                  meta={"label": label})
            return {"job": job}

        c.register("teach", teach, COMMANDS["teach"], help="label the live samples of the next SECONDS")
        c.register("cancel", lambda: {"cancelled": self.jobs.cancel()}, COMMANDS["cancel"], help="cancel the job")
        c.register("rollback", self.rollback, COMMANDS["rollback"], help="back to the previous checkpoint")
        c.register("save", self.save, COMMANDS["save"], help="write a checkpoint now")
        c.register("shutdown", self.request_shutdown, COMMANDS["shutdown"], help="save and exit")

        def evaluate(split: str) -> dict[str, Any]:
            return {"job": self.jobs.start("evaluate", lambda h: self.evaluate(split, h), meta={"split": split})}

        c.register("evaluate", evaluate, {"split": Arg(str, default="test", choices=("train", "test"))},
                   help="accuracy per learned task on a dataset split (background job)")

    def rollback(self) -> dict[str, Any]:
        if self.jobs.active() is not None:
            raise CommandError("busy", "a job is running; cancel it first")
        try:
            res = self.store.rollback()
        except NoCheckpointError as exc:
            raise CommandError("no_checkpoint", str(exc)) from None
        learner = self._learner_from(res.state, res.meta, res.name)
        with self._lock:
            self.learner, self.tasks = learner, list(res.meta.get("tasks", []))
            self.version = int(res.meta.get("version", 0))
        return {"checkpoint": res.name, "model_version": self.version, "tasks": [t["name"] for t in self.tasks]}

    def save(self) -> dict[str, Any]:
        with self._lock:
            learner, tasks, version = self.learner, list(self.tasks), self.version
        return {"checkpoint": self._commit(learner, tasks, version), "model_version": version}

    def request_shutdown(self) -> dict[str, Any]:
        self.stop_event.set()
        return {"stopping": True}

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self.stop_event.set()
        self.jobs.cancel()
        if self._serve_thread is not None:
            self._serve_thread.join(timeout=5.0)
        if not self.persisted and self.version:
            self.save()
        self.control.stop()
        self.intake.stop()
        if self._pub is not None:
            self._pub.close(0)
        self.features.close()


def _lower_thread_priority(nice: int) -> None:
    """Renice the calling thread only (Linux: a thread id is a PRIO_PROCESS target), so the
    kernel schedules the serving threads first while a task trains on the same cores."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # not permitted here: train at normal priority
        log.debug("could not renice the job thread: %s", exc)


def _clone(learner: Learner) -> Learner:
    """An independent copy (model, strategy state, buffer) to train while the original serves."""
    twin = Learner(learner.tap_dims, learner.config)
    twin.strategy = copy.deepcopy(learner.strategy)
    twin.class_names = list(learner.class_names)
    return twin


def _replay_data(learner: Learner) -> TaskData | None:
    """The replay buffer's samples of the old tasks, for the forgetting gate."""
    buf = learner.buffer
    if buf is None or len(buf) == 0:
        return None
    rb = buf.all()
    return TaskData(taps=rb.taps, present=rb.present, labels=rb.labels, task=0, name="replay")


def _initial_task(agent: Agent, spec: str) -> None:
    """Learn ``name:label,label:source`` synchronously at first start (no checkpoint yet)."""
    name, labels, source = spec.split(":", 2)
    job = agent.jobs.start("initial-task", lambda h: agent.learn(name, labels.split(","), parse_source(source), h))
    snap = agent.jobs.wait(job, timeout_s=600.0)
    log.info("initial task: %s", snap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML file with [agent], [control], [serve], [learner] tables")
    parser.add_argument("--insecure", action="store_true", help="no CurveZMQ on the control socket (development only)")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "torch", "tensorrt"))
    parser.add_argument("--state", help="checkpoint directory (overrides [agent] checkpoint_dir)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(AgentConfig, args.config, "agent", backend=args.backend, checkpoint_dir=args.state)
        ccfg = load_config(ControlConfig, args.config, "control", insecure=True if args.insecure else None)
        scfg = load_config(ServeConfig, args.config, "serve")
        lcfg = load_config(LearnerConfig, args.config, "learner")
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    for c in (cfg, ccfg, scfg, lcfg):
        log.info("config: %s", format_config(c))
    agent = Agent(cfg, ccfg, scfg, lcfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stop_event.set())
    try:
        resumed = agent.restore()
    except (RuntimeError, ValueError) as exc:
        log.error("cannot resume: %s", exc)
        agent.features.close()
        return 2
    agent.start()
    if not resumed and scfg.initial_task:
        _initial_task(agent, scfg.initial_task)
    try:
        while not agent.stop_event.wait(0.5):
            pass
    finally:
        log.info("stopping: saving state")
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
