"""The "ours" method's parts: each loss term moves the gradient, routing does not collapse, the
per-sample Fisher is the definition, and the named options (seed, nme, wa) do what they say."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.training.test_strategies import DIMS, make_task, new, stream
from training.losses import OnlineGroupEWC
from training.model import ModelConfig, SideNetwork
from training.moe import moe_modules
from training.strategies.base import Batch


def _second_task_state(name: str = "ours-full"):
    """An "ours" learner after task 0, set up for task 1 as ``learn_task`` would (old-model
    snapshot, head grown, begin_task), plus a batch of new and replayed rows."""
    s = new(name, epochs=2)
    train, _ = stream(2)
    s.learn_task(train[0])
    s.current_task = 1
    s.old_model = copy.deepcopy(s.model).eval()
    for p in s.old_model.parameters():
        p.requires_grad_(False)
    s.model.add_classes(2)
    s.begin_task(train[1])
    t = train[1]
    idx = np.arange(16)
    taps = {m: [torch.from_numpy(x[idx]) for x in lv] for m, lv in t.taps.items()}
    fresh = Batch(taps=taps, present=torch.from_numpy(t.present[idx]), labels=torch.from_numpy(t.labels[idx]),
                  tasks=torch.ones(16, dtype=torch.long), replay=torch.zeros(16, dtype=torch.bool))
    return s, s.cat(fresh, s.replay_batch(16))


def _gradient(s, batch: Batch, **weights: float) -> torch.Tensor:
    """The flat gradient one training step would apply, with the given loss weights."""
    saved = dict(s.p)
    s.p.update(weights)
    try:
        s.model.train()
        s.model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same modality-dropout and gate-noise draws for every call
        out = s.model(batch.taps, batch.present)
        torch.stack(list(s.loss(batch, out).values())).sum().backward()
        s._ewc_value = None
        s.before_step(batch, out)
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in s.model.parameters() if p.requires_grad])
    finally:
        s.p.clear()
        s.p.update(saved)


@pytest.mark.parametrize("term", ["distill", "align", "preserve", "consistency", "ewc", "balance"])
def test_each_loss_term_changes_the_gradient_when_switched_on(term: str) -> None:
    s, batch = _second_task_state()
    assert bool(batch.replay.any()) and bool((~batch.replay).any())
    with torch.no_grad():  # a few steps into the task: away from the EWC anchor (its gradient is 0 there)
        gen = torch.Generator().manual_seed(3)
        for p in s.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    off = _gradient(s, batch, **{term: 0.0})
    on = _gradient(s, batch, **{term: 1.0})
    again = _gradient(s, batch, **{term: 0.0})
    torch.testing.assert_close(off, again)  # the comparison is deterministic
    change = float((on - off).norm())
    assert change > 1e-3 * float(off.norm()), f"{term} on left the gradient unchanged ({change:.2e})"


def test_routing_does_not_collapse_onto_frozen_experts() -> None:
    """Synthetic 5-task stream: with the routing fix most of each later task's routing goes to
    experts it can still train; the seed's routing (threshold freezing only) sends much more of
    it to frozen experts and freezes more experts."""
    fixed, seed = new("ours-full", epochs=3), new("ours-no-routing-fix", epochs=3)
    train, _ = stream(5)
    for t in train:
        fixed.learn_task(t)
        seed.learn_task(t)
    to_frozen = np.asarray(fixed.frozen_share_history[1:])  # (tasks 2.., levels)
    to_frozen_seed = np.asarray(seed.frozen_share_history[1:])
    assert to_frozen_seed.mean() > 0.6, to_frozen_seed  # the stream does collapse the seed's routing
    assert to_frozen.mean() < 0.5, to_frozen
    assert to_frozen.mean() < to_frozen_seed.mean() - 0.2, (to_frozen.mean(), to_frozen_seed.mean())
    c = fixed.model.config
    assert all(int((~m.frozen).sum()) >= c.min_free_experts for m in moe_modules(fixed.model))
    assert all(len(level) == c.n_experts for task in fixed.share_history for level in task)


def test_per_sample_fisher_is_the_mean_of_squared_per_sample_gradients() -> None:
    torch.manual_seed(0)
    model = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=16, fusion_hidden=32, adapter="moe",
                                    n_experts=4, num_classes=4))
    t = make_task([0, 1, 2, 3], 0, 5)
    taps = {m: [torch.from_numpy(x) for x in lv] for m, lv in t.taps.items()}
    present, labels = torch.from_numpy(t.present), torch.from_numpy(t.labels)
    present[3, 1] = False
    fisher = OnlineGroupEWC.estimate_fisher_per_sample(model, [(taps, present, labels)])
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for i in range(len(labels)):
        model.zero_grad()
        out = model({m: [x[i : i + 1] for x in lv] for m, lv in taps.items()}, present[i : i + 1])
        F.cross_entropy(out.logits, labels[i : i + 1]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                ref[n] += p.grad.pow(2) / len(labels)
    for n, f in fisher.items():
        torch.testing.assert_close(f, ref[n], rtol=1e-4, atol=1e-9)
    # the mini-batch estimate squares the mean gradient: smaller wherever samples disagree
    batch = OnlineGroupEWC({}).estimate_fisher(model, [(taps, present, labels)],
                                               lambda mdl, b: F.cross_entropy(mdl(b[0], b[1]).logits, b[2]))
    assert sum(float(f.sum()) for f in batch.values()) < sum(float(f.sum()) for f in fisher.values())


def test_seed_and_named_options() -> None:
    seed = new("seed")
    assert seed.p["distill"] > 0 and seed.p["nme_mix"] == 0 and seed.p["weight_align"] == 0
    assert seed.model.config.freeze_per_task == 0 and seed.model.config.gate_noise == 0
    assert new("ours-no-nme").p["nme_mix"] == 0 and new("ours-no-wa").p["weight_align"] == 0
    assert new("ours-distill").p["distill"] > 0 and new("ours").p["distill"] == 0
    # nme_mix changes predictions once class means exist; weight aligning rescales new head rows
    s = new("ours-full", epochs=2)
    train, test = stream(2)
    for t in train:
        s.learn_task(t)
    taps = {m: [torch.from_numpy(x) for x in lv] for m, lv in test[0].taps.items()}
    present = torch.from_numpy(test[0].present)
    mixed = s.predict(taps, present)
    s.p["nme_mix"] = 0.0
    head = s.predict(taps, present)
    assert float((mixed - F.log_softmax(head, 1)).abs().max()) > 1e-3
    w = s.model.head.weight.detach()
    torch.testing.assert_close(w[2:].norm(dim=1).mean(), w[:2].norm(dim=1).mean(), rtol=0.05, atol=0.0)
