"""Skill packages (training.skills): what travels, bounded in bytes, and every way a package is refused;
the distillation term a received package's soft targets drive (Strategy.soft_term)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training import skills
from training.config import LearnerConfig, ModelConfig, StrategyConfig
from training.learner import LabelledSamples, Learner
from training.model import SideNetwork
from training.strategies.base import Batch, Strategy
from training.taskdata import TaskData

DIMS = {"image": [24, 40], "audio": [16], "imu": [8]}
FP = {"image": "img-1", "audio": "aud-1", "imu": "imu-1"}
KEY = bytes(range(32))


def samples(labels: list[str], n: int, seed: int) -> LabelledSamples:
    rng = np.random.default_rng(seed)
    names = [lab for lab in labels for _ in range(n)]
    centre = {lab: {m: [rng.normal(size=d) * 3 for d in ds] for m, ds in DIMS.items()} for lab in labels}
    taps = {m: [np.stack([centre[lab][m][b] + rng.normal(size=d) for lab in names]).astype(np.float32)
                for b, d in enumerate(ds)] for m, ds in DIMS.items()}
    return LabelledSamples(taps=taps, present=np.ones((len(names), 3), bool), names=names)


@pytest.fixture(scope="module")
def learner() -> Learner:
    cfg = LearnerConfig(training=StrategyConfig(epochs=3, max_seconds=0))
    lr = Learner(DIMS, cfg)
    lr.learn_task(samples(["a", "b"], 60, 0))
    lr.learn_task(samples(["c", "d"], 60, 1))
    return lr


@pytest.fixture(scope="module")
def package(learner: Learner) -> bytes:
    header, payload = skills.build(learner, task="cd", labels=["c", "d"], fingerprints=FP, origin="robot-a")
    return skills.sign(header, payload, KEY)


def test_package_round_trips_its_exemplars_and_soft_targets(learner: Learner, package: bytes) -> None:
    h = skills.read_header(package, KEY)
    assert h["task"] == "cd" and h["labels"] == ["c", "d"] and h["origin"] == "robot-a" and h["fingerprints"] == FP
    assert h["per_class"] == {"c": 60, "d": 60} and h["exemplars"] == 120  # the whole buffer share fits in 1 MB
    ex = skills.exemplars(package, h)
    assert sorted(set(ex.names)) == ["c", "d"] and ex.present.shape == (120, 3) and ex.soft.shape == (120, 2)
    # each exemplar is a buffered sample to within int8 rounding (half a step of its own scale)
    rb = learner.buffer.all()
    src = rb.taps["image"][1][np.isin(rb.labels, [2, 3])]
    got = ex.taps["image"][1]
    nearest = np.abs(got[:, None, :] - src[None, :, :]).max(axis=2).min(axis=1)
    assert (nearest <= np.abs(src).max() / 127 / 2 + 1e-2).all()
    # the soft targets are the sender's own opinion: argmax = the label on these separable classes
    assert np.mean(np.asarray(["c", "d"])[ex.soft.argmax(1)] == np.asarray(ex.names)) > 0.95
    arrays = skills.payload_arrays(package)
    assert arrays["head_weight"].shape == (2, learner.model.state_dict()["head.weight"].shape[1])
    assert "fisher_head_weight" in arrays and np.isfinite(arrays["fisher_head_weight"]).all()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(min_value=70_000, max_value=400_000))
def test_package_never_exceeds_its_byte_budget(learner: Learner, budget: int) -> None:
    header, payload = skills.build(learner, task="cd", labels=["c", "d"], fingerprints=FP, origin="r",
                                   max_bytes=budget)
    data = skills.sign(header, payload, KEY)
    assert len(data) <= budget
    assert min(header["per_class"].values()) >= max(header["per_class"].values()) - 1  # class-balanced


def test_too_small_a_budget_or_an_unknown_label_is_a_clear_error(learner: Learner) -> None:
    with pytest.raises(ValueError, match="leaves room for"):
        skills.build(learner, task="cd", labels=["c", "d"], fingerprints=FP, origin="r", max_bytes=2_000)
    with pytest.raises(ValueError, match="not learned here"):
        skills.build(learner, task="x", labels=["zebra"], fingerprints=FP, origin="r")


@pytest.mark.parametrize("how, reason", [
    ("payload", "checksum mismatch"),
    ("header", "bad signature"),
    ("key", "another fleet's key"),
    ("magic", "bad magic"),
    ("truncate", "truncated or corrupt"),
])
def test_tampered_foreign_or_broken_packages_are_refused_with_their_reason(package: bytes, how: str,
                                                                           reason: str) -> None:
    data, key = bytearray(package), KEY
    if how == "payload":
        data[-5] ^= 0x01
    elif how == "header":
        i = bytes(data).index(b'"robot-a"')
        data[i + 1:i + 8] = b"robot-z"  # same length: only the signature can tell
    elif how == "key":
        key = bytes(32)
    elif how == "magic":
        data[:4] = b"PK\x03\x04"
    else:
        data = data[:30]
    with pytest.raises(skills.SkillRefused, match=reason):
        skills.read_header(bytes(data), key)


def test_backbone_layout_and_label_clashes_are_refused(package: bytes) -> None:
    h = skills.read_header(package, KEY)
    skills.check_compatible(h, fingerprints=FP, tap_dims=DIMS, known_labels={"a": "t0"})  # fits
    with pytest.raises(skills.SkillRefused, match=r"backbone mismatch on \['image'\]"):
        skills.check_compatible(h, fingerprints={**FP, "image": "img-2"}, tap_dims=DIMS, known_labels={})
    with pytest.raises(skills.SkillRefused, match="tap layout"):
        skills.check_compatible(h, fingerprints=FP, tap_dims={**DIMS, "imu": [9]}, known_labels={})
    with pytest.raises(skills.SkillRefused, match="pooled taps"):
        skills.check_compatible({**h, "stored_dims": {**DIMS, "image": [24, 20]}}, fingerprints=FP, tap_dims=DIMS,
                                known_labels={})
    with pytest.raises(skills.SkillRefused, match=r"class names clash: \['c'\]"):
        skills.check_compatible(h, fingerprints=FP, tap_dims=DIMS, known_labels={"c": "mine"})


def test_fleet_key_is_private_and_never_overwritten(tmp_path) -> None:
    path = skills.new_key(tmp_path / "fleet.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(skills.load_key(path)) == skills.KEY_BYTES
    with pytest.raises(FileExistsError):
        skills.new_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="readable by others"):
        skills.load_key(path)
    with pytest.raises(ValueError, match="cannot read the fleet key"):
        skills.load_key(tmp_path / "missing.key")


def _strategy(weight: float) -> Strategy:
    torch.manual_seed(0)
    model = SideNetwork(ModelConfig(tap_dims=DIMS))
    model.add_classes(4)
    s = Strategy(model, StrategyConfig(soft_weight=weight, soft_temperature=2.0, epochs=1))
    s.optimizer = s.make_optimizer()
    return s


def _grads(weight: float, data: TaskData) -> tuple[dict[str, float], list[torch.Tensor]]:
    s = _strategy(weight)
    taps = {m: [torch.from_numpy(x) for x in lv] for m, lv in data.taps.items()}
    n = len(data)
    batch = Batch(taps=taps, present=torch.from_numpy(data.present), labels=torch.from_numpy(data.labels),
                  tasks=torch.zeros(n, dtype=torch.long), replay=torch.zeros(n, dtype=torch.bool),
                  soft=None if data.soft is None else torch.from_numpy(data.soft),
                  soft_classes=None if data.soft_classes is None else torch.from_numpy(data.soft_classes))
    out = s.model(batch.taps, batch.present)
    terms = {**s.loss(batch, out), **s.soft_term(batch, out)}
    torch.stack(list(terms.values())).sum().backward()
    return {k: float(v.detach()) for k, v in terms.items()}, [p.grad.clone() for p in s.model.parameters() if p.grad is not None]


def test_distillation_term_is_the_tempered_kl_and_changes_the_gradient() -> None:
    ls = samples(["a", "b"], 8, 3)
    taps = {m: ls.taps[m] for m in DIMS}
    labels = np.repeat([2, 3], 8)
    soft = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32) * 3
    with_soft = TaskData(taps=taps, present=ls.present, labels=labels, task=1, soft=soft, soft_classes=[2, 3])
    plain = TaskData(taps=taps, present=ls.present, labels=labels, task=1)
    terms, g_soft = _grads(1.0, with_soft)
    assert set(terms) == {"ce", "kd"} and terms["kd"] > 0
    # the value is KL(softmax(t/T) || softmax(s/T)) * T^2 over the teacher's classes
    s = _strategy(1.0)
    with torch.no_grad():
        logits = s.model({m: [torch.from_numpy(x) for x in lv] for m, lv in taps.items()},
                         torch.from_numpy(ls.present)).logits[:, [2, 3]]
    p = torch.softmax(torch.from_numpy(soft) / 2, 1)
    ref = (p * (p.log() - torch.log_softmax(logits / 2, 1))).sum(1).mean() * 4
    assert terms["kd"] == pytest.approx(float(ref), rel=1e-4)
    off, g_off = _grads(0.0, with_soft)
    _, g_plain = _grads(1.0, plain)
    assert "kd" not in off
    assert all(torch.allclose(a, b) for a, b in zip(g_off, g_plain, strict=True))  # weight 0 = no teacher
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(g_soft, g_plain, strict=True))
