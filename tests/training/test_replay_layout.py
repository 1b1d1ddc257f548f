"""The <= 2 KB replay layout: tap pooling fitted to a byte bound, applied in the model and the buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import small_learner_config
from training.buffer import fit_pool, stored_sample_bytes
from training.config import LearnerConfig, ModelConfig
from training.errors import ReplayBufferError
from training.learner import Learner
from training.model import SideNetwork

REAL = {"image": [40, 112, 192, 1280], "audio": [48, 72, 96, 96], "imu": [168, 168, 168, 168]}  # models/*.manifest


def test_fit_pool_halves_the_widest_tap_until_the_sample_fits() -> None:
    assert stored_sample_bytes(REAL, "int8") > 2048
    pool = fit_pool(REAL, "int8", 2048)
    assert pool == {"image": [1, 1, 1, 2]}  # the 1280-d image head tap -> 640
    dims = ModelConfig(tap_dims=REAL, tap_pool=pool).pooled_dims()
    assert dims["image"] == [40, 112, 192, 640] and stored_sample_bytes(dims, "int8") <= 2048
    assert fit_pool(REAL, "float16", 10**6) == {}
    with pytest.raises(ReplayBufferError, match="no tap pooling fits"):
        fit_pool({"a": [3]}, "int8", 8)


def test_model_pools_live_taps_and_accepts_pooled_ones() -> None:
    torch.manual_seed(0)
    dims = {"image": [8, 16], "imu": [6]}
    net = SideNetwork(ModelConfig(tap_dims=dims, tap_pool={"image": [1, 4]}, num_classes=3, d=16, proj_dim=16,
                                  fusion_hidden=16)).eval()
    full = {"image": [torch.randn(5, 8), torch.randn(5, 16)], "imu": [torch.randn(5, 6)]}
    pooled = net.pool_taps(full)
    assert pooled["image"][1].shape == (5, 4)
    torch.testing.assert_close(pooled["image"][1][:, 0], full["image"][1][:, :4].mean(1))
    present = torch.ones(5, 2, dtype=torch.bool)
    torch.testing.assert_close(net(full, present).logits, net(pooled, present).logits)
    with pytest.raises(ValueError, match="tap_pool"):
        ModelConfig(tap_dims=dims, tap_pool={"image": [1, 3]})  # 3 does not divide 16


def test_learner_with_the_2kb_layout_stores_pooled_int8_samples() -> None:
    from training.learner import LabelledSamples

    base = small_learner_config(2, buffer_dtype="int8")
    cfg = LearnerConfig(strategy=base.strategy, model=base.model, training=base.training, replay_sample_bytes=2048)
    learner = Learner(REAL, cfg)
    assert learner.model.config.tap_pool == {"image": [1, 1, 1, 2]}
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 12)
    taps = {m: [(rng.normal(size=(2, d))[y] + 0.3 * rng.normal(size=(len(y), d))).astype(np.float32) for d in ds]
            for m, ds in REAL.items()}
    learner.learn_task(LabelledSamples(taps=taps, present=np.ones((len(y), 3), bool),
                                       names=[["cup", "box"][i] for i in y]))
    assert learner.evaluate(LabelledSamples(taps=taps, present=np.ones((len(y), 3), bool),
                                            names=[["cup", "box"][i] for i in y])) > 0.9
    buf = learner.buffer
    assert len(buf) > 0 and buf.schema["image"][-1] == 640
    assert buf.sample_bytes() <= 2048 and buf.nbytes <= 2048 * buf.capacity


def test_onnx_export_of_a_pooled_learner_matches_torch() -> None:
    """The serving export takes the backbones' full taps and pools them inside the graph."""
    from training.learner import LabelledSamples
    from training.onnx_export import export_predictor, predictor_parity

    dims = {"image": [6, 16], "imu": [5]}
    base = small_learner_config(2, buffer_dtype="int8")
    model = ModelConfig(d=8, proj_dim=8, n_experts=4, bottleneck=4, tap_pool={"image": [1, 4]})
    learner = Learner(dims, LearnerConfig(strategy="ours", model=model, training=base.training))
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 16)
    taps = {m: [(3 * rng.normal(size=(2, d))[y] + rng.normal(size=(len(y), d))).astype(np.float32) for d in ds]
            for m, ds in dims.items()}
    present = np.ones((len(y), 2), bool)
    present[::3, 1] = False
    learner.learn_task(LabelledSamples(taps=taps, present=present, names=[["cup", "box"][i] for i in y]))
    assert learner.buffer.schema["image"] == [6, 4]
    assert predictor_parity(learner, export_predictor(learner), taps, present) < 1e-4
