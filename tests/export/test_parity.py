"""Every available backend against the torch CPU reference, on real inputs.

Criteria per tap and per sample: cosine >= 0.999, and max abs error <= ATOL + RTOL * max|ref|.
fp32 graphs: ATOL 1e-4, RTOL 1e-4 (measured ~2e-5 / 5e-5 abs); IMU PPV features may flip one
time step at a threshold: ATOL 2/100. TensorRT FP16: RTOL 2e-2.
"""

from __future__ import annotations

import numpy as np
import pytest

from export import load_backend
from export.backends import available_kinds

TOL = {"image": (1e-4, 1e-4), "audio": (1e-4, 1e-4), "imu": (0.02, 0.0)}
FP16_RTOL = 2e-2


def _cases():
    kinds = available_kinds()
    cases = [("onnxruntime", {"device": "cpu"}, None)]
    import onnxruntime as ort
    import torch

    cases.append(("onnxruntime", {"device": "cuda"},
                  None if "CUDAExecutionProvider" in ort.get_available_providers() else "onnxruntime has no CUDA EP"))
    cases.append(("torch", {"device": "cuda"}, None if torch.cuda.is_available() else "no CUDA for torch"))
    ok, why = kinds["tensorrt"]
    cases.append(("tensorrt", {"wait": True}, None if ok else why))
    return [pytest.param(k, kw, marks=pytest.mark.skip(reason=r) if r else (), id=f"{k}-{kw.get('device', 'gpu')}")
            for k, kw, r in cases]


def assert_taps_close(got, ref, modality, rtol_extra=0.0):
    atol, rtol = TOL[modality]
    rtol = max(rtol, rtol_extra)
    assert list(got.values) == list(ref.values)
    for name, r in ref.values.items():
        g = got.values[name]
        assert g.shape == r.shape and g.dtype == np.float32
        err = np.abs(g - r).max()
        assert err <= atol + rtol * np.abs(r).max(), f"{modality}/{name}: max abs {err:.3g}"
        cos = (g * r).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1) + 1e-12)
        assert cos.min() >= 0.999, f"{modality}/{name}: cosine {cos.min():.5f}"


@pytest.fixture(scope="module")
def references(models_dir, real_inputs):
    out = {}
    for m, x in real_inputs.items():
        with load_backend(m, "torch", models_dir, device="cpu") as ref:
            out[m] = ref.extract(x)
    return out


@pytest.mark.parametrize(("kind", "kw"), _cases())
@pytest.mark.parametrize("modality", ["image", "audio", "imu"])
def test_backend_matches_torch_reference(modality, kind, kw, models_dir, real_inputs, references):  # noqa: PLR0917
    with load_backend(modality, kind, models_dir, **kw) as backend:
        assert backend.kind == kind and backend.tap_specs[0].name in references[modality].values
        got = backend.extract(real_inputs[modality])
    assert_taps_close(got, references[modality], modality, FP16_RTOL if kind == "tensorrt" else 0.0)


@pytest.mark.parametrize("modality", ["image", "audio", "imu"])
def test_dynamic_batch_and_batch_independence(modality, models_dir, real_inputs, references):
    x = real_inputs[modality]
    with load_backend(modality, "onnxruntime", models_dir) as b:
        single = [b.extract(x[i:i + 1]) for i in range(len(x))]
    for i, t in enumerate(single):
        for name, v in t.values.items():
            assert v.shape[0] == 1
            np.testing.assert_allclose(v[0], references[modality].values[name][i], atol=TOL[modality][0] + 1e-4, rtol=1e-3)


def test_image_any_size_is_resized_in_graph(models_dir, real_images):
    wide = np.ascontiguousarray(np.repeat(real_images[:2], 2, axis=2))  # (2, 64, 128, 3)
    with load_backend("image", "onnxruntime", models_dir) as b, load_backend("image", "torch", models_dir) as t:
        assert_taps_close(b.extract(wide), t.extract(wide), "image")


def test_float_and_int16_audio_agree(models_dir, real_audio):
    with load_backend("audio", "onnxruntime", models_dir) as b:
        a = b.extract(real_audio)
        f = b.extract(real_audio.astype(np.float32) / 32768.0, sample_rate=16000)
    assert_taps_close(f, a, "audio")
