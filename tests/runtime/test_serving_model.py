"""ServingModel: ONNX Runtime on the exported predictor, torch-free, checkpoint entry round trip,
input validation naming what is wrong."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.serving_model import ServingModel
from training.config import ModelConfig, StrategyConfig
from training.learner import LabelledSamples, Learner, LearnerConfig
from training.onnx_export import export_predictor

DIMS = {"image": [6, 10], "audio": [5], "imu": [7, 9]}
NAMES = ["cup", "ball", "box"]
REPO = Path(__file__).resolve().parents[2]


def _taps(n: int, seed: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {m: [rng.normal(size=(n, d)).astype(np.float32) for d in ds] for m, ds in DIMS.items()}


@pytest.fixture(scope="module")
def trained() -> tuple[Learner, bytes]:
    rng = np.random.default_rng(0)
    centers = {m: [3.0 * rng.normal(size=(len(NAMES), d)).astype(np.float32) for d in ds] for m, ds in DIMS.items()}
    y = rng.choice(len(NAMES), 60)
    taps = {m: [centers[m][b][y] + 0.5 * rng.normal(size=(60, d)).astype(np.float32) for b, d in enumerate(ds)]
            for m, ds in DIMS.items()}
    learner = Learner(DIMS, LearnerConfig(
        strategy="ours", model=ModelConfig(d=8, proj_dim=8, n_experts=4, bottleneck=4),
        training=StrategyConfig(epochs=2, batch_size=16, replay_batch=16, buffer_size=64, max_seconds=0.0)))
    learner.learn_task(LabelledSamples(taps=taps, present=np.ones((60, 3), bool), names=[NAMES[i] for i in y]))
    return learner, export_predictor(learner)


@pytest.fixture(scope="module")
def model(trained) -> ServingModel:
    learner, onnx_bytes = trained
    return ServingModel(onnx_bytes, class_names=learner.class_names, tap_dims=learner.tap_dims)


def test_predicts_what_the_learner_predicts(trained, model: ServingModel) -> None:
    learner, _ = trained
    assert model.num_classes == 3 and model.class_names == learner.class_names
    assert model.providers == ["CPUExecutionProvider"]
    opts = model.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for n in (1, 5):
        taps, present = _taps(n, n), np.ones((n, 3), bool)
        present[0, 2] = False
        got = model.predict(taps, present)
        assert got.shape == (n, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, learner.predict(taps, present).probs, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


@settings(max_examples=25)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**16), bits=st.integers(0, 2**27 - 1))
def test_absent_modalities_are_masked(model: ServingModel, n: int, seed: int, bits: int) -> None:
    present = np.array([[(bits >> (3 * r + k)) & 1 for k in range(3)] for r in range(n)], bool)
    taps = _taps(n, seed)
    noisy = {m: [np.where(present[:, k, None], x, 1e3).astype(np.float32) for x in taps[m]]
             for k, m in enumerate(DIMS)}
    np.testing.assert_allclose(model.predict(noisy, present), model.predict(taps, present), rtol=0, atol=1e-5)


def test_missing_modality_is_zeros_when_marked_absent(model: ServingModel) -> None:
    taps, present = _taps(4, 3), np.array([[1, 0, 1]] * 4, bool)
    no_audio = {m: v for m, v in taps.items() if m != "audio"}
    np.testing.assert_allclose(model.predict(no_audio, present), model.predict(taps, present), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"'audio' but present marks it present in 4 of 4"):
        model.predict(no_audio, np.ones((4, 3), bool))
    assert model.predict({**taps, "lidar": [np.zeros((4, 2))]}, present).shape == (4, 3)  # unknown: ignored
    assert model.predict(_taps(0, 0), np.zeros((0, 3), bool)).shape == (0, 3)


def test_bad_shapes_name_modality_level_and_shapes(model: ServingModel) -> None:
    taps, present = _taps(4, 5), np.ones((4, 3), bool)
    bad_dim = {**taps, "imu": [taps["imu"][0], np.zeros((4, 8), np.float32)]}
    with pytest.raises(ValueError, match=r"taps\['imu'\]\[1\] has shape \(4, 8\), expected \(4, 9\)"):
        model.predict(bad_dim, present)
    with pytest.raises(ValueError, match=r"taps\['image'\]\[0\] has shape \(3, 6\), expected \(4, 6\)"):
        model.predict({**taps, "image": [x[:3] for x in taps["image"]]}, present)
    with pytest.raises(ValueError, match=r"taps\['image'\] has 1 levels, expected 2"):
        model.predict({**taps, "image": taps["image"][:1]}, present)
    with pytest.raises(ValueError, match=r"present must be \(B, 3\).*got shape \(4, 2\)"):
        model.predict(taps, present[:, :2])
    with pytest.raises(ValueError, match="present must be bool"):
        model.predict(taps, present.astype(np.float32))


def test_entry_round_trip_is_identical_and_plain(model: ServingModel) -> None:
    entry = model.to_entry()
    assert entry["onnx"].dtype == np.uint8 and entry["onnx"].tobytes() == model.onnx_bytes
    plain = {k: v for k, v in entry.items() if k != "onnx"}
    assert json.loads(json.dumps(plain)) == plain  # everything else is plain JSON
    buf = io.BytesIO()
    np.save(buf, entry["onnx"], allow_pickle=False)  # as the checkpoint store writes arrays
    buf.seek(0)
    stored = {**json.loads(json.dumps(plain)), "onnx": np.load(buf, allow_pickle=False), "openset": {"tau": 0.3}}
    back = ServingModel.from_entry(stored)
    assert back.class_names == model.class_names and back.tap_dims == model.tap_dims
    taps, present = _taps(6, 9), np.ones((6, 3), bool)
    np.testing.assert_allclose(back.predict(taps, present), model.predict(taps, present), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="format"):
        ServingModel.from_entry({**entry, "format": 99})
    with pytest.raises(ValueError, match=r"lacks \['tap_dims'\]"):
        ServingModel.from_entry({k: v for k, v in entry.items() if k != "tap_dims"})


def test_construction_checks_names_dims_and_options(model: ServingModel) -> None:
    b = model.onnx_bytes
    with pytest.raises(ValueError, match="predicts 3 classes but 2 class names"):
        ServingModel(b, class_names=NAMES[:2], tap_dims=DIMS)
    with pytest.raises(ValueError, match="graph inputs"):
        ServingModel(b, class_names=NAMES, tap_dims={"image": [6, 10], "imu": [7, 9]})
    with pytest.raises(ValueError, match=r"'imu_1' has dim 9, tap_dims\['imu'\]\[1\] is 8"):
        ServingModel(b, class_names=NAMES, tap_dims={**DIMS, "imu": [7, 8]})
    with pytest.raises(ValueError, match="cannot load"):
        ServingModel(b"not onnx", class_names=NAMES, tap_dims=DIMS)
    with pytest.raises(ValueError, match="threads"):
        ServingModel(b, class_names=NAMES, tap_dims=DIMS, threads=0)
    assert ServingModel(b, class_names=NAMES, tap_dims=DIMS, threads=2).session.get_session_options(
        ).intra_op_num_threads == 2


def test_import_does_not_import_torch() -> None:
    code = ("import sys, runtime.serving_model; bad = [m for m in ('torch', 'onnx') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime has the CUDA EP here")
def test_cuda_requested_without_cuda_ep_is_a_clear_error(model: ServingModel) -> None:
    with pytest.raises(ValueError, match="no CUDAExecutionProvider"):
        ServingModel(model.onnx_bytes, class_names=NAMES, tap_dims=DIMS, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EP, reason="onnxruntime has no CUDAExecutionProvider (CPU-only onnxruntime)")
def test_cuda_ep_matches_cpu(model: ServingModel) -> None:
    gpu = ServingModel(model.onnx_bytes, class_names=NAMES, tap_dims=DIMS, device="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    taps, present = _taps(5, 2), np.ones((5, 3), bool)
    np.testing.assert_allclose(gpu.predict(taps, present), model.predict(taps, present), rtol=0, atol=1e-4)
