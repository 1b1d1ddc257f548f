"""Online EWC strategy: a Fisher-weighted penalty that keeps weights important to earlier tasks.

Online EWC (Schwarz et al. 2018, "Progress & Compress"): after each task, a diagonal Fisher
F <- gamma F + F_task and anchor theta* <- theta; while learning, add
(lambda / 2) sum_i F_i (theta_i - theta*_i)^2. Parameters that grew (the head) are compared on
their old rows only; new rows are free.

``fisher_diagonal`` and ``ewc_penalty`` are reusable (group-wise EWC builds on them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from training.model import ModelOutput, SideNetwork
from training.registry import register
from training.strategies.base import Batch, Strategy
from training.taskdata import TaskData


def fisher_diagonal(model: SideNetwork, data: TaskData, *, samples: int, rng: np.random.Generator,
                    device: str = "cpu", normalize: bool = True, batch: int = 16) -> dict[str, Tensor]:
    """Diagonal empirical Fisher from squared minibatch gradients of the true label's NLL over
    ``samples`` random samples in minibatches of ``batch`` (batch=1: the exact per-sample
    estimate; larger batches are the usual cheap approximation, ~batch times faster).

    With ``normalize`` it is divided by its largest entry, so that lambda means the same for every
    task (a task the model fits well otherwise has a vanishing Fisher and EWC silently turns off).
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in named.items()}
    idx = rng.choice(len(data), size=min(samples, len(data)), replace=False)
    was_training = model.training
    model.eval()
    chunks = 0
    for s in range(0, len(idx), batch):
        sel = np.sort(idx[s : s + batch])
        taps = {m: [torch.as_tensor(x[sel], device=device) for x in lv] for m, lv in data.taps.items()}
        present = torch.as_tensor(data.present[sel], device=device)
        labels = torch.as_tensor(data.labels[sel], device=device)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(taps, present).logits, labels).backward()
        for n, p in named.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        chunks += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    fisher = {n: f / max(chunks, 1) for n, f in fisher.items()}
    if normalize:
        top = max((float(f.max()) for f in fisher.values()), default=0.0)
        if top > 0:
            fisher = {n: f / top for n, f in fisher.items()}
    return fisher


def _lead(p: Tensor, like: Tensor) -> Tensor:
    """``p`` cut to ``like``'s shape along grown leading rows (head rows added after the anchor)."""
    return p if p.shape == like.shape else p[tuple(slice(0, s) for s in like.shape)]


def ewc_penalty(model: nn.Module, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over the anchored parameters (without the lambda/2)."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for n, p in model.named_parameters():
        if n in fisher:
            total = total + (fisher[n] * (_lead(p, anchor[n]) - anchor[n]) ** 2).sum()
    return total


def merge_fisher(old: dict[str, Tensor], new: dict[str, Tensor], gamma: float) -> dict[str, Tensor]:
    """gamma * old + new, padding old tensors with zeros where a parameter grew."""
    out = {}
    for n, f in new.items():
        if n in old:
            o = torch.zeros_like(f)
            o[tuple(slice(0, s) for s in old[n].shape)] = old[n]
            out[n] = gamma * o + f
        else:
            out[n] = f
    return out


@register("ewc")
class EWC(Strategy):
    defaults = {"lambda": 1000.0, "gamma": 1.0, "fisher_samples": 512, "fisher_batch": 16}

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(self) -> Tensor:
        return ewc_penalty(self.model, self.fisher, self.anchor)

    def loss(self, batch: Batch, out: ModelOutput) -> dict[str, Tensor]:
        terms = super().loss(batch, out)
        if self.fisher:
            terms["ewc"] = 0.5 * self.p["lambda"] * self.penalty()
        return terms

    def end_task(self, data: TaskData) -> None:
        super().end_task(data)
        new = fisher_diagonal(self.model, data, samples=int(self.p["fisher_samples"]), rng=self.rng,
                              device=self.device, batch=int(self.p["fisher_batch"]))
        self.fisher = merge_fisher(self.fisher, new, self.p["gamma"])
        self.anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.fisher}

    def extra_state(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchor = dict(state["fisher"]), dict(state["anchor"])
