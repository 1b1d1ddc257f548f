"""Backbones: common interface, tap shapes, and the torch rebuilds against the shipped ONNX files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.backbones import create, modalities
from export.backbones.audio import BLOCK_SAMPLES, USED_SAMPLES, WINDOW, WINDOW_ENDS, openwakeword_models_dir

# measured: 2.3e-5 max abs on openwakeword's x/10+2 scale (values 0.4..11.6) for spoken words
MEL_TOLERANCE = 1e-3


@pytest.mark.parametrize("modality", ["image", "audio", "imu"])
def test_common_interface_and_tap_shapes(modality, real_inputs):
    from export.inputs import prepare_batch

    b = create(modality)
    assert b.modality == modality and b.name and len(b.tap_specs) == 4
    x = prepare_batch(modality, b.input_spec, real_inputs[modality][:2])
    with torch.inference_mode():
        taps = b(torch.from_numpy(x))
    assert [tuple(t.shape) for t in taps] == [(2, s.dim) for s in b.tap_specs]
    assert all(torch.isfinite(t).all() for t in taps)
    assert not any(p.requires_grad for p in b.parameters())
    assert modality in modalities()


def test_image_taps_deepen():
    b = create("image")
    assert [s.dim for s in b.tap_specs] == [40, 112, 192, 1280]
    assert list(b.tap_after.values()) == sorted(b.tap_after.values())


def test_mel_front_end_matches_shipped_model(real_audio):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(openwakeword_models_dir() / "melspectrogram.onnx"))
    b = create("audio")
    worst = 0.0
    for pcm in real_audio.astype(np.float32):
        with torch.inference_mode():
            ours = b.frames(torch.from_numpy(pcm[None])).numpy()[0]
        tail = pcm[-USED_SAMPLES:]
        # shipped model, run per 80 ms block as openwakeword streams it, scaled x/10 + 2
        ref = np.concatenate([sess.run(None, {"input": tail[None, 1280 * k:1280 * k + BLOCK_SAMPLES]})[0].squeeze() / 10 + 2
                              for k in range(12)])
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= MEL_TOLERANCE, worst


def test_embedding_net_matches_shipped_model(real_audio):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(openwakeword_models_dir() / "embedding_model.onnx"))
    b = create("audio")
    with torch.inference_mode():
        mel = b.frames(torch.from_numpy(real_audio.astype(np.float32)))
        win = torch.stack([mel[:, e - WINDOW:e] for e in WINDOW_ENDS], 1).reshape(-1, WINDOW, 32)
        ours = b.embed(win)[-1].numpy()
    ref = sess.run(None, {"input_1": win.numpy()[..., None]})[0].reshape(ours.shape)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5


def test_imu_transform_is_deterministic_and_documented(real_imu):
    a, b = create("imu"), create("imu")
    assert a.weights_hash() == b.weights_hash()
    assert a.preprocessing()["seed"] == 20240611
    with torch.inference_mode():
        ta = a(torch.from_numpy(real_imu))
    assert all(((t >= 0) & (t <= 1)).all() for t in ta)  # PPV features are proportions
    assert len({round(float(t.std()), 4) for t in ta}) > 1  # different dilations see different things
