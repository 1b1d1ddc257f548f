"""Losses of the method (seeds 001 and 002), as pure functions plus one stateful EWC class.

Every function returns a scalar tensor that is exactly 0 when there is nothing to compare (no
replayed samples, no present modality pair), so a strategy can add them unconditionally.

- ``distillation``: LwF-style KL between old and new logits on the old classes.
- ``alignment``: each modality representation z_k pulled toward the joint one (seed 001); not
  modality-to-modality contrastive, which would erase modality-specific structure.
- ``relation_preservation``: KL between row-normalised pairwise similarity matrices of the
  joint representations of replayed samples, old model vs new model (seed 001).
- ``cross_modal_consistency``: per sample, the K x K cosine-similarity structure between
  modality representations stays close to the old model's (seed 002).
- ``OnlineGroupEWC``: online EWC with one diagonal Fisher per parameter group and an adaptive
  weight per group (seed 002); see its docstring for the weighting choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

_EPS = 1e-8


def distillation(old_logits: Tensor, new_logits: Tensor, T: float = 2.0) -> Tensor:
    """KL(softmax(old/T) || softmax(new/T)) * T^2 over the old model's classes (batch mean).

    ``new_logits`` may have more columns (the head grew); only the first ``old_logits.shape[1]``
    are compared, because the old model has no opinion about classes it never saw.
    """
    if old_logits.numel() == 0 or old_logits.shape[1] == 0:
        return new_logits.sum() * 0.0
    c = old_logits.shape[1]
    p_old = F.log_softmax(old_logits.detach() / T, dim=-1)
    p_new = F.log_softmax(new_logits[:, :c] / T, dim=-1)
    return F.kl_div(p_new, p_old, log_target=True, reduction="batchmean") * (T * T)


def alignment(z_mod: Tensor, z_joint: Tensor, present: Tensor, tau: float | None = None) -> Tensor:
    """Pull each present modality representation toward the sample's joint representation.

    ``z_mod`` (B,K,p), ``z_joint`` (B,p), ``present`` (B,K) bool. With ``tau=None`` the loss is
    the mean cosine distance ``1 - cos(z_k, z_joint)`` over present (sample, modality) pairs.
    With a temperature it is an InfoNCE from each z_k to the joint representations of the
    batch (the joint one of the same sample is the positive): the joint space is the anchor,
    modalities are never contrasted with each other.
    """
    mask = present.to(torch.bool)
    if not mask.any():
        return z_mod.sum() * 0.0
    zm = F.normalize(z_mod, dim=-1)
    zj = F.normalize(z_joint, dim=-1)
    if tau is None:
        cos = (zm * zj.unsqueeze(1)).sum(-1)  # (B,K)
        return (1.0 - cos)[mask].mean()
    logits = torch.einsum("bkp,cp->bkc", zm, zj) / tau  # (B,K,B)
    target = torch.arange(z_mod.shape[0], device=z_mod.device).unsqueeze(1).expand_as(mask)
    return F.cross_entropy(logits[mask], target[mask])


def _row_similarity_logprobs(z: Tensor, tau: float) -> Tensor:
    """Row-normalised (softmax) cosine similarities with the diagonal removed, as log-probs."""
    zn = F.normalize(z, dim=-1)
    sim = zn @ zn.T / tau
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return F.log_softmax(sim.masked_fill(eye, float("-inf")), dim=-1).masked_fill(eye, 0.0)


def relation_preservation(z_old: Tensor, z_new: Tensor, tau: float = 0.1) -> Tensor:
    """KL(P_old || P_new) between row-normalised pairwise similarity matrices (mean over rows).

    Both (N,p) are joint representations of the same replayed samples under the old (task-start
    snapshot) and current model; ``z_old`` is treated as a constant. Zero when N < 3 (a row
    needs at least two neighbours to carry relation information).
    """
    if z_new.shape[0] < 3:
        return z_new.sum() * 0.0
    lp_old = _row_similarity_logprobs(z_old.detach(), tau)
    lp_new = _row_similarity_logprobs(z_new, tau)
    return (lp_old.exp() * (lp_old - lp_new)).sum(-1).mean()


def _modality_similarity(z_mod: Tensor) -> Tensor:
    zn = F.normalize(z_mod, dim=-1)
    return zn @ zn.transpose(-1, -2)  # (B,K,K)


def cross_modal_consistency(zmod_old: Tensor, zmod_new: Tensor, present: Tensor) -> Tensor:
    """Mean squared change of the K x K cosine similarities between modality representations.

    Only off-diagonal pairs where both modalities are present count (an absent modality has no
    relation to keep). Zero when no sample has two present modalities.
    """
    present = present.to(torch.bool)
    k = present.shape[1]
    pair = present.unsqueeze(2) & present.unsqueeze(1)
    pair &= ~torch.eye(k, dtype=torch.bool, device=present.device)
    if not pair.any():
        return zmod_new.sum() * 0.0
    diff = _modality_similarity(zmod_new) - _modality_similarity(zmod_old.detach())
    return diff.pow(2)[pair].mean()


class OnlineGroupEWC:
    """Online EWC (Schwarz et al. 2018) with one diagonal Fisher per parameter group.

    Groups are given as ``{group: (name_prefix, ...)}``; a parameter belongs to the first group
    with a matching prefix, otherwise to ``"other"``. After each task ``update_fisher`` adds the
    new diagonal Fisher to the decayed old one, ``F <- gamma * F + F_t``, and stores the current
    parameters as the anchor ``theta*``.

    Adaptive group weights: ``w_g = 1 / mean(F_g)`` (recomputed after every update), so the
    penalty of group g is ``sum_i F_i / mean(F_g) * (theta_i - theta*_i)^2``. Why: raw Fisher
    magnitudes differ by orders of magnitude between the head (large gradients) and the lateral
    projections and adapters (small gradients), and between a strong modality (camera) and a
    weak one (IMU). One global lambda then either pins the head (no plasticity) or leaves the
    shared and weak-modality layers free to drift, and the weak modality is the one that must
    still work when the camera drops. Normalising per group protects every group equally in
    aggregate while keeping the within-group importance ranking. The alternative (weights from
    the old-task loss increase per group) needs extra held-out passes per task, which the
    10-second learn-task budget cannot afford.

    Parameters whose first dimension grew (the classifier head) get zero Fisher for new rows.
    Frozen parameters (``requires_grad`` False) are skipped: they cannot move.
    """

    def __init__(self, groups: Mapping[str, Sequence[str]], *, gamma: float = 0.9) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.groups = {g: tuple(p) for g, p in groups.items()}
        self.gamma = gamma
        self.fisher: dict[str, Tensor] = {}
        self.theta: dict[str, Tensor] = {}
        self.weights: dict[str, float] = {}
        self.n_updates = 0
        self._cache: tuple[list[nn.Parameter], Tensor, Tensor] | None = None

    def group_of(self, name: str) -> str:
        for g, prefixes in self.groups.items():
            if any(name.startswith(p) for p in prefixes):
                return g
        return "other"

    @staticmethod
    def _fit(t: Tensor, shape: torch.Size) -> Tensor:
        """Zero-pad (or crop) along dim 0 so an old Fisher fits a grown parameter."""
        if t.shape == shape:
            return t
        if t.shape[1:] != shape[1:]:
            return torch.zeros(shape, dtype=t.dtype, device=t.device)
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        n = min(t.shape[0], shape[0])
        out[:n] = t[:n]
        return out

    def estimate_fisher(
        self,
        model: nn.Module,
        batches: Iterable[tuple[Tensor, ...]],
        loss_fn: Callable[[nn.Module, tuple[Tensor, ...]], Tensor],
        max_batches: int | None = None,
    ) -> dict[str, Tensor]:
        """Empirical diagonal Fisher: mean over mini-batches of the squared loss gradient.

        Mini-batch (not per-sample) gradients keep this to a few backward passes, which the
        learn-task time budget needs; it under-estimates the per-sample Fisher by a roughly
        constant factor that the per-group normalisation cancels.
        """
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        was_training = model.training
        model.eval()
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += p.grad.detach().pow(2)
            count += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return {n: a / max(count, 1) for n, a in acc.items()}

    @staticmethod
    def estimate_fisher_per_sample(
        model: nn.Module,
        batches: Iterable[tuple[dict[str, list[Tensor]], Tensor, Tensor]],
    ) -> dict[str, Tensor]:
        """Empirical diagonal Fisher from per-sample gradients: mean over samples of
        ``(d CE(x_i, y_i) / d theta)^2`` (the definition; the mini-batch version squares a mean
        of gradients, so it drops the per-sample variance, which is most of the Fisher's mass
        where samples disagree). One vectorised pass per batch (``torch.func.vmap`` over
        ``grad``), so it costs about as much as a few training steps, not one backward per sample.
        ``batches`` yields ``(taps, present, labels)`` in eval mode (no modality dropout).
        """
        from torch.func import functional_call, grad, vmap

        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        was_training = model.training
        model.eval()

        def loss_one(ps: dict[str, Tensor], taps: dict[str, list[Tensor]], present: Tensor, label: Tensor) -> Tensor:
            one = {m: [x.unsqueeze(0) for x in lv] for m, lv in taps.items()}
            out = functional_call(model, ps, (one, present.unsqueeze(0)))
            return F.cross_entropy(out.logits, label.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness="different")
        for taps, present, labels in batches:
            grads = per_sample(params, taps, present, labels)
            for n, g in grads.items():
                acc[n] += g.pow(2).sum(0)
            count += int(labels.shape[0])
        model.train(was_training)
        return {n: a / max(count, 1) for n, a in acc.items()}

    def update_fisher(self, model: nn.Module, fisher_t: Mapping[str, Tensor]) -> None:
        """Online update with one task's Fisher, anchor at the current parameters, reweight groups."""
        for n, p in model.named_parameters():
            new = fisher_t.get(n)
            old = self.fisher.get(n)
            if new is None and old is None:
                continue
            f = torch.zeros_like(p) if new is None else new.detach().to(p)
            if old is not None:
                f = self.gamma * self._fit(old, p.shape) + f
            self.fisher[n] = f
            self.theta[n] = p.detach().clone()
        self.n_updates += 1
        self._reweight()

    def _reweight(self) -> None:
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for n, f in self.fisher.items():
            g = self.group_of(n)
            sums[g] = sums.get(g, 0.0) + float(f.sum())
            counts[g] = counts.get(g, 0) + f.numel()
        self.weights = {g: counts[g] / (sums[g] + _EPS) if sums[g] > 0 else 0.0 for g in sums}
        log.debug("EWC group weights %s", self.weights)

    def _anchored(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, float, Tensor, Tensor]]:
        """``(p, w_g, F, theta*)`` for each trainable parameter with a Fisher and a non-zero group
        weight, F and theta* fitted to p's current shape: what the penalty and its cached analytic
        gradient both sum over, so the two can never disagree on which parameters count."""
        for n, p in model.named_parameters():
            if not p.requires_grad or n not in self.fisher:
                continue
            w = self.weights.get(self.group_of(n), 0.0)
            if w == 0.0:
                continue
            yield p, w, self._fit(self.fisher[n], p.shape), self._fit(self.theta[n], p.shape)

    def penalty(self, model: nn.Module) -> Tensor:
        """sum_g w_g * sum_{i in g} F_i (theta_i - theta*_i)^2 (0 before the first update)."""
        total: Tensor | None = None
        for p, w, f, theta in self._anchored(model):
            term = w * (f * (p - theta).pow(2)).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    def prepare(self, model: nn.Module) -> None:
        """Cache the weighted anchors ``w_g F`` and ``theta*`` as flat vectors over the trainable
        parameters, for :meth:`add_penalty_grad_`. Call after every change of shape (head growth)
        or of ``requires_grad`` (frozen experts), i.e. at the start of each task.

        Why: the autograd penalty walks ~300 tensors with ~6 ops each per step forward and
        backward (about half of a step's CPU time on the real tap dims); its gradient is simply
        ``2 w_g F (theta - theta*)``, three flat vector ops.
        """
        params, wf, theta = [], [], []
        for p, w, f, anchor in self._anchored(model):
            params.append(p)
            wf.append((w * f).reshape(-1))
            theta.append(anchor.reshape(-1))
        self._cache = (params, torch.cat(wf), torch.cat(theta)) if params else None

    @torch.no_grad()
    def add_penalty_grad_(self, scale: float = 1.0) -> Tensor:
        """Add ``scale * d penalty / d theta`` to the cached parameters' ``.grad``; return
        ``scale * penalty`` (a constant, for logging). Needs :meth:`prepare` first."""
        cache = getattr(self, "_cache", None)
        if cache is None:
            return torch.zeros(())
        params, wf, theta = cache
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        d = flat - theta
        g = wf * d
        value = scale * torch.dot(g, d)
        g.mul_(2.0 * scale)
        for p, flat_g in zip(params, torch.split(g, [p.numel() for p in params]), strict=True):
            gp = flat_g.view_as(p)
            if p.grad is None:
                p.grad = gp.clone()
            else:
                p.grad.add_(gp)
        return value

    def group_penalties(self, model: nn.Module) -> dict[str, float]:
        """Unweighted-by-lambda penalty per group, for logs and tests."""
        out: dict[str, float] = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n not in self.fisher:
                    continue
                g = self.group_of(n)
                f = self._fit(self.fisher[n], p.shape)
                d = (f * (p - self._fit(self.theta[n], p.shape)).pow(2)).sum()
                out[g] = out.get(g, 0.0) + self.weights.get(g, 0.0) * float(d)
        return out

    def state_dict(self) -> dict:
        return {
            "groups": {g: list(p) for g, p in self.groups.items()},
            "gamma": self.gamma,
            "fisher": {n: t.clone() for n, t in self.fisher.items()},
            "theta": {n: t.clone() for n, t in self.theta.items()},
            "n_updates": self.n_updates,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.groups = {g: tuple(p) for g, p in state["groups"].items()}
        self.gamma = float(state["gamma"])
        self.fisher = {n: t.clone() for n, t in state["fisher"].items()}
        self.theta = {n: t.clone() for n, t in state["theta"].items()}
        self.n_updates = int(state["n_updates"])
        self._reweight()
