"""The method: MoE cross-modality adapters (seed 001) + group-wise online EWC and cross-modal
consistency (seed 002), on the ladder side network, with replay.

Loss per step (each term switchable, weights in ``defaults``; t = 1-based task index)::

    ce            cross-entropy on new + replayed rows
    distill       KL(old || new logits) on replayed rows            (old = snapshot at task start)
    align         1 - cos(z_k, z_joint) over present modalities, all rows
    preserve      sqrt(t-1) * KL of row-normalised similarity matrices of z_joint, replayed rows
    consistency   K x K modality-similarity structure vs the old model, replayed rows
    ewc           online group-wise EWC (groups: each modality's lateral+proj, cross-modal
                  adapters+fusion, head), adaptive per-group weights (training.losses)
    balance       optional Switch load-balancing loss of the MoE gates (off by default: it
                  flattens routing, so every expert crosses the 10% share and freezes at once)

After each task: experts whose routing share on the task's *new* rows exceeded
``model.config.freeze_threshold`` are frozen (``requires_grad`` False; the base class rebuilds
the optimizer over trainable tensors each task, so frozen experts never get optimizer state),
the Fisher is estimated on the task's samples and the buffer is filled.

The model must have MoE adapters (``adapter="moe"``, "none" for ``ours-no-moe``) and
``modality_dropout`` from ``defaults``; ``model_overrides`` lists what a caller should put in
its ModelConfig. A fresh model built otherwise is rebuilt here (with a log line).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.losses import (
    OnlineGroupEWC,
    alignment,
    cross_modal_consistency,
    distillation,
    relation_preservation,
)
from training.model import ModelOutput, SideNetwork
from training.moe import freeze_busy_experts, moe_modules
from training.registry import register
from training.strategies.base import Batch, Strategy, StrategyConfig
from training.taskdata import TaskData

log = logging.getLogger(__name__)


def ewc_groups(modalities: list[str]) -> dict[str, tuple[str, ...]]:
    """The method's EWC groups as parameter-name prefixes of :class:`SideNetwork`."""
    groups = {f"modality:{m}": (f"lateral.{m}.", f"proj.{m}.") for m in modalities}
    groups["crossmodal"] = ("adapters.", "start", "absent", "fusion.")
    groups["head"] = ("head.",)
    return groups


