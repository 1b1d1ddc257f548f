"""Side network: shapes, growing head, absent modalities, dropout, parameter groups, config checks."""

from __future__ import annotations

import pytest
import torch

from training.model import ModelConfig, SideNetwork, distill_kl

DIMS = {"image": [6, 10, 12], "audio": [5, 7, 9], "imu": [11]}  # imu has one tap: joins at the deep end


def inputs(n: int = 4, seed: int = 0) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    taps = {m: [torch.randn(n, d, generator=g) for d in dims] for m, dims in DIMS.items()}
    return taps, torch.ones(n, len(DIMS), dtype=torch.bool)


def test_output_shapes() -> None:
    torch.manual_seed(0)
    net = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=8, num_classes=3))
    taps, present = inputs()
    out = net(taps, present)
    assert out.logits.shape == (4, 3) and out.z_joint.shape == (4, 8) and out.z_mod.shape == (4, 3, 8)
    assert out.routing is None and net.modalities == ["image", "audio", "imu"] and net.levels == 3


def test_add_classes_keeps_old_rows() -> None:
    torch.manual_seed(0)
    net = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=8))
    assert net.num_classes == 0
    net.add_classes(2)
    taps, present = inputs()
    before = net(taps, present).logits.detach()
    net.add_classes(3)
    after = net(taps, present).logits.detach()
    assert net.num_classes == 5 and after.shape == (4, 5)
    # Same weights, but a wider head may take another GEMM kernel: equal to float rounding, not bitwise.
    torch.testing.assert_close(after[:, :2], before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="n must be >= 0"):
        net.add_classes(-1)


def test_absent_modality_ignores_its_taps() -> None:
    torch.manual_seed(0)
    net = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=8, num_classes=3)).eval()
    taps, present = inputs()
    present[:, 1] = False
    a = net(taps, present).logits
    taps["audio"] = [x * 100 + 5 for x in taps["audio"]]
    b = net(taps, present).logits
    assert torch.allclose(a, b)
    present[:, 1] = True
    assert not torch.allclose(net(taps, present).logits, a)


def test_every_lateral_changes_the_output() -> None:
    torch.manual_seed(0)
    net = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=8, num_classes=3)).eval()
    taps, present = inputs()
    ref = net(taps, present).logits
    for m, levels in taps.items():
        for b in range(len(levels)):
            changed = {k: [x.clone() for x in v] for k, v in taps.items()}
            changed[m][b] = changed[m][b] + torch.randn_like(changed[m][b])
            assert not torch.allclose(net(changed, present).logits, ref), (m, b)


def test_modality_dropout_only_in_training_and_never_drops_all() -> None:
    torch.manual_seed(0)
    net = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=8, num_classes=3, modality_dropout=0.9))
    taps, present = inputs(n=256)
    out = net.train()(taps, present)
    assert out.present is not None and out.present.any(dim=1).all()
    assert (~out.present).float().mean() > 0.3
    assert net.eval()(taps, present).present.all()


def test_param_groups_partition_parameters() -> None:
    net = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=8, num_classes=3))
    groups = net.param_groups()
    assert set(groups) == {"lateral:image", "lateral:audio", "lateral:imu", "proj:image", "proj:audio", "proj:imu",
                           "adapter", "fusion", "head"}
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in net.named_parameters())


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    net = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=8, num_classes=3))
    taps, present = inputs()
    present[0, 2] = False  # so the absent embedding gets a gradient
    net(taps, present).logits.sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # absent tokens of levels where a modality is present for every sample get no gradient
    assert all(n == "absent" for n in missing)


@pytest.mark.parametrize(("kw", "match"), [
    ({"tap_dims": {"a": [0]}}, "tap_dims"), ({"adapter": "lora"}, "adapter"),
    ({"top_k": 11}, "top_k"), ({"modality_dropout": 1.0}, "modality_dropout"), ({"d": 0}, "ModelConfig.d"),
])
def test_config_validation(kw: dict, match: str) -> None:
    args = {"tap_dims": DIMS, **kw}
    with pytest.raises(ValueError, match=match):
        ModelConfig(**args)


def test_empty_tap_dims_is_the_config_default_and_refused_by_the_network() -> None:
    assert ModelConfig().tap_dims == {}  # the [learner.model] tree leaves it to the backbones
    with pytest.raises(ValueError, match="tap_dims"):
        SideNetwork(ModelConfig(tap_dims={}))


def test_moe_adapter_when_available() -> None:
    pytest.importorskip("training.moe")
    torch.manual_seed(0)
    net = SideNetwork(ModelConfig(tap_dims=DIMS, d=16, proj_dim=8, num_classes=3, adapter="moe", n_experts=4))
    out = net(*inputs())
    assert out.routing is not None and len(out.routing) == 3 and out.routing[0].shape == (4, 4)


def test_distill_kl_zero_for_equal_logits() -> None:
    x = torch.randn(5, 4)
    assert float(distill_kl(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_kl(x, x.flip(1))) > 0
