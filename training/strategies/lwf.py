"""Learning without Forgetting strategy: distils the old model's outputs instead of replaying.

Learning without Forgetting (Li & Hoiem 2016): no buffer; on the new task's samples the new
model's logits for the old classes are distilled toward the frozen old model's (temperature T)."""

from __future__ import annotations

import torch
from torch import Tensor

from training.model import ModelOutput, distill_kl
from training.registry import register
from training.strategies.base import Batch, Strategy


@register("lwf")
class LwF(Strategy):
    needs_old_model = True
    defaults = {"alpha": 1.0, "temperature": 2.0}

    def loss(self, batch: Batch, out: ModelOutput) -> dict[str, Tensor]:
        terms = super().loss(batch, out)
        if self.old_model is not None and self.old_model.num_classes > 0:
            with torch.no_grad():
                old = self.old_model(batch.taps, batch.present).logits
            c = old.shape[1]
            terms["distill"] = self.p["alpha"] * distill_kl(out.logits[:, :c], old, self.p["temperature"])
        return terms