@register("ours")
class Ours(Strategy):
    uses_buffer = True
    needs_old_model = True
    use_moe: ClassVar[bool] = True
    freeze_experts: ClassVar[bool] = True
    use_align: ClassVar[bool] = True
    use_preserve: ClassVar[bool] = True
    use_ewc: ClassVar[bool] = True
    use_consistency: ClassVar[bool] = True
    defaults: ClassVar[dict[str, float]] = {
        "distill": 1.0,
        "temperature": 2.0,
        "align": 0.1,
        "preserve": 1.0,
        "tau": 0.1,
        "consistency": 1.0,
        "ewc": 1.0,
        "ewc_gamma": 0.9,
        "fisher_batches": 8,
        "balance": 0.0,
        "modality_dropout": 0.1,
    }

    @classmethod
    def model_overrides(cls, params: dict[str, float] | None = None) -> dict[str, Any]:
        """ModelConfig fields this strategy needs (adapter kind, modality dropout)."""
        p = {**cls.defaults, **(params or {})}
        return {"adapter": "moe" if cls.use_moe else "none", "modality_dropout": float(p["modality_dropout"])}

    def __init__(self, model: SideNetwork, config: StrategyConfig | None = None, **kw: Any) -> None:
        cfg = config or StrategyConfig()
        want = self.model_overrides(cfg.params)
        have = {k: getattr(model.config, k) for k in want}
        if have != want:
            if model.num_classes > 0 or any(m.frozen.any() for m in moe_modules(model)):
                raise ValueError(f"{self.name}: model config {have} differs from the needed {want} and the model "
                                 "was already trained; build it with Ours.model_overrides()")
            log.info("%s: rebuilding the side network with %s (was %s)", self.name, want, have)
            model = SideNetwork(dataclasses.replace(model.config, **want))
        super().__init__(model, cfg, **kw)
        self.ewc = OnlineGroupEWC(ewc_groups(self.model.modalities), gamma=float(self.p["ewc_gamma"]))
        self.share_history: list[list[list[float]]] = []  # task -> level -> expert share
        self.frozen_history: list[int] = []  # frozen experts (all levels) after each task

    # ---- hooks ---------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over trainable tensors only (frozen experts get no state); foreach halves its CPU time."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, foreach=True)

    def begin_task(self, data: TaskData) -> None:
        for moe in moe_modules(self.model):
            moe.reset_usage()

    def loss(self, batch: Batch, out: ModelOutput) -> dict[str, Tensor]:
        p = self.p
        present = out.present if out.present is not None else batch.present
        terms: dict[str, Tensor] = {"ce": F.cross_entropy(out.logits, batch.labels)}
        if out.routing is not None:
            self._count_routing(out.routing, ~batch.replay)
            if p["balance"] > 0:
                terms["balance"] = p["balance"] * torch.stack([m.aux_loss for m in moe_modules(self.model)]).sum()
        if self.use_align and p["align"] > 0:
            terms["align"] = p["align"] * alignment(out.z_mod, out.z_joint, present)
        rep = batch.replay
        if self.old_model is not None and bool(rep.any()):
            taps = {m: [x[rep] for x in lv] for m, lv in batch.taps.items()}
            with torch.no_grad():
                old = self.old_model(taps, present[rep])
            if p["distill"] > 0:
                terms["distill"] = p["distill"] * distillation(old.logits, out.logits[rep], p["temperature"])
            if self.use_preserve and p["preserve"] > 0:
                w = math.sqrt(max(self.tasks_learned, 0))  # sqrt(t - 1), t = 1-based current task
                terms["preserve"] = (p["preserve"] * w) * relation_preservation(old.z_joint, out.z_joint[rep],
                                                                                  p["tau"])
            if self.use_consistency and p["consistency"] > 0:
                terms["consistency"] = p["consistency"] * cross_modal_consistency(old.z_mod, out.z_mod[rep],
                                                                                  present[rep])
        if self.use_ewc and p["ewc"] > 0 and self.ewc.n_updates > 0:
            terms["ewc"] = p["ewc"] * self.ewc.penalty(self.model).to(out.logits.device)
        return terms

    @torch.no_grad()
    def _count_routing(self, routing: list[Tensor], rows: Tensor) -> None:
        """Per-task routing shares count the task's own (non-replayed) rows only."""
        for moe, gates in zip(moe_modules(self.model), routing, strict=True):
            moe.usage += (gates[rows] > 0).to(moe.usage.dtype).sum(0)

    def end_task(self, data: TaskData) -> None:
        moes = moe_modules(self.model)
        self.share_history.append([m.shares().tolist() for m in moes])
        if self.freeze_experts and moes:
            freeze_busy_experts(self.model, self.model.config.freeze_threshold)
        self.frozen_history.append(int(sum(int(m.frozen.sum()) for m in moes)))
        if self.use_ewc and self.p["ewc"] > 0:
            self.ewc.update_fisher(self.model, self._fisher(data))
        super().end_task(data)

    def _fisher(self, data: TaskData) -> dict[str, Tensor]:
        bs = self.config.batch_size
        idx = self.rng.permutation(len(data))[: int(self.p["fisher_batches"]) * bs]
        dev = self.device

        def batches():
            for s in range(0, len(idx), bs):
                sub = idx[s : s + bs]
                taps = {m: [torch.as_tensor(x[sub], dtype=torch.float32, device=dev) for x in lv]
                        for m, lv in data.taps.items()}
                yield taps, torch.as_tensor(data.present[sub], device=dev), torch.as_tensor(data.labels[sub],
                                                                                              device=dev)

        def ce(model, batch) -> Tensor:
            taps, present, labels = batch
            return F.cross_entropy(model(taps, present).logits, labels)

        return self.ewc.estimate_fisher(self.model, batches(), ce)

    def extra_state(self) -> dict[str, Any]:
        return {"ewc": self.ewc.state_dict(), "share_history": self.share_history,
                "frozen_history": self.frozen_history}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "ewc" in state:
            self.ewc.load_state_dict(state["ewc"])
        self.share_history = [list(map(list, t)) for t in state.get("share_history", [])]
        self.frozen_history = [int(x) for x in state.get("frozen_history", [])]

    def routing_shares(self) -> np.ndarray:
        """(tasks, levels, experts) routing shares recorded at the end of each task."""
        return np.asarray(self.share_history, dtype=np.float64)


@register("ours-no-freeze")
class OursNoFreeze(Ours):
    freeze_experts = False


@register("ours-no-align")
class OursNoAlign(Ours):
    use_align = False


@register("ours-no-preserve")
class OursNoPreserve(Ours):
    use_preserve = False


@register("ours-no-ewc")
class OursNoEwc(Ours):
    use_ewc = False


@register("ours-no-consistency")
class OursNoConsistency(Ours):
    use_consistency = False


@register("ours-no-moe")
class OursNoMoe(Ours):
    use_moe = False
    freeze_experts = False
