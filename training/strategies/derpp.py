"""DER++ (Buzzega et al., NeurIPS 2020): replay with the logits a sample had when it entered the buffer.

Why: matching old logits (dark knowledge) keeps the old function, not just the old labels, and
DER++ is among the strongest rehearsal baselines at small buffer sizes. Per step::

    loss = CE(new rows) + alpha * MSE(logits(x'), z')  + beta * CE(logits(x''), y'')

with (x', z') and (x'', y'') two independent draws of ``config.replay_batch`` from the store,
alpha = 0.3 and beta = 0.5 (the paper's grid picks values in 0.1 .. 1.0 per benchmark; these are
the Mammoth-documented defaults for Seq-CIFAR-10 class-IL at small buffers). After each step the
new rows are offered to a plain reservoir (Vitter's algorithm R over every row offered, i.e.
once per epoch, as Mammoth does) together with the logits of that step's forward pass.

Own store instead of :class:`training.buffer.ReplayBuffer`: it needs a logits field, and DER's
reservoir is not class-balanced. Rows: taps at the model's pooled width (float16), present mask,
label, task, logits (float32, padded) and how many logit columns they had. ``uses_buffer`` is
False, so the base loop mixes nothing in; ``observe`` does the replay and runs the model once on
new + replayed rows. At most ``config.buffer_size`` rows.

Difference from the paper: the head grows here (class-incremental with new outputs per task),
while Mammoth's head has every class from the start, so its stored logits cover future classes
too. The logit term compares only the columns a row had when it was stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.registry import register
from training.strategies.base import Batch, Strategy


@register("derpp")
class DERpp(Strategy):
    defaults = {"alpha": 0.3, "beta": 0.5}

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.size = int(self.config.buffer_size)
        self.seen = 0  # rows ever offered to the reservoir
        self.store: dict[str, Any] | None = None  # allocated at the first insertion

    def stored(self) -> int:
        """Rows in the store (never more than ``config.buffer_size``)."""
        return min(self.seen, self.size)

    def _insert(self, batch: Batch, logits: Tensor) -> None:
        taps = {m: [x.detach().cpu().numpy() for x in lv] for m, lv in batch.taps.items()}
        z = logits.detach().float().cpu().numpy()
        if self.store is None:
            self.store = {"taps": {m: [np.zeros((self.size, x.shape[1]), np.float16) for x in lv]
                                   for m, lv in taps.items()},
                          "present": np.zeros((self.size, batch.present.shape[1]), bool),
                          "labels": np.zeros(self.size, np.int64), "tasks": np.zeros(self.size, np.int64),
                          "logits": np.zeros((self.size, 0), np.float32), "ncols": np.zeros(self.size, np.int64)}
        st = self.store
        if st["logits"].shape[1] < z.shape[1]:  # the head grew: pad the stored logits
            st["logits"] = np.pad(st["logits"], ((0, 0), (0, z.shape[1] - st["logits"].shape[1])))
        present, labels, tasks = (t.cpu().numpy() for t in (batch.present, batch.labels, batch.tasks))
        for i in range(len(labels)):
            j = self.seen if self.seen < self.size else int(self.rng.integers(0, self.seen + 1))
            self.seen += 1
            if j >= self.size:
                continue
            for m, lv in taps.items():
                for b, x in enumerate(lv):
                    st["taps"][m][b][j] = x[i]
            st["present"][j], st["labels"][j], st["tasks"][j] = present[i], labels[i], tasks[i]
            st["logits"][j] = 0.0
            st["logits"][j, : z.shape[1]], st["ncols"][j] = z[i], z.shape[1]

    def _draw(self, n: int) -> tuple[Batch, Tensor, Tensor] | None:
        """``n`` stored rows (with replacement when fewer are stored): batch, logits, column mask."""
        if self.store is None or self.stored() == 0 or n <= 0:
            return None
        st, dev = self.store, self.device
        idx = self.rng.choice(self.stored(), n, replace=self.stored() < n)
        taps = {m: [torch.from_numpy(x[idx].astype(np.float32)).to(dev) for x in lv] for m, lv in st["taps"].items()}
        batch = Batch(taps=taps, present=torch.from_numpy(st["present"][idx]).to(dev),
                      labels=torch.from_numpy(st["labels"][idx]).to(dev),
                      tasks=torch.from_numpy(st["tasks"][idx]).to(dev), replay=torch.ones(n, dtype=torch.bool, device=dev))
        z = torch.from_numpy(st["logits"][idx]).to(dev)
        mask = torch.arange(z.shape[1], device=dev)[None] < torch.from_numpy(st["ncols"][idx]).to(dev)[:, None]
        return batch, z, mask

    def logit_loss(self, logits: Tensor, stored: Tensor, mask: Tensor) -> Tensor:
        """MSE over the stored columns only (a row stored before the head grew has fewer)."""
        cur = logits[:, : stored.shape[1]]
        return ((cur - stored) ** 2 * mask).sum() / mask.sum().clamp(min=1)

    def observe(self, batch: Batch) -> dict[str, float]:
        assert self.optimizer is not None
        self.model.train()
        n_new, r = len(batch), self.config.replay_batch
        a, b = self._draw(r), self._draw(r)
        full = batch
        for part in (a, b):
            full = self.cat(full, None if part is None else part[0])
        out = self.model(full.taps, full.present)
        terms = {"ce": F.cross_entropy(out.logits[:n_new], batch.labels)}
        zero = out.logits.sum() * 0.0
        terms["logit"] = zero if a is None else self.p["alpha"] * self.logit_loss(out.logits[n_new : n_new + r], *a[1:])
        terms["replay_ce"] = zero if b is None else self.p["beta"] * F.cross_entropy(
            out.logits[-r:], b[0].labels)
        values = self.step(batch, out, terms)
        self._insert(batch, out.logits[:n_new])
        return values

    def extra_state(self) -> dict[str, Any]:
        return {"seen": self.seen, "store": self.store}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        st = state["store"]
        self.store = None if st is None else {
            "taps": {m: [np.asarray(x, np.float16) for x in lv] for m, lv in st["taps"].items()},
            **{k: np.asarray(st[k]) for k in ("present", "labels", "tasks", "logits", "ncols")}}
