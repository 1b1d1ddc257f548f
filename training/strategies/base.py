"""The strategy base class: owns the training loop; a strategy is a few hooks (Mammoth style).

``Strategy.learn_task(data)`` runs, in order (hooks a subclass may override, and what they get)::

    snapshot self.old_model                        (frozen deep copy taken before the head grows,
                                                    so it scores the old classes only; only when
                                                    needs_old_model and a task was learned)
    grow the head to max(label)+1 classes          (model.add_classes, old rows kept)
    begin_task(data: TaskData)                     set up per-task state; freeze parameters here
    train = train_data(data) -> TaskData           what to train on (joint: every task so far)
    optimizer = make_optimizer()                   Adam over parameters with requires_grad
    for epoch, for minibatch:
        batch: Batch                               new samples + (uses_buffer) replayed ones
        observe(batch) -> dict[str, float]         one step; default below
            out = model(batch.taps, batch.present) ModelOutput (logits, z_joint, z_mod, routing)
            terms = loss(batch, out)               dict name -> scalar Tensor, summed;
                                                   base: {"ce": cross-entropy on the batch}
            backward; before_step(batch, out)      e.g. zero the gradients of frozen experts
            optimizer.step(); after_step()
    end_task(data: TaskData)                       Fisher, buffer insertion (uses_buffer), stats
    -> TaskReport (seconds, steps, mean of every loss term, stopped early or not)

Evaluation: ``predict(taps, present) -> logits`` (NCM overrides it) and ``evaluate(data)``.
Class attributes: ``uses_buffer`` (replay mixing + buffer filled at end_task), ``needs_old_model``,
``trains`` (False: no optimizer, e.g. NCM), ``defaults`` (strategy hyperparameters; override with
``StrategyConfig.params``, unknown keys rejected); classmethod ``model_overrides(params)`` names
ModelConfig fields the strategy needs (base: none). Strategy state to checkpoint beside the model:
``extra_state()`` / ``load_extra_state()``.

Stopping: ``max_seconds`` ends training early but still runs ``end_task`` (report.stopped =
"deadline"); a set ``cancel`` event raises :class:`training.errors.TrainingCancelled` without
``end_task`` (the caller should drop the model).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.buffer import ReplayBuffer
from training.config import StrategyConfig  # torch-free: [learner.training]
from training.errors import TrainingCancelled
from training.model import ModelOutput, SideNetwork
from training.taskdata import TaskData

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class Batch:
    """A training minibatch as tensors; ``replay`` marks rows drawn from the buffer (they come last)."""

    taps: dict[str, list[Tensor]]
    present: Tensor
    labels: Tensor
    tasks: Tensor
    replay: Tensor
    soft: Tensor | None = None  # (B, k) teacher logits over soft_classes; rows without a teacher: NaN
    soft_classes: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_new(self) -> int:
        return int((~self.replay).sum())


@dataclass
class TaskReport:
    task: int
    seconds: float
    steps: int
    samples: int
    losses: dict[str, float]
    stopped: str = ""  # "" | "deadline"


@contextmanager
def torch_threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _tensors(data: TaskData, device: str) -> tuple[dict[str, list[Tensor]], Tensor, Tensor]:
    taps = {m: [torch.as_tensor(x, dtype=torch.float32).to(device) for x in lv] for m, lv in data.taps.items()}
    return taps, torch.as_tensor(data.present).to(device), torch.as_tensor(data.labels).to(device)


class Strategy:
    """Base: plain fine-tuning with cross-entropy. Subclasses override hooks (see module docstring)."""

    name: ClassVar[str] = "base"
    uses_buffer: ClassVar[bool] = False
    needs_old_model: ClassVar[bool] = False
    trains: ClassVar[bool] = True
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, model: SideNetwork, config: StrategyConfig | None = None, *,
                 buffer: ReplayBuffer | None = None) -> None:
        self.config = config or StrategyConfig()
        unknown = sorted(set(self.config.params) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown params {unknown}; known: {sorted(self.defaults)}")
        self.p: dict[str, float] = {**self.defaults, **self.config.params}
        self.device = self.config.device
        self.model = model.to(self.device)
        if buffer is None and self.uses_buffer:
            buffer = ReplayBuffer(self.config.buffer_size, self.config.buffer_bytes, self.config.buffer_dtype,
                                  seed=self.config.seed)
        self.buffer = buffer
        self.rng = np.random.default_rng(self.config.seed)
        self.old_model: SideNetwork | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.tasks_learned = 0
        self.current_task = -1
        self.history: list[TaskReport] = []

    @classmethod
    def model_overrides(cls, params: dict[str, float] | None = None) -> dict[str, Any]:
        """ModelConfig fields this strategy needs (e.g. ``{"adapter": "moe"}``); callers building the
        side network for a strategy apply them. Base: none."""
        return {}

    # ---- hooks ---------------------------------------------------------------------------------
    def begin_task(self, data: TaskData) -> None:
        """Per-task setup, after head growth and the old-model snapshot, before the optimizer."""

    def train_data(self, data: TaskData) -> TaskData:
        """The samples to train on for this task (default: the task's own)."""
        return data

    def make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters (~10x faster steps than the per-tensor loop on CPU)
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=True)

    def loss(self, batch: Batch, out: ModelOutput) -> dict[str, Tensor]:
        """Named loss terms (summed for the step). Base: cross-entropy over every row of the batch."""
        return {"ce": F.cross_entropy(out.logits, batch.labels)}

    def before_step(self, batch: Batch, out: ModelOutput) -> None:
        """After backward, before optimizer.step (gradient surgery, freezing)."""

    def after_step(self) -> None:
        """After optimizer.step."""

    def end_task(self, data: TaskData) -> None:
        """After training on the task. Base: offer the task's samples to the buffer (uses_buffer)."""
        if self.uses_buffer and self.buffer is not None:
            stamp = time.time_ns()
            # stored at the model's pooled width (ModelConfig.tap_pool): the <= 2 KB layout
            self.buffer.add_batch(self.model.pool_taps(data.taps), data.present, data.labels, data.task,
                                  np.full(len(data), stamp, dtype=np.int64))

    def observe(self, batch: Batch) -> dict[str, float]:
        """One optimisation step on ``batch``; returns each loss term's value."""
        assert self.optimizer is not None
        self.model.train()
        out = self.model(batch.taps, batch.present)
        return self.step(batch, out, self.loss(batch, out))

    def step(self, batch: Batch, out: ModelOutput, terms: dict[str, Tensor]) -> dict[str, float]:
        """Sum ``terms``, backward, ``before_step``, optimizer step, ``after_step``; each term's value."""
        assert self.optimizer is not None
        terms = {**terms, **self.soft_term(batch, out)}
        total = torch.stack(list(terms.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.before_step(batch, out)
        self.optimizer.step()
        self.after_step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def extra_state(self) -> dict[str, Any]:
        """Strategy state to checkpoint beside the model (Fisher, class means, ...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    # ---- machinery -----------------------------------------------------------------------------
    def replay_batch(self, n: int) -> Batch | None:
        """``n`` samples from the buffer as a Batch (None when there is no buffer or it is empty)."""
        if self.buffer is None or len(self.buffer) == 0 or n <= 0:
            return None
        rb = self.buffer.sample(n, self.rng)
        dev = self.device
        taps = {m: [torch.from_numpy(x).to(dev) for x in lv] for m, lv in rb.taps.items()}
        return Batch(taps=taps, present=torch.from_numpy(rb.present).to(dev),
                     labels=torch.from_numpy(rb.labels).to(dev), tasks=torch.from_numpy(rb.tasks).to(dev),
                     replay=torch.ones(len(rb), dtype=torch.bool, device=dev))

    @staticmethod
    def cat(a: Batch, b: Batch | None) -> Batch:
        if b is None:
            return a
        taps = {m: [torch.cat([x, y]) for x, y in zip(a.taps[m], b.taps[m], strict=True)] for m in a.taps}
        soft = None
        if a.soft is not None:  # replayed rows have no teacher: NaN rows are skipped by the distillation term
            soft = torch.cat([a.soft, torch.full((len(b), a.soft.shape[1]), float("nan"), device=a.soft.device)])
        return Batch(taps=taps, present=torch.cat([a.present, b.present]), labels=torch.cat([a.labels, b.labels]),
                     tasks=torch.cat([a.tasks, b.tasks]), replay=torch.cat([a.replay, b.replay]),
                     soft=soft, soft_classes=a.soft_classes)

    def soft_term(self, batch: Batch, out: ModelOutput) -> dict[str, Tensor]:
        """Distillation from a teacher's logits where the batch carries them (a fleet peer's, on the
        exemplars it shared): KL(teacher || student) over the teacher's classes at temperature T,
        times T^2 (Hinton et al. 2015) and ``StrategyConfig.soft_weight``. Empty otherwise."""
        w, t = self.config.soft_weight, self.config.soft_temperature
        if batch.soft is None or batch.soft_classes is None or w <= 0:
            return {}
        rows = ~torch.isnan(batch.soft[:, 0])
        if not bool(rows.any()):
            return {}
        student = out.logits[rows][:, batch.soft_classes] / t
        teacher = torch.softmax(batch.soft[rows] / t, dim=1)
        kd = F.kl_div(F.log_softmax(student, dim=1), teacher, reduction="batchmean") * t * t
        return {"kd": w * kd}

    def _check(self, data: TaskData) -> None:
        if data.modalities != self.model.modalities:
            raise ValueError(f"TaskData modalities {data.modalities} differ from the model's {self.model.modalities}")
        if data.tap_dims != self.model.config.tap_dims:
            raise ValueError(f"TaskData tap dims {data.tap_dims} differ from the model's {self.model.config.tap_dims}")

    def learn_task(self, data: TaskData, *, progress: Progress | None = None,
                   cancel: threading.Event | None = None) -> TaskReport:
        """Learn one task (see module docstring for the hook order)."""
        self._check(data)
        t0 = time.perf_counter()
        cfg = self.config
        with torch_threads(cfg.threads):
            self.current_task = data.task
            if self.needs_old_model and self.tasks_learned > 0:  # before growing: old classes only
                self.old_model = copy.deepcopy(self.model).eval()
                for p in self.old_model.parameters():
                    p.requires_grad_(False)
            need = int(data.labels.max()) + 1 if len(data) else 0
            if need > self.model.num_classes:
                self.model.add_classes(need - self.model.num_classes)
            self.begin_task(data)
            train = self.train_data(data)
            sums: dict[str, float] = {}
            steps, stopped = 0, ""
            if self.trains and cfg.epochs > 0 and len(train):
                self.optimizer = self.make_optimizer()
                taps, present, labels = _tensors(train, self.device)
                taps = self.model.pool_taps(taps)  # the width replayed rows are stored at
                tasks = torch.full((len(train),), train.task, dtype=torch.long, device=self.device)
                soft = None if train.soft is None else torch.as_tensor(train.soft).to(self.device)
                soft_classes = None if train.soft_classes is None else torch.as_tensor(train.soft_classes).to(self.device)
                n, bs = len(train), cfg.batch_size
                per_epoch = (n + bs - 1) // bs
                total = per_epoch * cfg.epochs
                gen = torch.Generator().manual_seed(cfg.seed * 1000 + data.task)
                for _ in range(cfg.epochs):
                    order = torch.randperm(n, generator=gen).to(self.device)
                    for s in range(per_epoch):
                        if cancel is not None and cancel.is_set():
                            raise TrainingCancelled(f"{self.name}: cancelled at step {steps}/{total} of task {data.task}")
                        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
                            stopped = "deadline"
                            break
                        idx = order[s * bs : (s + 1) * bs]
                        new = Batch(taps={m: [x[idx] for x in lv] for m, lv in taps.items()}, present=present[idx],
                                    labels=labels[idx], tasks=tasks[idx],
                                    replay=torch.zeros(len(idx), dtype=torch.bool, device=self.device),
                                    soft=None if soft is None else soft[idx], soft_classes=soft_classes)
                        batch = self.cat(new, self.replay_batch(cfg.replay_batch) if self.uses_buffer else None)
                        for k, v in self.observe(batch).items():
                            sums[k] = sums.get(k, 0.0) + v
                        steps += 1
                        if progress is not None:
                            progress(steps, total)
                    if stopped:
                        log.info("%s: task %d stopped at the %.1f s deadline after %d/%d steps",
                                 self.name, data.task, cfg.max_seconds, steps, total)
                        break
            self.model.eval()
            self.end_task(data)
        self.tasks_learned += 1
        report = TaskReport(task=data.task, seconds=time.perf_counter() - t0, steps=steps, samples=len(train),
                            losses={k: v / max(steps, 1) for k, v in sums.items()}, stopped=stopped)
        self.history.append(report)
        return report

    @torch.no_grad()
    def predict(self, taps: dict[str, list[Tensor]], present: Tensor) -> Tensor:
        """Logits (B, C) in eval mode."""
        self.model.eval()
        return self.model(taps, present).logits

    def evaluate(self, data: TaskData, batch_size: int = 1024) -> float:
        """Accuracy (fraction) of argmax predictions over every class the learner knows."""
        if len(data) == 0:
            return float("nan")
        self._check(data)
        taps, present, labels = _tensors(data, self.device)
        correct = 0
        with torch_threads(self.config.threads):
            for s in range(0, len(data), batch_size):
                sl = slice(s, s + batch_size)
                logits = self.predict({m: [x[sl] for x in lv] for m, lv in taps.items()}, present[sl])
                if logits.shape[1] == 0:
                    continue
                correct += int((logits.argmax(1) == labels[sl]).sum())
        return correct / len(data)
