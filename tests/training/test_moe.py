"""CrossModalMoE: routing, masking of absent modalities, per-task usage, expert freezing."""

from __future__ import annotations

import torch
from torch import nn

from training.model import ModelConfig, SideNetwork
from training.moe import CrossModalMoE, balance_loss, freeze_busy_experts, moe_modules

D, K, E = 16, 3, 10


def _moe(**kw) -> CrossModalMoE:
    torch.manual_seed(0)
    return CrossModalMoE(d=D, n_modalities=K, n_experts=E, top_k=2, bottleneck=8, **kw)


def _inputs(b: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, K, D, generator=g), torch.ones(b, K, dtype=torch.bool)


def test_gates_are_sparse_top_k_and_normalised() -> None:
    moe = _moe()
    u, present = _inputs()
    h, gates = moe(u, present)
    assert h.shape == u.shape and gates.shape == (32, E)
    assert torch.equal((gates > 0).sum(1), torch.full((32,), 2))
    torch.testing.assert_close(gates.sum(1), torch.ones(32))
    assert not torch.allclose(h, u), "the adapter must change the tokens"


def test_absent_modality_has_no_influence_and_passes_through() -> None:
    moe = _moe()
    u, present = _inputs()
    present[:, 1] = False
    h1, g1 = moe(u, present)
    u2 = u.clone()
    u2[:, 1] = 100.0 * torch.randn(32, D)
    h2, g2 = moe(u2, present)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(h1[:, [0, 2]], h2[:, [0, 2]])
    torch.testing.assert_close(h2[:, 1], u2[:, 1])  # absent token untouched
    # ...whereas a present modality does influence the others
    present_all = torch.ones_like(present)
    h3, _ = moe(u, present_all)
    h4, _ = moe(u2, present_all)
    assert not torch.allclose(h3[:, 0], h4[:, 0])


def test_all_absent_is_finite_with_finite_gradients() -> None:
    moe = _moe()
    u, present = _inputs(4)
    present[:] = False
    u.requires_grad_(True)
    h, _ = moe(u, present)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(u.grad).all()
    torch.testing.assert_close(h, u)


def test_forward_never_counts_usage_and_shares_sum_to_one() -> None:
    moe = _moe()
    u, present = _inputs()
    _, gates = moe(u, present)
    assert moe.usage.sum() == 0  # the strategy counts the rows it wants (a task's own rows)
    moe.usage += (gates > 0).float().sum(0)
    assert moe.usage.sum() == 2 * 32
    torch.testing.assert_close(moe.shares().sum(), torch.tensor(1.0))
    moe.reset_usage()
    assert moe.usage.sum() == 0


