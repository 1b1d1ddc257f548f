"""SLDA, RanPAC, DER++ and ER-ACE on synthetic taps: each test fails if the method's own ingredient
(closed form, order independence, logit replay, asymmetric masking) were missing or wrong."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.conftest import LEARNER_DIMS, learner_samples, small_learner_config
from tests.training.test_strategies import DIMS, make_task, new, stream
from training.learner import Learner
from training.model import ModelOutput
from training.strategies.base import Batch
from training.strategies.derpp import DERpp
from training.strategies.erace import ace_incoming
from training.strategies.ranpac import RIDGES, best_ridge
from training.taskdata import TaskData


def np_features(data: TaskData) -> np.ndarray:
    """ncm_features in numpy: each tap L2-normalised, absent modalities zero, concatenated."""
    parts = []
    for k, lv in enumerate(data.taps.values()):
        for x32 in lv:
            x = x32.astype(np.float64)
            parts.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) * data.present[:, k, None])
    return np.concatenate(parts, axis=1)


def torch_in(data: TaskData) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    return {m: [torch.from_numpy(x) for x in lv] for m, lv in data.taps.items()}, torch.from_numpy(data.present)


def correlated_task(classes: list[int], task: int, n: int, seed: int) -> TaskData:
    """Gaussian classes with one shared, strongly non-isotropic covariance per tap (x = mu_c + A e)."""
    mix = np.random.default_rng(99)
    mixes = {m: [mix.normal(size=(d, d)) * np.linspace(0.1, 2.0, d) for d in ds] for m, ds in DIMS.items()}
    base = make_task(classes, task, n, seed=seed, noise=0.0)
    rng = np.random.default_rng(seed * 10 + task)
    taps = {m: [x + 0.3 * rng.normal(size=x.shape) @ mixes[m][b].T for b, x in enumerate(lv)]
            for m, lv in base.taps.items()}
    present = base.present.copy()
    present[::7, 1] = False  # some rows without audio: their audio features must count as zeros
    return TaskData(taps={m: [x.astype(np.float32) for x in lv] for m, lv in taps.items()}, present=present,
                    labels=base.labels, task=task)


# ---- SLDA ------------------------------------------------------------------------------------------
def test_slda_equals_closed_form_lda_and_streaming_equals_one_pass() -> None:
    t0, t1 = correlated_task([0, 1], 0, 60, 1), correlated_task([2, 3], 1, 60, 1)
    s = new("slda")
    s.learn_task(t0)
    means_t1 = s.means.copy()
    s.learn_task(t1)
    np.testing.assert_array_equal(s.means[:2], means_t1[:2])  # class-incremental: old means untouched
    # closed-form LDA in numpy on all the data
    both = TaskData.concat([t0, t1])
    x, y = np_features(both), both.labels
    mu = np.stack([x[y == c].mean(0) for c in range(4)])
    sigma = sum((x[y == c] - mu[c]).T @ (x[y == c] - mu[c]) for c in range(4)) / len(x)
    eps = 1e-4
    lam = np.linalg.inv((1 - eps) * sigma + eps * np.eye(len(sigma)))
    test = correlated_task([0, 1, 2, 3], 0, 20, 7)
    xt = np_features(test)
    ref = xt @ (lam @ mu.T) - 0.5 * np.einsum("cd,dk,ck->c", mu, lam, mu)
    got = s.predict(*torch_in(test)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
    assert (got.argmax(1) == test.labels).mean() > 0.9
    # the same classes split over two "tasks" (Chan's merge) == one pass over everything
    perm = np.random.default_rng(0).permutation(len(both))
    halves = [both.subset(perm[: len(perm) // 2]), both.subset(perm[len(perm) // 2 :])]
    a, b = new("slda"), new("slda")
    for h in halves:
        a.learn_task(h)
    b.learn_task(both)
    np.testing.assert_allclose(a.scatter, b.scatter, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.means, b.means, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.scatter / len(x), sigma, rtol=0, atol=1e-7)  # features are float32 there


def test_slda_unseen_classes_score_very_low() -> None:
    s = new("slda")
    _, test = stream(2)
    s.learn_task(stream(2)[0][1])  # classes 2, 3 first: the head has 4 outputs, 0 and 1 unseen
    logits = s.predict(*torch_in(test[0]))
    assert logits.shape[1] == 4 and float(logits[:, :2].max()) < float(logits[:, 2:].min()) - 1e3


# ---- RanPAC ----------------------------------------------------------------------------------------
def test_ranpac_is_the_ridge_solution_and_independent_of_task_order() -> None:
    train, test = stream(2)
    a, b = new("ranpac", params={"proj_dim": 256, "ridge": 10.0}), new("ranpac", params={"proj_dim": 256, "ridge": 10.0})
    for t in train:
        a.learn_task(t)
    for t in train[::-1]:
        b.learn_task(t)
    np.testing.assert_allclose(a.gram, b.gram, rtol=1e-10)
    np.testing.assert_allclose(a.cross, b.cross, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(a.w_out.numpy(), b.w_out.numpy(), rtol=1e-4, atol=1e-6)
    both = TaskData.concat(train)
    h = np.maximum(np_features(both) @ a.w_rand.double().numpy(), 0.0)
    w = np.linalg.solve(h.T @ h + 10.0 * np.eye(256), h.T @ np.eye(4)[both.labels])
    np.testing.assert_allclose(a.w_out.numpy(), w, rtol=1e-3, atol=1e-5 * np.abs(w).max())
    ref = np.maximum(np_features(test[0]) @ a.w_rand.double().numpy(), 0.0) @ w
    np.testing.assert_allclose(a.predict(*torch_in(test[0])).numpy(), ref, rtol=1e-3, atol=1e-4)


def test_ranpac_picks_lambda_on_a_held_out_split_and_separates_classes() -> None:
    s = new("ranpac", params={"proj_dim": 512})
    train, test = stream(2)
    for t in train:
        s.learn_task(t)
    assert len(s.ridges) == 2 and all(r in RIDGES for r in s.ridges)
    assert min(s.evaluate(t) for t in test) > 0.9


@pytest.mark.parametrize("n,m", [(40, 64), (200, 16)])  # dual (n < M) and primal paths
def test_ranpac_ridge_search_matches_brute_force(n: int, m: int) -> None:
    rng = np.random.default_rng(n)
    h = np.maximum(rng.normal(size=(n, m)), 0.0)
    y = np.eye(3)[rng.integers(0, 3, n)]
    order = np.random.default_rng(5).permutation(n)
    fit, val = order[: int(0.8 * n)], order[int(0.8 * n) :]
    losses = [np.mean((h[val] @ np.linalg.solve(h[fit].T @ h[fit] + lam * np.eye(m), h[fit].T @ y[fit]) - y[val]) ** 2)
              for lam in RIDGES]
    assert best_ridge(h, y, np.random.default_rng(5)) == RIDGES[int(np.argmin(losses))]
    assert max(losses) > 1.01 * min(losses)  # the choice matters on this data


# ---- DER++ -----------------------------------------------------------------------------------------
class RecordingDERpp(DERpp):
    """DER++ that records the gradient of every step (a real subclass, not a mock)."""

    grads: list[dict[str, torch.Tensor]]

    def before_step(self, batch: Batch, out: ModelOutput) -> None:
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


def first_batch(data: TaskData, n: int = 16) -> Batch:
    taps, present = torch_in(data.subset(np.arange(n)))
    return Batch(taps=taps, present=present, labels=torch.from_numpy(data.labels[:n]),
                 tasks=torch.full((n,), data.task), replay=torch.zeros(n, dtype=torch.bool))


def test_derpp_stores_insertion_logits_and_respects_the_size() -> None:
    s = new("derpp", buffer_size=30)
    train, _ = stream(2)
    s.learn_task(train[0])
    assert s.stored() == 30 and s.seen == 6 * len(train[0]) and len(s.store["labels"]) == 30
    # one step: the rows it stores carry the logits of that step's forward pass (before the update)
    s2 = new("derpp", buffer_size=1000)
    s2.model.add_classes(2)
    s2.optimizer = s2.make_optimizer()
    batch = first_batch(train[0])
    before = s2.model(batch.taps, batch.present).logits.detach()
    s2.observe(batch)
    after = s2.model(batch.taps, batch.present).logits.detach()
    np.testing.assert_allclose(s2.store["logits"][:16], before.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(s2.store["logits"][:16], after.numpy(), atol=1e-3)
    assert s2.store["ncols"][:16].tolist() == [2] * 16


def test_derpp_logit_term_changes_the_gradient_and_pulls_toward_stored_logits() -> None:
    train, _ = stream(2)
    s = new("derpp", buffer_size=50)
    s.learn_task(train[0])
    s.learn_task(train[1])
    assert s.history[1].losses["logit"] > 0 and s.history[1].losses["replay_ce"] > 0
    grads = []
    for alpha in (0.0, 1.0):
        r = RecordingDERpp(copy.deepcopy(s.model), s.config)
        r.load_extra_state(copy.deepcopy(s.extra_state()))
        r.p["alpha"], r.grads = alpha, []
        r.optimizer = r.make_optimizer()
        r.observe(first_batch(train[1]))
        grads.append(r.grads[0])
    assert not torch.allclose(grads[0]["head.weight"], grads[1]["head.weight"], atol=1e-6)
    # the logit term alone moves current logits toward the stored ones; extra columns are ignored
    batch, z, mask = s._draw(50)
    assert z.shape[1] == 4 and not bool(mask.all())  # task-1 rows were stored with 2 columns
    opt = torch.optim.SGD(s.model.parameters(), lr=0.05)
    s.model.train()
    first = None
    for _ in range(5):
        mse = s.logit_loss(s.model(batch.taps, batch.present).logits, z, mask)
        first = float(mse.detach()) if first is None else first
        opt.zero_grad()
        mse.backward()
        opt.step()
    with torch.no_grad():
        assert float(s.logit_loss(s.model(batch.taps, batch.present).logits, z, mask)) < 0.8 * first
    shifted = s.model(batch.taps, batch.present).logits.detach()
    assert float(s.logit_loss(shifted + 100.0 * ~mask, z, mask)) == pytest.approx(float(s.logit_loss(shifted, z, mask)))


# ---- ER-ACE ----------------------------------------------------------------------------------------
def test_er_ace_masks_absent_classes_for_incoming_rows_only() -> None:
    s = new("er-ace")
    logits = torch.randn(10, 6, requires_grad=True)
    labels = torch.tensor([2, 3, 2, 3, 3, 2, 0, 5, 1, 4])
    replay = torch.tensor([False] * 6 + [True] * 4)
    batch = Batch(taps={}, present=torch.ones(10, 3, dtype=torch.bool), labels=labels, tasks=torch.zeros(10),
                  replay=replay)
    terms = s.loss(batch, ModelOutput(logits=logits, z_joint=logits, z_mod=logits))
    (g_in,) = torch.autograd.grad(terms["ce"], logits, retain_graph=True)
    absent = [0, 1, 4, 5]
    assert torch.count_nonzero(g_in[:, absent]) == 0 and bool((g_in[:6, [2, 3]] != 0).all())
    assert torch.count_nonzero(g_in[6:]) == 0
    ref = F.cross_entropy(logits[:6, [2, 3]], labels[:6] - 2)
    assert float(terms["ce"]) == pytest.approx(float(ref), rel=1e-6)
    (g_re,) = torch.autograd.grad(terms["replay_ce"], logits)
    assert bool((g_re[6:] != 0).all()) and torch.count_nonzero(g_re[:6]) == 0
    assert float(terms["replay_ce"]) == pytest.approx(float(F.cross_entropy(logits[6:], labels[6:])), rel=1e-6)
    assert float(ace_incoming(logits[:6], labels[:6])) != pytest.approx(float(F.cross_entropy(logits[:6], labels[:6])))


def test_er_ace_fills_the_buffer_during_the_stream() -> None:
    s = new("er-ace", buffer_size=50)
    train, _ = stream(2)
    s.learn_task(train[0])
    assert len(s.buffer) == 50 and s.buffer.class_counts() == {0: 25, 1: 25}
    s.learn_task(train[1])
    assert set(s.buffer.class_counts()) == {0, 1, 2, 3} and s.history[1].losses["replay_ce"] > 0


# ---- all four: two tasks, accuracy, state round trip -------------------------------------------------
@pytest.mark.parametrize("name,floor", [("slda", 0.9), ("ranpac", 0.9), ("derpp", 0.6), ("er-ace", 0.6)])
def test_learns_two_tasks_and_state_round_trips(name: str, floor: float, tmp_path: Any) -> None:
    params = {"proj_dim": 512} if name == "ranpac" else {}
    s = new(name, params=params)
    train, test = stream(2)
    for t in train:
        s.learn_task(t)
    accs = [s.evaluate(t) for t in test]
    assert min(accs) > floor, accs
    fresh = new(name, params=params)
    fresh.model.add_classes(4)
    fresh.model.load_state_dict(s.model.state_dict())
    fresh.load_extra_state(copy.deepcopy(s.extra_state()))
    both = TaskData.concat(test)
    torch.testing.assert_close(fresh.predict(*torch_in(both)), s.predict(*torch_in(both)), rtol=1e-5, atol=1e-5)
    # through a real checkpoint (learner_state's tensor/JSON split) and back
    cfg = small_learner_config(2, name, **({"params": params} if params else {}))
    learner = Learner({m: list(d) for m, d in LEARNER_DIMS.items()}, cfg)
    learner.learn_task(learner_samples([0, 1], 40, 1))
    learner.learn_task(learner_samples([2, 3], 40, 2))
    loaded = Learner.load(learner.save(tmp_path / "ckpt"), cfg)
    x = learner_samples([0, 1, 2, 3], 16, 3)
    # RanPAC re-solves its ridge head in float32 on load: the same probabilities to ~1e-5, not bit for bit
    np.testing.assert_allclose(loaded.predict(x.taps).probs, learner.predict(x.taps).probs, rtol=0, atol=1e-4)
