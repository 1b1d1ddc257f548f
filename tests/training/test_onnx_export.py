"""ONNX export of the learner's prediction: ORT probs equal ``Learner.predict`` probs for every
registered strategy, on batches of 1 and 7 with absent modalities; the learner is untouched.
A template traced before the task is filled with the trained weights and gives the same probs as
a fresh trace; a template that does not fit is left for a fresh trace."""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training import registry
from training.config import ModelConfig, StrategyConfig
from training.learner import LabelledSamples, Learner, LearnerConfig
from training.onnx_export import (
    OUTPUT_NAME,
    PRESENT_NAME,
    export,
    export_predictor,
    input_names,
    predictor_parity,
    predictor_template,
)
from training.strategies.naive import Naive

DIMS = {"image": [6, 10], "audio": [5], "imu": [7, 9]}
NAMES = ["cup", "ball", "box", "pen"]
TOL = 1e-4
_rng = np.random.default_rng(7)
CENTERS = {m: [2.0 * _rng.normal(size=(len(NAMES), d)).astype(np.float32) for d in ds] for m, ds in DIMS.items()}


def samples(classes: list[int], n: int, seed: int) -> LabelledSamples:
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n)
    taps = {m: [CENTERS[m][b][y] + 0.5 * rng.normal(size=(n, d)).astype(np.float32) for b, d in enumerate(ds)]
            for m, ds in DIMS.items()}
    return LabelledSamples(taps=taps, present=np.ones((n, len(DIMS)), bool), names=[NAMES[i] for i in y])


def config(strategy: str, **training: object) -> LearnerConfig:
    base = dict(epochs=2, batch_size=16, replay_batch=16, buffer_size=64, max_seconds=0.0, threads=1)
    return LearnerConfig(strategy=strategy, model=ModelConfig(d=8, proj_dim=8, n_experts=4, top_k=2, bottleneck=4),
                         training=StrategyConfig(**{**base, **training}))


def two_tasks(strategy: str, **kw: object) -> Learner:
    learner = Learner(DIMS, config(strategy, **kw))
    learner.learn_task(samples([0, 1], 48, 1))
    learner.learn_task(samples([2, 3], 48, 2))
    return learner


def batch(n: int, seed: int, present: np.ndarray | None = None) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    """Test taps of every class; absent modalities hold large noise (the graph must mask it)."""
    s = samples([0, 1, 2, 3], n, seed)
    if present is None:
        present = np.ones((n, len(DIMS)), bool)
        if n > 1:
            present[1, 0] = False  # no image
            present[-1, 1:] = False  # image only
    rng = np.random.default_rng(seed + 1)
    taps = {m: [np.where(present[:, k, None], x, 50.0 * rng.normal(size=x.shape).astype(np.float32))
                for x in s.taps[m]] for k, m in enumerate(DIMS)}
    return taps, present


def ort_probs(onnx_bytes: bytes, taps: dict[str, list[np.ndarray]], present: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = {f"{m}_{b}": x for m, lv in taps.items() for b, x in enumerate(lv)}
    return sess.run([OUTPUT_NAME], {**feeds, PRESENT_NAME: present})[0]


_CACHE: dict[str, tuple[Learner, bytes]] = {}


def exported(strategy: str) -> tuple[Learner, bytes]:
    if strategy not in _CACHE:
        learner = two_tasks(strategy)
        _CACHE[strategy] = learner, export_predictor(learner)
    return _CACHE[strategy]


@pytest.mark.parametrize("strategy", registry.names())
def test_ort_probs_match_learner_predict(strategy: str) -> None:
    learner, onnx_bytes = exported(strategy)
    assert learner.model.num_classes == 4
    for n, seed in ((1, 10), (7, 11)):
        taps, present = batch(n, seed)
        ref = learner.predict(taps, present).probs
        got = ort_probs(onnx_bytes, taps, present)
        assert got.shape == ref.shape == (n, 4) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
        assert predictor_parity(learner, onnx_bytes, taps, present) == pytest.approx(
            float(np.abs(got - ref).max()), abs=1e-6)
    taps, present = batch(7, 12)
    assert not np.allclose(ort_probs(onnx_bytes, taps, present)[0], ort_probs(onnx_bytes, taps, present)[1])


def test_graph_names_and_dynamic_batch() -> None:
    _, onnx_bytes = exported("ours")
    graph = onnx.load_model_from_string(onnx_bytes).graph
    assert [i.name for i in graph.input] == input_names(DIMS) == [
        "image_0", "image_1", "audio_0", "imu_0", "imu_1", "present"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["image_1"] == ["batch", 10] and dims["present"] == ["batch", 3]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 4]
    assert graph.input[-1].type.tensor_type.elem_type == onnx.TensorProto.BOOL


@settings(max_examples=20)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**16), bits=st.integers(0, 2**36 - 1))
def test_ours_parity_on_any_presence_pattern(n: int, seed: int, bits: int) -> None:
    learner, onnx_bytes = exported("ours")
    present = np.array([[(bits >> (3 * r + k)) & 1 for k in range(3)] for r in range(n)], bool)
    taps, present = batch(n, seed, present)
    assert predictor_parity(learner, onnx_bytes, taps, present) < TOL


