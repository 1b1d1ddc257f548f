"""Losses of the method: each is zero when nothing changed, positive after a change, and its
gradient reduces it (so none of them can silently be a no-op)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from training.losses import (
    OnlineGroupEWC,
    alignment,
    cross_modal_consistency,
    distillation,
    relation_preservation,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _descend(loss_fn, params: list[torch.Tensor], steps: int = 20, lr: float = 0.1) -> tuple[float, float]:
    """Loss before and after a few SGD steps on ``params``; asserts a non-zero gradient first."""
    opt = torch.optim.SGD(params, lr=lr)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if first is None:
            first = float(loss.detach())
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "zero gradient"
        opt.step()
    return first, float(loss_fn().detach())


def test_distillation_zero_when_equal_and_descends() -> None:
    old = torch.randn(16, 4, generator=_gen())
    assert float(distillation(old, old, T=2.0)) < 1e-6
    new = torch.randn(16, 6, generator=_gen(1)).requires_grad_(True)  # head grew by 2
    before, after = _descend(lambda: distillation(old, new, T=2.0), [new], steps=50, lr=5.0)
    assert before > 0.01 and after < 0.5 * before
    assert float(distillation(old[:, :0], new)) == 0.0


def _alignment_setup() -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded projection, (32, 3, 8) per-modality inputs, (32, 6) joint targets, all present."""
    torch.manual_seed(0)
    proj = nn.Linear(8, 6)
    x = torch.randn(32, 3, 8, generator=_gen())
    z_joint = torch.randn(32, 6, generator=_gen(1))
    return proj, x, z_joint, torch.ones(32, 3, dtype=torch.bool)


def test_alignment_gradient_moves_projection_toward_joint() -> None:
    proj, x, z_joint, present = _alignment_setup()
    present[::3, 2] = False
    before, after = _descend(lambda: alignment(proj(x), z_joint, present), list(proj.parameters()), steps=50, lr=1.0)
    assert before > 0.5 and after < 0.8 * before
    # absent entries do not count
    z = proj(x).detach()
    z2 = z.clone()
    z2[::3, 2] = torch.randn(z2[::3, 2].shape)
    torch.testing.assert_close(alignment(z, z_joint, present), alignment(z2, z_joint, present))
    # identical representations: zero loss
    assert float(alignment(z_joint[:, None].expand(-1, 3, -1), z_joint, present)) < 1e-6


def test_alignment_infonce_variant_descends() -> None:
    proj, x, z_joint, present = _alignment_setup()
    before, after = _descend(lambda: alignment(proj(x), z_joint, present, tau=0.2), list(proj.parameters()))
    assert after < before


def test_relation_preservation_zero_positive_and_descends() -> None:
    z_old = torch.randn(24, 8, generator=_gen())
    assert abs(float(relation_preservation(z_old, z_old.clone(), tau=0.1))) < 1e-5
    assert abs(float(relation_preservation(z_old, 3.0 * z_old, tau=0.1))) < 1e-5  # cosine: scale-free
    z_new = (z_old + 0.8 * torch.randn(24, 8, generator=_gen(1))).requires_grad_(True)
    before, after = _descend(lambda: relation_preservation(z_old, z_new, tau=0.1), [z_new], lr=0.5)
    assert before > 0.05 and after < 0.5 * before
    assert float(relation_preservation(z_old[:2], z_new[:2].detach())) == 0.0


def test_relation_preservation_through_a_model() -> None:
    torch.manual_seed(0)
    old = nn.Linear(8, 6)
    new = nn.Linear(8, 6)
    new.load_state_dict(old.state_dict())
    x = torch.randn(20, 8, generator=_gen())
    with torch.no_grad():
        z_old = old(x)
    assert abs(float(relation_preservation(z_old, new(x)))) < 1e-5
    with torch.no_grad():
        new.weight.add_(0.5 * torch.randn_like(new.weight))
    before, after = _descend(lambda: relation_preservation(z_old, new(x)), list(new.parameters()), lr=0.2)
    assert before > 0.01 and after < 0.7 * before


def test_cross_modal_consistency_zero_positive_masked_and_descends() -> None:
    zo = torch.randn(16, 3, 6, generator=_gen())
    present = torch.ones(16, 3, dtype=torch.bool)
    assert float(cross_modal_consistency(zo, zo.clone(), present)) < 1e-10
    zn = (zo + 0.7 * torch.randn(16, 3, 6, generator=_gen(1))).requires_grad_(True)
    before, after = _descend(lambda: cross_modal_consistency(zo, zn, present), [zn], steps=50, lr=5.0)
    assert before > 0.01 and after < 0.5 * before
    # only modality 0 present: no pair, loss 0; changing an absent modality changes nothing
    only0 = torch.zeros(16, 3, dtype=torch.bool)
    only0[:, 0] = True
    assert float(cross_modal_consistency(zo, zn, only0)) == 0.0
    two = torch.ones(16, 3, dtype=torch.bool)
    two[:, 2] = False
    zn2 = zn.detach().clone()
    zn2[:, 2] = torch.randn(16, 6)
    torch.testing.assert_close(cross_modal_consistency(zo, zn.detach(), two), cross_modal_consistency(zo, zn2, two))


