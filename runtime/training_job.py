"""What a learning worker computes (torch lives here, never in the serving process).

``learn`` takes the serving state (learner, replay buffer, held-out reservoir), the new task's
samples and the job's settings, and produces a *candidate* state plus the figures the agent's
gate decides on:

1. split the new task's samples (``runtime.gate.holdout_split``: time blocks for live captures);
2. score the serving model on the held-out reservoir of the old classes (never trained on);
3. train a copy on the training split (the strategy mixes in replayed samples itself);
4. score the candidate on the new task's holdout and on the same reservoir;
5. add the holdout to the reservoir, so later tasks are checked on it;
6. fit the open-set prototypes on the candidate's replay buffer and calibrate their distance
   thresholds on the reservoir (held-out samples of every learned class);
7. export the candidate's prediction to ONNX for the serving process: its weights filled into
   the template the worker traced while the operator was capturing (``prepare_export``), or a
   fresh trace; either way the export checks itself against torch on every presence pattern
   and refuses a mismatch.

``evaluate`` scores a state's *served* model (the ONNX export) on a dataset split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.errors import CommandError
from runtime.gate import holdout_split
from runtime.statefiles import StateFiles
from training.buffer import ReplayBuffer
from training.config import LearnerConfig
from training.taskdata import TaskData

log = logging.getLogger(__name__)
MODALITIES = ("image", "audio", "imu")


@dataclass
class TaskSamples:
    """The new task's samples: taps per modality, presence, camera stamps (0: none), label names;
    for a fleet peer's skill, its logits (N, k) over the task's labels ``soft_names``."""

    taps: dict[str, list[np.ndarray]]
    present: np.ndarray
    stamps: np.ndarray
    names: list[str]
    soft: np.ndarray | None = None
    soft_names: list[str] | None = None

    def subset(self, mask: np.ndarray) -> TaskSamples:
        return TaskSamples({m: [x[mask] for x in lv] for m, lv in self.taps.items()}, self.present[mask],
                           self.stamps[mask], [n for n, k in zip(self.names, mask, strict=True) if k],
                           None if self.soft is None else self.soft[mask], self.soft_names)


@dataclass(kw_only=True)
class LearnSettings:
    """The job's knobs, as the agent sends them (``runtime.learning``): copied from its ``[serve]``
    table (``ServeConfig``, which holds their one default) and its seed, so none has a default here."""

    holdout: float
    holdout_guard_s: float
    reservoir_size: int
    reservoir_bytes: int
    open_set_quantile: float
    open_set_margin: float
    open_set_rule: str
    seed: int
    min_per_label: int = 4  # the worker's own rule: fewer samples of a label cannot be split


@dataclass
class Candidate:
    files: StateFiles  # learner, buffer, reservoir, serving (meta left to the agent)
    report: dict[str, Any] = field(default_factory=dict)


def load_state(base: StateFiles | None, tap_dims: dict[str, list[int]], config: LearnerConfig
               ) -> tuple[Any, ReplayBuffer | None]:
    """(Learner, held-out reservoir) from a checkpoint's files, or fresh ones."""
    from training.learner import Learner

    learner = Learner(tap_dims, config)
    if base is None:
        return learner, None
    state = base.decode(["learner", "buffer", "reservoir"] if "reservoir" in base.entries else ["learner", "buffer"])
    learner.load_state_dict(state["learner"])
    if state.get("buffer") is not None:
        learner.strategy.buffer = ReplayBuffer.from_state_dict(state["buffer"], seed=config.training.seed)
    res = state.get("reservoir")
    return learner, None if res is None else ReplayBuffer.from_state_dict(res, seed=config.training.seed + 1)


def _accuracy(learner: Any, data: TaskData | None) -> float | None:
    return None if data is None or len(data) == 0 else float(learner.evaluate(data))


def _reservoir_data(res: ReplayBuffer | None, classes: set[int] | None = None) -> TaskData | None:
    if res is None or len(res) == 0:
        return None
    rb = res.all()
    keep = np.ones(len(rb), bool) if classes is None else np.isin(rb.labels, sorted(classes))
    if not keep.any():
        return None
    return TaskData(taps={m: [x[keep] for x in lv] for m, lv in rb.taps.items()}, present=rb.present[keep],
                    labels=rb.labels[keep], task=0, name="reservoir")


