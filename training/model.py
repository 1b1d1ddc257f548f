"""The learner: a ladder side network over frozen backbone taps (DESIGN.md section 3).

Per level b and modality k, a lateral projection lifts the pooled tap into a d-dim token that
adds to the modality's running state::

    u_k(b) = h_k(b-1) + W_{k,b} LN(tap_{k,b})          h_k(-1) = learned start (init 0)
    h(b)   = adapter_b(U(b), present)                  identity for adapter="none"
    z_k    = P_k LN(h_k(B-1))                          per-modality projection (proj_dim)
    z_joint = F(concat_k z_k)                          fusion MLP
    logits = head(z_joint)                             grows with add_classes

Why a side network: the backbone runs once per sample (exported with taps) and training never
backpropagates through it, so a task trains in seconds on a robot's CPU. The trade-off: the
adapters cannot change what the backbone computes.

A missing modality (``present[:, k] == False``) gets a learned per-level "absent" token instead
of its lateral term, so a dropped sensor degrades the prediction instead of stopping it. A
modality with fewer taps than the deepest one is aligned to the deep end (its first levels get
no lateral term). The MoE adapter (``adapter="moe"``) lives in :mod:`training.moe`, imported only
when asked for.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from training.config import ModelConfig  # torch-free: the serving process reads it without torch


@dataclass
class ModelOutput:
    """logits (B, C); z_joint (B, p); z_mod (B, K, p); routing: per-level (B, E) gates or None."""

    logits: Tensor
    z_joint: Tensor
    z_mod: Tensor
    routing: list[Tensor] | None = None
    present: Tensor | None = field(default=None, repr=False)  # the mask actually used (after dropout)


class Lateral(nn.Module):
    """LN + linear lift of one tap into the d-dim token space."""

    def __init__(self, dim: int, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class SideNetwork(nn.Module):
    """Lateral projections over taps -> per-level adapter -> per-modality projections -> fusion -> head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.tap_dims:  # the config tree leaves it empty: the backbones fill it
            raise ValueError("ModelConfig.tap_dims must name at least one modality, got {}")
        self.config = config
        self.modalities: list[str] = config.modalities
        k, d, p, levels = len(self.modalities), config.d, config.proj_dim, config.levels
        self.levels = levels
        # level offset: a modality with fewer taps joins at the deep end
        self._offset = {m: levels - len(dims) for m, dims in config.tap_dims.items()}
        self.lateral = nn.ModuleDict(
            {m: nn.ModuleList(Lateral(dim, d) for dim in dims) for m, dims in config.pooled_dims().items()}
        )
        self.start = nn.Parameter(torch.zeros(k, d))
        self.absent = nn.Parameter(0.02 * torch.randn(levels, k, d))
        self.adapters = nn.ModuleList(self._make_adapter() for _ in range(levels))
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, p)) for m in self.modalities})
        self.fusion = nn.Sequential(nn.Linear(k * p, config.fusion_hidden), nn.GELU(), nn.Linear(config.fusion_hidden, p))
        with warnings.catch_warnings():  # a 0-class head is legal: it grows with the first task
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.head = nn.Linear(p, config.num_classes)

    def _make_adapter(self) -> nn.Module | None:
        if self.config.adapter == "none":
            return None
        from training.moe import CrossModalMoE

        c = self.config
        return CrossModalMoE(d=c.d, n_modalities=len(self.modalities), n_experts=c.n_experts, top_k=c.top_k,
                             bottleneck=c.bottleneck, gate_noise=c.gate_noise)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def add_classes(self, n: int) -> None:
        """Grow the head by ``n`` outputs; old rows keep their weights (optimizers must be rebuilt)."""
        if n < 0:
            raise ValueError(f"add_classes: n must be >= 0, got {n}")
        if n == 0:
            return
        old = self.head
        new = nn.Linear(old.in_features, old.out_features + n, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.head = new

    def _dropout_mask(self, present: Tensor) -> Tensor:
        """Drop whole modalities at random in training, always keeping at least one present one."""
        p = self.config.modality_dropout
        if not self.training or p <= 0 or present.shape[1] < 2:
            return present
        drop = torch.rand(present.shape, device=present.device) < p
        kept = present & ~drop
        none_left = ~kept.any(dim=1)
        # rows that lost everything keep one random modality among those present
        score = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
        one = F.one_hot(score.argmax(dim=1), present.shape[1]).bool() & present
        return torch.where(none_left[:, None], one, kept)

    def pool_taps(self, taps: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
        """Apply ``config.tap_pool`` (mean over groups of adjacent features); a tap already at its
        pooled width passes unchanged, so replayed (stored pooled) and live taps both work."""
        pool = self.config.tap_pool
        if not pool:
            return taps
        out = {}
        for m, lv in taps.items():
            factors = pool.get(m)
            out[m] = lv if factors is None else [
                x if f == 1 or x.shape[-1] != full else x.reshape(*x.shape[:-1], -1, f).mean(-1)
                for x, f, full in zip(lv, factors, self.config.tap_dims[m], strict=True)]
        return out

    def forward(self, taps: dict[str, list[Tensor]], present: Tensor) -> ModelOutput:
        taps = self.pool_taps(taps)
        present = self._dropout_mask(present.bool())
        batch = present.shape[0]
        h = self.start.unsqueeze(0).expand(batch, -1, -1)
        routing: list[Tensor] = []
        for b in range(self.levels):
            tokens = []
            for k, mod in enumerate(self.modalities):
                lvl = b - self._offset[mod]
                u = h[:, k]
                if lvl >= 0:
                    u = u + self.lateral[mod][lvl](taps[mod][lvl])
                tokens.append(torch.where(present[:, k, None], u, self.absent[b, k].expand_as(u)))
            u_all = torch.stack(tokens, dim=1)
            adapter = self.adapters[b]
            if adapter is None:
                h = u_all
            else:
                h, gates = adapter(u_all, present)
                routing.append(gates)
        z_mod = torch.stack([self.proj[m](h[:, k]) for k, m in enumerate(self.modalities)], dim=1)
        z_joint = self.fusion(z_mod.flatten(1))
        logits = self.head(z_joint)
        return ModelOutput(logits=logits, z_joint=z_joint, z_mod=z_mod, routing=routing or None, present=present)

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameter groups for group-wise regularisers (e.g. group-wise EWC).

        ``lateral:<mod>`` + ``proj:<mod>`` per modality, ``adapter`` (MoE + start/absent tokens),
        ``fusion``, ``head``. Every parameter is in exactly one group.
        """
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, p in self.named_parameters():
            top = name.split(".")[0]
            if top in ("lateral", "proj"):
                key = f"{top}:{name.split('.')[1]}"
            elif top in ("adapters", "start", "absent"):
                key = "adapter"
            else:
                key = top
            groups.setdefault(key, []).append((name, p))
        return groups


def taps_to_tensors(taps: dict[str, list], device: str | torch.device = "cpu") -> dict[str, list[Tensor]]:
    """numpy (N, dim) float arrays -> float32 tensors on ``device`` (no copy on CPU when possible)."""
    return {m: [torch.as_tensor(x, dtype=torch.float32, device=device) for x in levels] for m, levels in taps.items()}


def distill_kl(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """Hinton distillation KL(teacher || student) at temperature T, scaled by T^2 (mean over batch)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True,
                    reduction="batchmean") * t * t
