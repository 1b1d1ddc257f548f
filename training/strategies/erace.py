"""ER-ACE (Caccia et al., ICLR 2022): replay with an asymmetric cross-entropy for the incoming rows.

Why: with plain ER the first steps on a new class push every old class's logit down (the new
rows' softmax covers them), which abruptly moves the old classes' representations. ACE computes
the incoming rows' cross-entropy only over the classes present in the incoming batch (the other
logits masked out, so they get exactly zero gradient from those rows); the replayed rows keep
the full cross-entropy over every class seen so far. The step's loss is the mean over incoming
rows plus the mean over replayed rows, as in the authors' code.

The incoming rows enter the buffer during the stream (after their step), as in the paper: the
replayed rows then include current-task samples, and their full cross-entropy is what pushes the
old classes' logits down on new-class inputs (with the buffer filled only at the end of a task,
the new classes were never predicted on our synthetic tests). Each row is offered once, in the
first epoch (Mammoth re-offers it every epoch; that only adds duplicates).

Differences from the paper: the buffer is the shared class-balanced reservoir
(:class:`training.buffer.ReplayBuffer`, CBRS) instead of a plain reservoir; rows a ``max_seconds``
deadline cuts off in the first epoch are never offered; the mask is applied in every task
(the Mammoth port skips it in the first one, where the head's classes are all incoming anyway).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.model import ModelOutput
from training.registry import register
from training.strategies.base import Batch
from training.strategies.replay import Replay
from training.taskdata import TaskData


def ace_incoming(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` over only the classes among ``labels`` (the others masked)."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[labels] = True
    return F.cross_entropy(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), labels)


@register("er-ace")
class ERACE(Replay):
    """Replay (base loop mixes ``config.replay_batch`` buffered rows in) with the ACE loss."""

    def begin_task(self, data: TaskData) -> None:
        self._to_offer = len(self.train_data(data))  # rows of the first epoch (then each row was offered once)
        self._task_rows = self._to_offer

    def observe(self, batch: Batch) -> dict[str, float]:
        out = super().observe(batch)
        new = ~batch.replay
        n = min(int(new.sum()), self._to_offer)
        if n > 0 and self.buffer is not None:
            taps = {m: [x[new][:n].cpu().numpy() for x in lv] for m, lv in batch.taps.items()}
            self.buffer.add_batch(taps, batch.present[new][:n].cpu().numpy(), batch.labels[new][:n].cpu().numpy(),
                                  self.current_task, np.full(n, time.time_ns(), dtype=np.int64))
            self._to_offer -= n
        return out

    def end_task(self, data: TaskData) -> None:
        """With no training step at all (epochs = 0, a deadline before the first step) the task's rows
        are offered now, as the base does; otherwise they were offered during the first epoch."""
        if self._to_offer == self._task_rows:
            super().end_task(data)
        self._to_offer = 0

    def loss(self, batch: Batch, out: ModelOutput) -> dict[str, Tensor]:
        new = ~batch.replay
        terms = {"ce": ace_incoming(out.logits[new], batch.labels[new])}
        if bool(batch.replay.any()):
            terms["replay_ce"] = F.cross_entropy(out.logits[batch.replay], batch.labels[batch.replay])
        else:
            terms["replay_ce"] = out.logits.sum() * 0.0
        return terms