def per_task_accuracy(learner: Any, res: ReplayBuffer | None, tasks: list[dict[str, Any]]) -> list[float | None]:
    """Accuracy on each task's classes in the reservoir (a row of the accuracy matrix)."""
    index = {n: i for i, n in enumerate(learner.class_names)}
    return [_accuracy(learner, _reservoir_data(res, {index[lab] for lab in t["labels"] if lab in index}))
            for t in tasks]


def prepare_export(learner: Any, labels: list[str]) -> Any:
    """The ONNX template of the predictor this task will produce (``training.onnx_export``),
    traced while the operator is still capturing: after training only the weights are filled in
    (0.3 s instead of a 2-4 s trace between the end of the capture and the swap). None, logged,
    when the dry run fails: the export then traces afresh."""
    from training.onnx_export import predictor_template

    try:
        template = predictor_template(learner, labels)
    except Exception as exc:  # the template is an optimisation: never fail the job for it
        log.warning("no export template (%s: %s); the export will trace afresh", type(exc).__name__, exc)
        return None
    log.info("export template for %d classes traced in %.2f s", template.n_classes, template.seconds)
    return template


def learn(state: tuple[Any, ReplayBuffer | None], samples: TaskSamples, *, name: str, labels: list[str],
          tasks: list[dict[str, Any]], tap_dims: dict[str, list[int]], settings: LearnSettings,
          progress: Callable[[float | None, str], None], cancel: Any, template: Any = None) -> Candidate:
    """See the module docstring. ``state``: ``load_state``'s (learner, reservoir), loaded before the
    samples arrive; ``tasks``: the learned tasks (names, labels) before this one; ``template``:
    ``prepare_export``'s, or None (the export traces)."""
    from runtime.serving_model import serving_entry
    from training.learner import LabelledSamples
    from training.onnx_export import export
    from training.openset import OpenSet

    t0 = time.perf_counter()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.perf_counter() - t0 - sum(marks.values()), 3)

    names = np.asarray(samples.names)
    counts = {lab: int((names == lab).sum()) for lab in labels}
    if min(counts.values()) < settings.min_per_label:
        raise CommandError("too_few_samples", f"need >= {settings.min_per_label} samples per label, got {counts}")
    split = holdout_split(samples.names, samples.stamps, share=settings.holdout, guard_s=settings.holdout_guard_s,
                          seed=settings.seed + len(tasks))
    train, held = samples.subset(split.train), samples.subset(split.holdout)
    progress(0.32, f"split: {int(split.train.sum())} train, {int(split.holdout.sum())} held out, "
                   f"{int(split.dropped.sum())} guard ({', '.join(sorted(set(split.how.values())))})")
    learner, reservoir = state
    old = _reservoir_data(reservoir)
    before_old = _accuracy(learner, old)
    mark("load")

    def on_step(step: int, total: int) -> None:
        progress(0.35 + 0.45 * step / max(total, 1), f"training step {step}/{total}")

    report = learner.learn_task(LabelledSamples(taps=train.taps, present=train.present, names=train.names,
                                                soft=train.soft, soft_names=train.soft_names),
                                progress=on_step, cancel=cancel)
    mark("train")
    progress(0.82, "gate figures")
    held_ls = LabelledSamples(taps=held.taps, present=held.present, names=held.names)
    new_acc = float(learner.evaluate(held_ls))
    after_old = _accuracy(learner, old)
    # the holdout joins the reservoir: later tasks are checked on it, training never sees it
    if reservoir is None:
        reservoir = ReplayBuffer(settings.reservoir_size, settings.reservoir_bytes, "float16", seed=settings.seed + 1)
    ids = np.asarray([learner.class_names.index(n) for n in held.names], np.int64)
    reservoir.add_batch(held.taps, held.present, ids, task=len(tasks), stamps=held.stamps)
    all_tasks = [*tasks, {"name": name, "labels": labels}]
    row = per_task_accuracy(learner, reservoir, all_tasks)
    mark("gate")
    progress(0.86, "open-set calibration")
    rb = learner.buffer.all()
    openset = OpenSet.fit(rb.taps, rb.present, rb.labels, num_classes=len(learner.class_names),
                          modalities=list(tap_dims))
    openset.rule = settings.open_set_rule
    rall = reservoir.all()
    openset.calibrate(rall.taps, rall.present, rall.labels, quantile=settings.open_set_quantile,
                      margin=settings.open_set_margin)
    mark("openset")
    progress(0.9, "exporting the serving model (ONNX)")
    exported = export(learner, template)  # checked against torch on every presence pattern (ValueError)
    serving = serving_entry(exported.onnx, class_names=list(learner.class_names), tap_dims=tap_dims)
    serving["openset"] = openset.state_dict()
    mark("export")
    files = StateFiles.encode({"learner": learner.state_dict(), "buffer": learner.buffer.state_dict(),
                               "reservoir": reservoir.state_dict(), "serving": serving})
    mark("encode")
    novelty = openset.score(held.taps, held.present)
    out = {"samples": counts, "train_samples": int(split.train.sum()), "holdout_samples": int(split.holdout.sum()),
           "guard_samples": int(split.dropped.sum()), "split": split.how, "new_task_acc": round(new_acc, 4),
           "old_acc_before": None if before_old is None else round(before_old, 4),
           "old_acc_after": None if after_old is None else round(after_old, 4),
           "accuracy_row": [None if a is None else round(a, 4) for a in row],
           "holdout_known_rate": round(float(np.mean(novelty <= 1.0)), 4) if len(novelty) else None,
           "train_seconds": round(report.seconds, 2), "steps": report.steps,
           "stopped": report.stopped, "classes": list(learner.class_names),
           "export": exported.how, "worker_seconds": round(time.perf_counter() - t0, 2), "timings_s": marks}
    return Candidate(files=files, report=out)


