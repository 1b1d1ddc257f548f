"""Learner (runtime API) and the "ours" strategy: learning, missing modalities, freezing,
ablation switches, cancel/deadline, and state round trips."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch

from tests.conftest import LEARNER_DIMS as DIMS
from tests.conftest import LEARNER_NAMES as NAMES
from tests.conftest import learner_samples as _samples
from tests.conftest import small_learner_config
from training import registry
from training.errors import TrainingCancelled
from training.learner import Learner
from training.moe import moe_modules
from training.taskdata import TaskData

_config = functools.partial(small_learner_config, epochs=4, strategy="ours-full")  # every part on: MoE, freezing


@pytest.fixture(scope="module")
def two_tasks() -> Learner:
    learner = Learner(DIMS, _config())
    learner.learn_task(_samples([0, 1], 160, 1))
    learner.learn_task(_samples([2, 3], 160, 2))
    return learner


def test_untrained_predict_is_empty_not_an_error() -> None:
    pred = Learner(DIMS, _config()).predict(_samples([0], 4, 0).taps)
    assert pred.probs.shape == (4, 0) and pred.name == [""] * 4


def test_learns_two_tasks_and_names_classes(two_tasks: Learner) -> None:
    assert two_tasks.class_names[:2] == ["cup", "ball"] and sorted(two_tasks.class_names) == sorted(NAMES)
    assert two_tasks.evaluate(_samples([0, 1, 2, 3], 200, 9)) > 0.8
    pred = two_tasks.predict(_samples([2], 5, 3).taps)
    assert pred.name == ["box"] * 5 and np.allclose(pred.probs.sum(1), 1.0, atol=1e-5)


def test_missing_modality_finite_and_masked(two_tasks: Learner) -> None:
    s = _samples([0, 1, 2, 3], 50, 4)
    no_audio = {m: v for m, v in s.taps.items() if m != "audio"}
    p1 = two_tasks.predict(no_audio)
    noisy = dict(s.taps)
    noisy["audio"] = [1e3 * np.ones_like(x) for x in s.taps["audio"]]
    p2 = two_tasks.predict(noisy, ["image", "imu"])
    assert np.isfinite(p1.probs).all()
    np.testing.assert_allclose(p1.probs, p2.probs, rtol=1e-5, atol=1e-6)
    p3 = two_tasks.predict(noisy)
    assert not np.allclose(p1.probs, p3.probs)
    only_imu = two_tasks.predict({"imu": s.taps["imu"]})
    assert np.isfinite(only_imu.probs).all()


def test_busy_experts_frozen_bit_identical_and_without_optimizer_state(two_tasks: Learner) -> None:
    strat = two_tasks.strategy
    moes = moe_modules(strat.model)
    assert moes and strat.frozen_history[-1] == sum(int(m.frozen.sum()) for m in moes) > 0
    frozen = [(e, p) for m in moes for i, e in enumerate(m.experts) if m.frozen[i] for p in e.parameters()]
    before = [p.detach().clone() for _, p in frozen]
    two_tasks.learn_task(_samples([0, 3], 64, 5))
    moes = moe_modules(two_tasks.strategy.model)
    # experts frozen before this task never got optimizer state in it (ones frozen at its end did train in it)
    was_frozen = [old.frozen.clone() for old in moe_modules(strat.model)]
    frozen_now = [p for m, f in zip(moes, was_frozen, strict=True) for i, e in enumerate(m.experts) if f[i]
                  for p in e.parameters()]
    state_ids = {id(p) for p in two_tasks.strategy.optimizer.state}
    assert frozen_now and all(id(p) not in state_ids and not p.requires_grad for p in frozen_now)
    # the learner trains a copy, so compare by position: the earlier-frozen experts are unchanged
    now = [p for m in moes for i, e in enumerate(m.experts) if bool(m.frozen[i]) for p in e.parameters()]
    assert len(now) >= len(before)
    old_mask = [m for m in strat.model.modules() if m in moe_modules(strat.model)]
    for old_m, new_m in zip(old_mask, moes, strict=True):
        for i in old_m.frozen.nonzero().flatten().tolist():
            for a, b in zip(old_m.experts[i].parameters(), new_m.experts[i].parameters(), strict=True):
                assert torch.equal(a, b)


def test_state_dict_round_trip(two_tasks: Learner, tmp_path) -> None:
    s = _samples([0, 1, 2, 3], 30, 6)
    ref = two_tasks.predict(s.taps).probs
    restored = Learner(DIMS, _config())
    restored.load_state_dict(two_tasks.state_dict())
    np.testing.assert_allclose(restored.predict(s.taps).probs, ref, rtol=1e-5, atol=1e-6)
    assert restored.class_names == two_tasks.class_names
    a, b = two_tasks.strategy, restored.strategy
    assert a.ewc.n_updates == b.ewc.n_updates > 0
    for n, f in a.ewc.fisher.items():
        assert torch.equal(f, b.ewc.fisher[n])
    for ma, mb in zip(moe_modules(a.model), moe_modules(b.model), strict=True):
        assert torch.equal(ma.frozen, mb.frozen) and torch.equal(ma.usage, mb.usage)
        assert [p.requires_grad for p in ma.parameters()] == [p.requires_grad for p in mb.parameters()]
    two_tasks.save(tmp_path / "ckpt")
    loaded = Learner.load(tmp_path / "ckpt")
    np.testing.assert_allclose(loaded.predict(s.taps).probs, ref, rtol=1e-5, atol=1e-6)
    assert len(loaded.buffer) == len(two_tasks.buffer) > 0


def test_cancel_leaves_learner_unchanged_and_deadline_stops() -> None:
    learner = Learner(DIMS, _config())
    learner.learn_task(_samples([0, 1], 64, 1))
    s = _samples([0, 1], 20, 2)
    ref = learner.predict(s.taps).probs
    cancel = threading.Event()
    calls: list[tuple[int, int]] = []

    def progress(step: int, total: int) -> None:
        calls.append((step, total))
        if step == 2:
            cancel.set()

    with pytest.raises(TrainingCancelled):
        learner.learn_task(_samples([2, 3], 64, 3), progress=progress, cancel=cancel)
    assert calls and learner.class_names == ["cup", "ball"]
    np.testing.assert_allclose(learner.predict(s.taps).probs, ref, rtol=0, atol=1e-6)
    slow = Learner(DIMS, _config(epochs=10_000, max_seconds=0.3))
    report = slow.learn_task(_samples([0, 1], 64, 1))
    assert report.stopped == "deadline" and report.seconds < 5.0


def _task(classes: list[int], n: int, seed: int, task: int) -> TaskData:
    s = _samples(classes, n, seed)
    return TaskData(taps=s.taps, present=s.present, labels=[NAMES.index(x) for x in s.names], task=task)


@pytest.mark.parametrize(("name", "missing"), [("ours-no-align", "align"), ("ours-no-preserve", "preserve"),
                                               ("ours-no-ewc", "ewc"), ("ours-no-consistency", "consistency")])
def test_ablations_switch_their_term_off(name: str, missing: str) -> None:
    cls = registry.get(name)
    learner_cfg = _config(strategy=name, epochs=2)
    learner = Learner(DIMS, learner_cfg)
    assert isinstance(learner.strategy, cls)
    for t, classes in enumerate(([0, 1], [2, 3], [1, 2])):
        report = learner.learn_task(_task(classes, 64, t, t))
    full = Learner(DIMS, _config(epochs=2))
    for t, classes in enumerate(([0, 1], [2, 3], [1, 2])):
        ref = full.learn_task(_task(classes, 64, t, t))
    assert missing in ref.losses and ref.losses[missing] > 0
    assert missing not in report.losses
    assert set(ref.losses) - {missing} == set(report.losses)


def test_no_freeze_and_no_moe() -> None:
    nf = Learner(DIMS, _config(strategy="ours-no-freeze", epochs=2))
    nf.learn_task(_task([0, 1], 64, 0, 0))
    assert all(not m.frozen.any() for m in moe_modules(nf.model)) and nf.strategy.share_history
    nm = Learner(DIMS, _config(strategy="ours-no-moe", epochs=2))
    nm.learn_task(_task([0, 1], 64, 0, 0))
    assert moe_modules(nm.model) == [] and nm.model.config.adapter == "none"