def test_untrained_learner_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="0 classes"):
        export_predictor(Learner(DIMS, config("ours")))


def test_export_leaves_the_learner_unchanged() -> None:
    learner = two_tasks("ours")
    taps, present = batch(7, 20)
    before_probs = learner.predict(taps, present).probs
    before_state = copy.deepcopy(learner.state_dict())
    strategy, buffer_len = learner.strategy, len(learner.buffer)
    export_predictor(learner)
    assert learner.strategy is strategy and len(learner.buffer) == buffer_len and not learner.model.training
    np.testing.assert_allclose(learner.predict(taps, present).probs, before_probs, rtol=0, atol=1e-6)
    after = learner.state_dict()
    assert after["class_names"] == before_state["class_names"]
    for k, v in before_state["model"].items():
        assert torch.equal(after["model"][k], v), k
    assert torch.equal(after["strategy"]["class_means"], before_state["strategy"]["class_means"])


class Branchy(Naive):
    """predict branches on a tensor value: the trace would keep one branch for every batch."""

    name: ClassVar[str] = "branchy"

    @torch.no_grad()
    def predict(self, taps, present):
        logits = super().predict(taps, present)
        return logits if bool(present.all()) else -logits


def test_a_frozen_data_dependent_branch_is_refused() -> None:
    learner = two_tasks("naive")
    learner.strategy = Branchy(learner.model, learner.strategy.config)
    with pytest.raises(ValueError, match="data-dependent branch"):
        export_predictor(learner)


def test_parity_needs_every_modality() -> None:
    learner, onnx_bytes = exported("naive")
    taps, present = batch(3, 30)
    with pytest.raises(ValueError, match="audio"):
        predictor_parity(learner, onnx_bytes, {m: v for m, v in taps.items() if m != "audio"}, present)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for torch")
def test_export_from_a_cuda_learner() -> None:
    learner = two_tasks("ours", device="cuda")
    onnx_bytes = export_predictor(learner)
    assert learner.model.head.weight.is_cuda and learner.strategy.class_means.is_cuda
    taps, present = batch(7, 40)
    t = {m: [torch.from_numpy(x).cuda() for x in lv] for m, lv in taps.items()}
    ref = torch.softmax(learner.strategy.predict(t, torch.from_numpy(present).cuda()), dim=1).cpu().numpy()
    np.testing.assert_allclose(ort_probs(onnx_bytes, taps, present), ref, rtol=0, atol=TOL)
    assert predictor_parity(learner, onnx_bytes, taps, present) < TOL


def _one_then_template(strategy: str, labels: list[str]) -> tuple[Learner, object]:
    learner = Learner(DIMS, config(strategy))
    learner.learn_task(samples([0, 1], 48, 1))
    return learner, predictor_template(learner, labels)


@pytest.mark.parametrize("strategy", registry.names())
def test_a_filled_template_equals_a_fresh_trace(strategy: str) -> None:
    learner, template = _one_then_template(strategy, ["box", "pen"])
    assert template.n_classes == 4
    learner.learn_task(samples([2, 3], 48, 2))
    filled, traced = export(learner, template), export(learner)
    assert (filled.how, traced.how) == ("template", "traced")
    for n, seed in ((1, 50), (7, 51)):
        taps, present = batch(n, seed)
        ref = learner.predict(taps, present).probs
        np.testing.assert_allclose(ort_probs(filled.onnx, taps, present), ref, rtol=0, atol=TOL)
        np.testing.assert_allclose(ort_probs(filled.onnx, taps, present), ort_probs(traced.onnx, taps, present),
                                   rtol=0, atol=TOL)


def test_a_template_that_does_not_fit_is_traced_afresh() -> None:
    learner, template = _one_then_template("ours", ["box"])  # one new class planned, two learned
    learner.learn_task(samples([2, 3], 48, 2))
    out = export(learner, template)
    assert out.how == "traced"
    taps, present = batch(7, 60)
    np.testing.assert_allclose(ort_probs(out.onnx, taps, present), learner.predict(taps, present).probs,
                               rtol=0, atol=TOL)


def test_a_template_leaves_the_learner_unchanged() -> None:
    learner = Learner(DIMS, config("ours"))
    learner.learn_task(samples([0, 1], 48, 1))
    before, n_buffer = copy.deepcopy(learner.state_dict()), len(learner.buffer)
    predictor_template(learner, ["box", "pen"])
    after = learner.state_dict()
    assert after["class_names"] == before["class_names"] == ["cup", "ball"] and len(learner.buffer) == n_buffer
    assert learner.strategy.tasks_learned == 1 and learner.model.num_classes == 2
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v), k