def test_frozen_experts_bit_identical_and_without_optimizer_state() -> None:
    moe = _moe()
    u, present = _inputs(64)
    _, gates = moe(u, present)
    moe.usage += (gates > 0).float().sum(0)
    frozen = moe.shares() > 0.10
    assert 0 < int(frozen.sum()) < E
    moe.freeze(frozen)
    assert all(not p.requires_grad for e in frozen.nonzero().flatten() for p in moe.experts[int(e)].parameters())
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    opt = torch.optim.Adam([p for p in moe.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        h, _ = moe(u, present)
        _, g = moe(u, present)
        (h.pow(2).mean() + balance_loss(moe, g)).backward()
        opt.step()
    state_ids = {id(p) for p in opt.state}
    changed_free = False
    for e, expert in enumerate(moe.experts):
        for n, p in expert.named_parameters():
            if frozen[e]:
                assert torch.equal(p, before[f"experts.{e}.{n}"]), f"frozen expert {e}.{n} moved"
                assert id(p) not in state_ids and p.grad is None
            elif not torch.equal(p, before[f"experts.{e}.{n}"]):
                changed_free = True
    assert changed_free, "trainable experts must learn"
    assert not torch.equal(moe.gate.weight, before["gate.weight"])


def test_freeze_is_cumulative_and_survives_state_dict() -> None:
    moe = _moe()
    m1 = torch.zeros(E, dtype=torch.bool)
    m1[[0, 3]] = True
    m2 = torch.zeros(E, dtype=torch.bool)
    m2[5] = True
    moe.freeze(m1)
    moe.freeze(m2)
    assert moe.frozen.nonzero().flatten().tolist() == [0, 3, 5]
    fresh = _moe()
    fresh.load_state_dict(moe.state_dict())
    assert fresh.frozen.nonzero().flatten().tolist() == [0, 3, 5]
    assert [all(not p.requires_grad for p in e.parameters()) for e in fresh.experts] == [
        i in (0, 3, 5) for i in range(E)
    ]


def test_freeze_busy_experts_uses_threshold() -> None:
    model = nn.ModuleList([_moe(), _moe()])
    for moe in model:
        moe.usage.copy_(torch.tensor([50.0, 5, 5, 5, 5, 5, 5, 5, 5, 10]))  # shares 0.5, 0.05.., 0.1
    newly = freeze_busy_experts(model, 0.10)
    assert [m.nonzero().flatten().tolist() for m in newly] == [[0], [0]]
    assert all(m.frozen.nonzero().flatten().tolist() == [0] for m in moe_modules(model))


def test_balance_loss_has_gate_gradient_and_charges_frozen_experts() -> None:
    moe = _moe()
    u, present = _inputs()
    _, gates = moe(u, present)
    loss = balance_loss(moe, gates)
    loss.backward(retain_graph=True)
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert float(loss.detach()) > 0
    busy = (gates > 0).float().mean(0).argmax()
    mask = torch.zeros(E, dtype=torch.bool)
    mask[busy] = True
    moe.freeze(mask)
    charged = balance_loss(moe, gates, frozen_cost=4.0)
    assert float(charged.detach()) > float(loss.detach()) + 1e-6  # the busy expert now costs 4x
    # the gradient pushes probability away from the frozen expert: its gate logit goes down
    moe.gate.weight.grad = None
    moe.gate.bias.grad = None
    charged.backward()
    assert float(moe.gate.bias.grad[busy]) > 0 and float(moe.gate.bias.grad[busy]) == max(moe.gate.bias.grad)


def test_freeze_busy_experts_caps_per_task_and_keeps_free_experts() -> None:
    model = nn.ModuleList([_moe()])
    moe = model[0]
    moe.usage.copy_(torch.full((E,), 10.0))  # uniform: every share 0.1 + tiny differences below
    moe.usage[:4] += torch.tensor([4.0, 3.0, 2.0, 1.0])
    newly = freeze_busy_experts(model, 0.05, per_task=2)
    assert newly[0].nonzero().flatten().tolist() == [0, 1]  # the two busiest only
    freeze_busy_experts(model, 0.05, per_task=0, min_free=3)
    assert int((~moe.frozen).sum()) == 3  # no limit per task, but 3 stay free
    freeze_busy_experts(model, 0.05, per_task=0, min_free=3)
    assert int((~moe.frozen).sum()) == 3


def test_side_network_with_missing_modality() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(tap_dims={"image": [8, 12], "audio": [6, 6], "imu": [5]}, d=D, adapter="moe",
                      n_experts=E, bottleneck=8, proj_dim=12, num_classes=4, fusion_hidden=16)
    net = SideNetwork(cfg).eval()
    g = torch.Generator().manual_seed(3)
    taps = {m: [torch.randn(8, dim, generator=g) for dim in dims] for m, dims in cfg.tap_dims.items()}
    present = torch.ones(8, 3, dtype=torch.bool)
    present[:, 1] = False
    out1 = net(taps, present)
    taps2 = dict(taps)
    taps2["audio"] = [1e3 * torch.randn(8, dim, generator=g) for dim in cfg.tap_dims["audio"]]
    out2 = net(taps2, present)
    assert torch.isfinite(out1.logits).all()
    torch.testing.assert_close(out1.logits, out2.logits)
    assert out1.routing is not None and len(out1.routing) == 2
    out3 = net(taps2, torch.ones(8, 3, dtype=torch.bool))
    assert not torch.allclose(out1.logits, out3.logits)
