"""The runtime-facing learner: side network + strategy ("ours" by default) + replay buffer.

The runtime calls ``predict`` on every synchronised sample and ``learn_task`` in a background
thread when the operator asks for a new task. Why training works on a copy: predictions must
never stop and must never see a half-trained model, so ``learn_task`` trains a deep copy of the
strategy (model, buffer, Fisher) and swaps it in under a lock only when training finished; a
cancelled task leaves the learner exactly as it was. Memory is bounded by the buffer's limits,
``max_task_samples`` and one model copy; time by ``epochs`` and ``max_seconds``; CPU by
``threads``.

``state_dict`` holds everything but the buffer (``ReplayBuffer.state_dict``): config, class
names, model weights incl. expert usage counters and freeze masks (MoE buffers), the strategy's
extra state (Fisher, anchors, routing history) and the random generators' states (torch's global
one, which modality dropout and gate noise draw from; the strategy's numpy generator for replay
and Fisher samples; the buffer keeps its own reservoir generator), so that a loaded learner goes
on exactly as the saved one would have. Python's ``random`` is not used by training.

``save``/``load`` (see ``training.learner_state``): learner state and buffer in *one* new
generation directory, committed by a single rename; no pickle is ever loaded (tensors with
``torch.load(weights_only=True)``, everything else JSON), every file is checked against a
sealed manifest, and a corrupt newest generation falls back to the previous one with a reason.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import learner_state
from training.buffer import ReplayBuffer
from training.config import LearnerConfig
from training.model import SideNetwork
from training.registry import get as get_strategy
from training.strategies.base import TaskReport, torch_threads
from training.taskdata import TaskData

log = logging.getLogger(__name__)
FORMAT = 1


@dataclass
class LabelledSamples:
    """Samples collected for a new task: taps per modality, presence (N, K) and class names;
    optionally a teacher's logits (N, k) over the classes ``soft_names`` (a fleet peer's)."""

    taps: dict[str, list[np.ndarray]]
    present: np.ndarray
    names: Sequence[str]
    soft: np.ndarray | None = None
    soft_names: Sequence[str] | None = None


@dataclass
class Prediction:
    """probs (B, C); label (B,) class index; name (B,) class names; confidence (B,) max prob."""

    probs: np.ndarray
    label: np.ndarray
    name: list[str]
    confidence: np.ndarray


TapsLike = Mapping[str, Any]  # modality -> list of (B, dim) arrays, or an export.Taps


def _levels(value: Any) -> list[np.ndarray]:
    if hasattr(value, "values") and isinstance(value.values, dict):  # export.Taps
        value = list(value.values.values())
    return [np.asarray(x, dtype=np.float32) for x in value]


class Learner:
    """Thread-safe: ``predict`` may run while ``learn_task`` trains in another thread."""

    def __init__(self, tap_dims: dict[str, list[int]], config: LearnerConfig | None = None) -> None:
        self.config = config or LearnerConfig()
        self.tap_dims = {m: [int(x) for x in d] for m, d in tap_dims.items()}
        self.modalities = list(self.tap_dims)
        self.class_names: list[str] = []
        self._lock = threading.Lock()
        self._learning = threading.Lock()
        self.strategy = self._new_strategy()
        self.load_report: learner_state.LoadReport | None = None  # set by ``load``: which generation, what was skipped

    def _new_strategy(self):
        torch.manual_seed(self.config.training.seed)
        model = SideNetwork(self.config.model_config(self.tap_dims))
        t = self.config.training
        buffer = ReplayBuffer(t.buffer_size, t.buffer_bytes, t.buffer_dtype, seed=t.seed)
        return get_strategy(self.config.strategy)(model, self.config.strategy_config(), buffer=buffer)

    @property
    def model(self) -> SideNetwork:
        return self.strategy.model

    @property
    def buffer(self) -> ReplayBuffer | None:
        return self.strategy.buffer

    # ---- inference -----------------------------------------------------------------------------
    def _batch(self, taps: TapsLike, present_modalities: Sequence[str] | np.ndarray | None
               ) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
        given = {m: _levels(v) for m, v in taps.items() if m in self.tap_dims}
        if not given:
            raise ValueError(f"predict: no taps for any of {self.modalities}, got {sorted(taps)}")
        n = next(iter(given.values()))[0].shape[0]
        if isinstance(present_modalities, np.ndarray) and present_modalities.dtype == bool:
            present = present_modalities.reshape(n, len(self.modalities))
        else:
            names = set(given) if present_modalities is None else set(present_modalities)
            present = np.tile([m in names and m in given for m in self.modalities], (n, 1))
        out: dict[str, list[torch.Tensor]] = {}
        for m, dims in self.tap_dims.items():
            levels = given.get(m)
            if levels is None:  # absent: zeros, masked by ``present``
                out[m] = [torch.zeros(n, d) for d in dims]
                continue
            if [x.shape[-1] for x in levels] != dims:
                raise ValueError(f"predict: taps[{m!r}] dims {[x.shape[-1] for x in levels]}, expected {dims}")
            out[m] = [torch.from_numpy(np.ascontiguousarray(x.reshape(n, -1))) for x in levels]
        return out, torch.from_numpy(np.asarray(present, dtype=bool))

    def predict(self, taps: TapsLike, present_modalities: Sequence[str] | np.ndarray | None = None
                ) -> Prediction:
        """Class probabilities for a batch; modalities missing from ``taps`` or not listed as present
        are masked (the model's learned absent token stands in)."""
        t, present = self._batch(taps, present_modalities)
        with self._lock:
            strategy, names = self.strategy, list(self.class_names)
        dev = getattr(strategy, "device", "cpu")
        if str(dev) != "cpu":  # a learner training on the GPU (worker with device="cuda")
            t = {m: [x.to(dev) for x in lv] for m, lv in t.items()}
            present = present.to(dev)
        with torch_threads(self.config.training.threads):
            logits = strategy.predict(t, present).cpu()
        if logits.shape[1] == 0:
            n = present.shape[0]
            return Prediction(np.zeros((n, 0), np.float32), np.full(n, -1), [""] * n, np.zeros(n, np.float32))
        probs = torch.softmax(logits.float(), dim=1).numpy()
        label = probs.argmax(1)
        return Prediction(probs=probs, label=label, name=[names[i] if i < len(names) else str(i) for i in label],
                          confidence=probs.max(1))

    # ---- learning ------------------------------------------------------------------------------
    def _task_data(self, samples: LabelledSamples | TaskData, task: int) -> tuple[TaskData, list[str]]:
        if isinstance(samples, TaskData):
            need = int(samples.labels.max()) + 1 if len(samples) else 0
            names = self.class_names + [f"class_{i}" for i in range(len(self.class_names), need)]
            data = dataclasses.replace(samples, task=task)
        else:
            names = list(self.class_names)
            for n in samples.names:
                if n not in names:
                    names.append(n)
            index = {n: i for i, n in enumerate(names)}
            taps = {m: _levels(samples.taps[m]) if m in samples.taps else
                    [np.zeros((len(samples.names), d), np.float32) for d in dims]
                    for m, dims in self.tap_dims.items()}
            soft_classes = None if samples.soft is None else [index[n] for n in samples.soft_names or ()]
            data = TaskData(taps=taps, present=samples.present, labels=[index[n] for n in samples.names], task=task,
                            soft=samples.soft, soft_classes=soft_classes)
        if len(data) > self.config.max_task_samples:
            rng = np.random.default_rng(self.config.training.seed + task)
            data = data.subset(np.sort(rng.choice(len(data), self.config.max_task_samples, replace=False)))
            log.info("learn_task: subsampled to max_task_samples=%d", self.config.max_task_samples)
        return data, names

    def learn_task(self, samples: LabelledSamples | TaskData, *, progress: Callable[[int, int], None] | None = None,
                   cancel: threading.Event | None = None) -> TaskReport:
        """Train on a new task in the calling thread; swap the result in atomically when done.

        Raises :class:`training.errors.TrainingCancelled` (nothing changed) when ``cancel`` is set.
        """
        with self._learning:
            with self._lock:
                work = copy.deepcopy(self.strategy)
                task = work.tasks_learned
            data, names = self._task_data(samples, task)
            report = work.learn_task(data, progress=progress, cancel=cancel)
            with self._lock:
                self.strategy, self.class_names = work, names
            log.info("learned task %d (%d samples, %d classes) in %.2f s%s", task, len(data), len(names),
                     report.seconds, f", stopped: {report.stopped}" if report.stopped else "")
            return report

    def evaluate(self, samples: LabelledSamples | TaskData) -> float:
        """Accuracy on labelled samples (names unknown to the learner count as wrong)."""
        if isinstance(samples, TaskData):
            return self.strategy.evaluate(samples)
        pred = self.predict(samples.taps, np.asarray(samples.present, dtype=bool))
        return float(np.mean([p == n for p, n in zip(pred.name, samples.names, strict=True)]))

    # ---- state ---------------------------------------------------------------------------------
    def _state_of(self, s: Any, class_names: list[str]) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": s.rng.bit_generator.state}
        if str(getattr(s, "device", "cpu")).startswith("cuda") and torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(s.device)
        return {"format": FORMAT, "config": dataclasses.asdict(self.config), "tap_dims": self.tap_dims,
                "class_names": list(class_names), "num_classes": s.model.num_classes,
                "tasks_learned": s.tasks_learned,
                "model": {k: v.clone() for k, v in s.model.state_dict().items()},
                "strategy": copy.deepcopy(s.extra_state()), "rng": rng}

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return self._state_of(self.strategy, self.class_names)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"learner state format {state.get('format')!r}, expected {FORMAT}")
        if state["tap_dims"] != self.tap_dims:
            raise ValueError(f"learner state tap_dims {state['tap_dims']} differ from {self.tap_dims}")
        work = self._new_strategy()
        if self.buffer is not None:
            work.buffer = self.buffer
        work.model.add_classes(int(state["num_classes"]) - work.model.num_classes)
        work.model.load_state_dict(state["model"])
        work.load_extra_state(state["strategy"])
        work.tasks_learned = int(state["tasks_learned"])
        rng = state.get("rng")  # absent in states saved before RNG states were: seeded afresh
        if rng is not None:
            work.rng.bit_generator.state = rng["numpy"]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and str(work.device).startswith("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], work.device)
        with self._lock:
            self.strategy, self.class_names = work, list(state["class_names"])

    def save(self, directory: str | Path, *, keep: int = 2) -> Path:
        """Learner state and replay buffer as one new generation of ``directory`` (one rename
        commits both: a crash can never pair a new state with an old buffer); the ``keep`` newest
        generations are kept. Returns ``directory``."""
        with self._lock:  # state and buffer of the same strategy (learn_task swaps it under this lock)
            s = self.strategy
            parts = {"learner": self._state_of(s, self.class_names)}
            if s.buffer is not None:
                parts["buffer"] = s.buffer.state_dict()
        name = learner_state.save_generation(Path(directory), parts, keep=keep)
        log.info("learner saved as %s/%s", directory, name)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, config: LearnerConfig | None = None) -> Learner:
        """The newest generation of ``directory`` that verifies (``load_report`` says which, and
        why newer ones were skipped); ``LearnerStateError`` when none does, or for a directory in
        the old pickle format (never unpickled: it could run code)."""
        parts, report = learner_state.load_generation(Path(directory))
        state = parts["learner"]
        learner = cls(state["tap_dims"], config or LearnerConfig.from_saved(state["config"]))
        if parts.get("buffer") is not None:
            learner.strategy.buffer = ReplayBuffer.from_state_dict(parts["buffer"], seed=learner.config.training.seed)
        learner.load_state_dict(state)
        learner.load_report = report
        return learner