@given(st.integers(3, 12), st.integers(0, 10_000))
def test_relation_and_alignment_bounds(n: int, seed: int) -> None:
    g = _gen(seed)
    a, b = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    assert float(relation_preservation(a, b)) >= -1e-5
    zm = torch.randn(n, 3, 5, generator=g)
    val = float(alignment(zm, a, torch.ones(n, 3, dtype=torch.bool)))
    assert -1e-6 <= val <= 2.0 + 1e-6


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def _fisher_batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = _gen(5)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)) for _ in range(n)]


def _ce(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_ewc_penalty_zero_at_anchor_positive_after_move_and_pulls_back() -> None:
    torch.manual_seed(0)
    model = _Two()
    ewc = OnlineGroupEWC({"body": ("body.",), "head": ("head.",)}, gamma=0.9)
    assert float(ewc.penalty(model)) == 0.0
    ewc.update_fisher(model, ewc.estimate_fisher(model, _fisher_batches(), _ce))
    assert float(ewc.penalty(model)) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    before, after = _descend(lambda: ewc.penalty(model), list(model.parameters()), lr=0.05)
    assert before > 0 and after < 0.5 * before
    # adaptive weights: mean-normalised Fisher per group -> weight * mean Fisher == 1 in each group
    for g, prefix in (("body", "body."), ("head", "head.")):
        fs = [f for n, f in ewc.fisher.items() if n.startswith(prefix)]
        mean = float(sum(f.sum() for f in fs) / sum(f.numel() for f in fs))
        assert abs(ewc.weights[g] * mean - 1.0) < 1e-3


def test_ewc_online_decay_growth_frozen_and_state_dict() -> None:
    torch.manual_seed(0)
    model = _Two()
    ewc = OnlineGroupEWC({"body": ("body.",), "head": ("head.",)}, gamma=0.5)
    f1 = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    ewc.update_fisher(model, f1)
    ewc.update_fisher(model, {n: 2 * torch.ones_like(p) for n, p in model.named_parameters()})
    torch.testing.assert_close(ewc.fisher["body.weight"], torch.full((4, 4), 2.5))
    # the head grows by one class: old rows keep Fisher, the new row gets none
    old_head = model.head
    model.head = nn.Linear(4, 3)
    with torch.no_grad():
        model.head.weight[:2] = old_head.weight
        model.head.bias[:2] = old_head.bias
        model.head.weight[2] += 5.0
    assert float(ewc.group_penalties(model)["head"]) < 1e-10
    ewc.update_fisher(model, {})
    assert ewc.fisher["head.weight"].shape == (3, 4) and float(ewc.fisher["head.weight"][2].sum()) == 0.0
    # frozen parameters are skipped
    with torch.no_grad():
        model.body.weight.add_(1.0)
    model.body.weight.requires_grad_(False)
    p_frozen = float(ewc.penalty(model))
    model.body.weight.requires_grad_(True)
    assert float(ewc.penalty(model)) > p_frozen
    restored = OnlineGroupEWC({}, gamma=0.1)
    restored.load_state_dict(ewc.state_dict())
    assert restored.gamma == 0.5 and restored.n_updates == 3
    torch.testing.assert_close(restored.penalty(model), ewc.penalty(model))


def test_ewc_cached_penalty_grad_matches_autograd() -> None:
    """add_penalty_grad_ (cached flat anchors, analytic gradient) == autograd of penalty()."""
    torch.manual_seed(1)
    model = _Two()
    ewc = OnlineGroupEWC({"body": ("body.",), "head": ("head.",)}, gamma=0.9)
    ewc.update_fisher(model, ewc.estimate_fisher(model, _fisher_batches(), _ce))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.zero_grad(set_to_none=True)
    (0.7 * ewc.penalty(model)).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    expected_value = float(0.7 * ewc.penalty(model))
    model.zero_grad(set_to_none=True)
    ewc.prepare(model)
    value = ewc.add_penalty_grad_(0.7)
    assert abs(float(value) - expected_value) < 1e-5 * max(1.0, expected_value)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-6, rtol=1e-4), n
