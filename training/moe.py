"""Cross-modality mixture-of-experts adapter (seed 001) for the ladder side network.

At every tap level the side network holds one token per modality, ``U = [u_1..u_K]`` (B, K, d).
A gate looks at the pooled present tokens and picks the top-k of E experts; each expert builds
a K x K cross-modal attention map from its own query/key projections and sends a bottleneck
value path (d -> r -> d) through it; the gated sum is added residually to every present token:

    h_k = u_k + sum_{e in topk} g_e * (softmax(q_e(U) k_e(U)^T / sqrt(r)) v_e(U))_k

Why these choices:

- Absent modalities are masked as attention keys and excluded from the gate's pooling, so a
  dropped sensor cannot influence the present ones; their own tokens pass through unchanged
  (the side network's learned "absent" embedding stays what it is).
- Experts are separate ``nn.Module`` s so that ``freeze`` can set ``requires_grad = False`` on
  exactly one expert's tensors (the optimizer is then rebuilt over trainable tensors only, so
  frozen experts have no optimizer state). The forward pass concatenates the expert weights
  and runs the projections of all experts as two GEMMs (query/key/down for all experts at
  once; the up-projection after attention and gating, which commute with it because it is
  linear), and the attention and value path only for each sample's top-k experts (gathered):
  with K = 3 tokens and E = 10 this is far cheaper on a CPU than per-expert dispatch, and than
  the dense attention over all experts it replaced (~2x per training step). Unselected experts
  have a zero gate, so they get exactly zero gradient.
- The pre-expert LayerNorm has no affine parameters: a shared, trainable normalisation would
  keep changing what frozen experts see.
- Routing shares are counted per task in ``usage`` (selection counts, added by the strategy for
  the rows it wants counted: a task's own rows, not replayed ones); the share of expert e is
  ``usage[e] / usage.sum()`` (top-k selections sum to k per sample, so shares sum to 1 and the
  uniform share is 1/E).
- Routing collapse (measured: from task 2 on, 70-100 % of a task's routing went to experts that
  were already frozen, so new tasks trained almost nothing but the gate and the head) has three
  counters, each switchable: noisy top-k in training (``gate_noise``, Shazeer et al. 2017, with a
  fixed noise std instead of a learned one), a load-balancing loss that charges frozen experts
  ``frozen_cost`` times more than free ones (:func:`balance_loss`; ``frozen_cost`` 1 is the
  Switch-Transformer loss), and a freezing rule that keeps capacity (:func:`freeze_busy_experts`:
  at most ``per_task`` new frozen experts per task and never fewer than ``min_free`` free ones).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


class Expert(nn.Module):
    """One expert: query/key projections for a K x K attention map and a bottleneck value path."""

    def __init__(self, *, d: int, bottleneck: int) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.empty(d, bottleneck))
        self.wk = nn.Parameter(torch.empty(d, bottleneck))
        self.down = nn.Parameter(torch.empty(d, bottleneck))
        self.down_b = nn.Parameter(torch.zeros(bottleneck))
        self.up = nn.Parameter(torch.empty(bottleneck, d))
        self.up_b = nn.Parameter(torch.zeros(d))
        for w in (self.wq, self.wk, self.down):
            nn.init.normal_(w, std=1.0 / math.sqrt(d))
        # Small (not zero) up-projection: the adapter starts close to identity, but every
        # weight gets a gradient from the first step.
        nn.init.normal_(self.up, std=0.01 / math.sqrt(bottleneck))


class CrossModalMoE(nn.Module):
    """Top-k gated mixture of cross-modal attention experts over K modality tokens.

    ``forward(u (B,K,d), present (B,K) bool) -> (h (B,K,d), gates (B,E))``; ``gates`` is zero
    outside each sample's top-k and softmax-normalised over the selected logits. ``probs`` holds
    the full gate softmax (B,E) of the last forward pass, for :func:`balance_loss`.
    """

    usage: Tensor
    frozen: Tensor

    def __init__(
        self,
        *,
        d: int,
        n_modalities: int,
        n_experts: int = 10,
        top_k: int = 2,
        bottleneck: int = 32,
        gate_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if d <= 0:
            raise ValueError(f"d must be > 0, got {d}")
        if n_modalities <= 0:
            raise ValueError(f"n_modalities must be > 0, got {n_modalities}")
        if n_experts <= 0:
            raise ValueError(f"n_experts must be > 0, got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if bottleneck <= 0:
            raise ValueError(f"bottleneck must be > 0, got {bottleneck}")
        if gate_noise < 0:
            raise ValueError(f"gate_noise must be >= 0, got {gate_noise}")
        self.d, self.n_modalities, self.n_experts = d, n_modalities, n_experts
        self.top_k, self.bottleneck, self.gate_noise = top_k, bottleneck, gate_noise
        self.gate = nn.Linear(d, n_experts)
        nn.init.normal_(self.gate.weight, std=0.1 / math.sqrt(d))
        nn.init.zeros_(self.gate.bias)
        self.experts = nn.ModuleList(Expert(d=d, bottleneck=bottleneck) for _ in range(n_experts))
        self.register_buffer("usage", torch.zeros(n_experts))
        self.register_buffer("frozen", torch.zeros(n_experts, dtype=torch.bool))
        self.probs: Tensor = torch.zeros(0, n_experts)
        # Buffers are restored by load_state_dict, requires_grad is not: re-apply it.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._apply_freeze())

    def __getstate__(self) -> dict:
        # probs is part of the last step's autograd graph: copies and pickles drop it.
        state = self.__dict__.copy()
        state["probs"] = torch.zeros(0, self.n_experts)
        return state

    # -- routing bookkeeping -------------------------------------------------------------
    def reset_usage(self) -> None:
        """Start counting a new task's routing."""
        self.usage.zero_()

    def shares(self) -> Tensor:
        """Routing share per expert over what was counted since ``reset_usage`` (zeros if nothing)."""
        total = self.usage.sum()
        return self.usage / total if total > 0 else torch.zeros_like(self.usage)

    def freeze(self, experts: Tensor) -> None:
        """Freeze the given experts for good (bool mask (E,)): no gradient, so no optimizer state."""
        experts = torch.as_tensor(experts, dtype=torch.bool, device=self.frozen.device)
        if experts.shape != (self.n_experts,):
            raise ValueError(f"experts mask must have shape ({self.n_experts},), got {tuple(experts.shape)}")
        self.frozen |= experts
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        for e, expert in enumerate(self.experts):
            for p in expert.parameters():
                p.requires_grad_(not bool(self.frozen[e]))

    # -- forward -------------------------------------------------------------------------
    def route(self, x: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Gate on the mean of present tokens: returns (sparse gates (B,E), full softmax probs (B,E))."""
        w = present.to(x.dtype).unsqueeze(-1)
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        logits = self.gate(pooled)
        if self.training and self.gate_noise > 0:
            logits = logits + torch.randn_like(logits) * self.gate_noise  # noisy top-k: explore
        top_val, top_idx = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_val, dim=-1))
        return gates, torch.softmax(logits, dim=-1)

    def forward(self, u: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        if u.dim() != 3 or u.shape[1] != self.n_modalities or u.shape[2] != self.d:
            raise ValueError(f"u must be (B, {self.n_modalities}, {self.d}), got {tuple(u.shape)}")
        present = present.to(torch.bool)
        if present.shape != u.shape[:2]:
            raise ValueError(f"present must be {tuple(u.shape[:2])}, got {tuple(present.shape)}")
        x = F.layer_norm(u, (self.d,))
        gates, probs = self.route(x, present)

        e_, r, top = self.n_experts, self.bottleneck, self.top_k
        b, k = u.shape[:2]
        # One GEMM for every expert's query, key and value-down projection: (d, 3*E*r).
        w_in = torch.cat([torch.cat([ex.wq, ex.wk, ex.down], dim=1) for ex in self.experts], dim=1)
        proj = (x.reshape(b * k, self.d) @ w_in).view(b, k, e_, 3, r).permute(0, 2, 3, 1, 4)  # (B,E,3,K,r)
        # Attention and the value path only for each sample's top-k experts: the others have a zero
        # gate, so leaving them out changes nothing (not even their zero gradient) and saves E/k of
        # the work (the elementwise part was half of a training step on a CPU).
        sel = gates.topk(top, dim=-1).indices  # (B,k) the experts route() chose
        pick = proj.gather(1, sel[:, :, None, None, None].expand(b, top, 3, k, r))  # (B,k,3,K,r)
        q, key = pick[:, :, 0], pick[:, :, 1]
        down_b = torch.stack([ex.down_b for ex in self.experts])[sel]  # (B,k,r)
        hidden = F.gelu(pick[:, :, 2] + down_b[:, :, None, :])  # (B,k,K,r)
        # K is tiny (3): broadcast-multiply-sum beats B*k batched 3x3 matmuls on a CPU.
        scores = (q.unsqueeze(3) * key.unsqueeze(2)).sum(-1) / math.sqrt(r)  # (B,k,K,K)
        scores = scores.masked_fill(~present[:, None, None, :], float("-inf"))
        # A sample with no present modality has no keys: give it a zero map instead of NaN.
        any_key = present.any(-1)
        attn = torch.where(any_key[:, None, None, None],
                           torch.softmax(scores.masked_fill(~any_key[:, None, None, None], 0.0), dim=-1), 0.0)
        g_sel = gates.gather(1, sel)  # (B,k)
        # The up-projection is linear, so attention and gating go before it and all experts'
        # up-projections become one GEMM: sum_e g_e A_e (H_e W_up_e + b_e) = [g_e A_e H_e]_e W_up + g b.
        mixed_sel = (attn.unsqueeze(-1) * hidden.unsqueeze(2)).sum(3) * g_sel[:, :, None, None]  # (B,k,K,r)
        mixed_h = torch.zeros(b, e_, k, r, dtype=u.dtype, device=u.device).scatter(
            1, sel[:, :, None, None].expand(b, top, k, r), mixed_sel)  # (B,E,K,r), zeros elsewhere
        w_up = torch.cat([ex.up for ex in self.experts], dim=0)  # (E*r, d)
        up_b = torch.stack([ex.up_b for ex in self.experts])  # (E, d)
        mixed = mixed_h.permute(0, 2, 1, 3).reshape(b, k, e_ * r) @ w_up
        mixed = mixed + ((gates * any_key[:, None].to(gates.dtype)) @ up_b).unsqueeze(1)
        h = u + mixed * present.unsqueeze(-1).to(u.dtype)

        self.probs = probs
        return h, gates


def moe_modules(model: nn.Module) -> list[CrossModalMoE]:
    """All MoE adapters of a model, in registration order (one per tap level)."""
    return [m for m in model.modules() if isinstance(m, CrossModalMoE)]


def balance_loss(moe: CrossModalMoE, gates: Tensor, rows: Tensor | None = None, *,
                 frozen_cost: float = 1.0) -> Tensor:
    """Load balancing of one MoE level over ``rows`` (bool (B,), default all) of its last forward:
    ``E * sum_e c_e * f_e * P_e`` with f_e the share of top-k selections, P_e the mean gate
    probability and c_e = ``frozen_cost`` for frozen experts, 1 for free ones.

    Why the cost: the Switch loss (all c_e = 1) flattens routing over every expert, frozen ones
    included, so a new task still sends most of its rows through experts it cannot train; a
    cost above 1 moves the new rows' probability mass toward the free experts (the gradient
    reaches the gate through P only, as in the Switch loss).
    """
    probs = moe.probs
    if rows is not None:
        gates, probs = gates[rows], probs[rows]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    frac = (gates > 0).to(probs.dtype).mean(0).detach() / moe.top_k
    cost = torch.where(moe.frozen, frozen_cost, 1.0).to(probs.dtype)
    return moe.n_experts * (cost * frac * probs.mean(0)).sum()


def freeze_busy_experts(model: nn.Module, threshold: float, *, per_task: int = 0,
                        min_free: int = 0) -> list[Tensor]:
    """After a task: freeze the experts whose routing share exceeded ``threshold``, busiest first,
    at most ``per_task`` of them (0: no limit) and never leaving fewer than ``min_free`` free.

    Why the limits: with only the threshold, one task with spread-out routing (e.g. under a
    balancing loss) froze every expert at once and later tasks had no trainable expert left.
    Returns the newly frozen mask per MoE module (for logging and plots).
    """
    newly = []
    for moe in moe_modules(model):
        shares = moe.shares()
        cand = ((shares > threshold) & ~moe.frozen).nonzero().flatten()
        cand = cand[shares[cand].argsort(descending=True)]
        room = max(int((~moe.frozen).sum()) - min_free, 0)
        cand = cand[: min(room, per_task if per_task > 0 else len(cand))]
        new = torch.zeros_like(moe.frozen)
        new[cand] = True
        moe.freeze(new)
        newly.append(new.clone())
        log.info("MoE %d: shares %s, frozen now %d/%d", len(newly) - 1,
                 [round(float(s), 3) for s in moe.shares()], int(moe.frozen.sum()), moe.n_experts)
    return newly