def skill_samples(data: bytes) -> TaskSamples:
    """A skill package's exemplars as a task's samples (no stamps: the holdout is a random split),
    with the sender's logits for distillation. The agent verified the signature before it wrote
    the file; here the checksum is checked again (``training.skills.SkillRefused``)."""
    from training import skills

    header = skills.read_header(data, None)
    ex = skills.exemplars(data, header)
    return TaskSamples(taps=ex.taps, present=ex.present, stamps=np.zeros(len(ex.names), np.int64), names=ex.names,
                       soft=ex.soft, soft_names=list(header["labels"]))


def write_skill_parts(job: Any, learner: Any, spec: dict[str, Any], labels: list[str], task: str) -> dict[str, Any]:
    """The unsigned skill package of ``labels`` from ``learner`` into the job directory
    (``skill.header.json``, ``skill.payload``): the agent signs it, the worker never holds the key."""
    from training import skills

    s = spec["skill"]
    header, payload = skills.build(learner, task=task, labels=labels, fingerprints=spec["fingerprints"],
                                   origin=s["origin"], max_bytes=int(s["max_bytes"]), seed=int(spec["seed"]))
    (job / "skill.header.json").write_text(json.dumps(header))
    (job / "skill.payload").write_bytes(payload)
    return {"skill_exemplars": header["exemplars"], "skill_payload_bytes": len(payload)}


def evaluate(base: StateFiles, samples: TaskSamples, tasks: list[dict[str, Any]], *, threads: int = 1
             ) -> list[dict[str, Any]]:
    """Accuracy of the served (ONNX) model per learned task on ``samples`` (names = labels)."""
    from runtime.serving_model import ServingModel

    entry = base.decode(["serving"])["serving"]
    model = ServingModel.from_entry(entry, threads=threads)
    probs = np.concatenate([model.predict({m: [x[s:s + 256] for x in lv] for m, lv in samples.taps.items()},
                                          samples.present[s:s + 256]) for s in range(0, len(samples.names), 256)])
    pred = np.asarray(model.class_names)[probs.argmax(1)]
    names = np.asarray(samples.names)
    out = []
    for t in tasks:
        mask = np.isin(names, t["labels"])
        acc = float((pred[mask] == names[mask]).mean()) if mask.any() else None
        out.append({"task": t["name"], "accuracy": None if acc is None else round(acc, 4), "samples": int(mask.sum())})
    return out
