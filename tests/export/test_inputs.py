"""Bad input gets one clear, typed error that names the expected spec, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from export import InputSpecError, load_backend

KINDS = ["onnxruntime", "torch"]


@pytest.fixture(scope="module", params=KINDS)
def backends(request, models_dir):
    bs = {m: load_backend(m, request.param, models_dir) for m in ("image", "audio", "imu")}
    yield bs
    for b in bs.values():
        b.close()


BAD = [
    ("image", lambda x: x[0], "dims"),  # missing batch dim
    ("image", lambda x: x[..., :1].copy(), "channels is 1, not 3"),
    ("image", lambda x: x.astype(np.float32), "dtype float32"),
    ("image", lambda x: x[:0], "empty batch"),
    ("image", lambda x: x[:, :8, :8].copy(), "smaller than 16"),
    ("audio", lambda x: x[:, :8000].copy(), "samples is 8000, not 16000"),
    ("audio", lambda x: x.astype(np.int32), "dtype int32"),
    ("audio", lambda x: x.astype(np.float32), "outside [-1.0, 1.0]"),
    ("audio", lambda x: x[:0], "empty batch"),
    ("imu", lambda x: x[:, :3].copy(), "channels is 3, not 6"),
    ("imu", lambda x: x[:, :, :50].copy(), "time is 50, not 100"),
    ("imu", lambda x: x.astype(np.int16), "dtype int16"),
    ("imu", lambda x: np.where(np.arange(100) == 3, np.nan, x).astype(np.float32), "NaN"),
    ("imu", lambda x: x.tolist(), "not a numpy array"),
]


@pytest.mark.parametrize(("modality", "mutate", "needle"), BAD)
def test_bad_input_raises_typed_error_naming_spec(backends, real_inputs, modality, mutate, needle):
    b = backends[modality]
    with pytest.raises(InputSpecError) as e:
        b.extract(mutate(real_inputs[modality]))
    msg = str(e.value)
    assert needle in msg and "expected" in msg and b.input_spec.describe() in msg
    assert isinstance(e.value, ValueError) and e.value.modality == modality


def test_wrong_sample_rate(backends, real_audio, real_imu):
    with pytest.raises(InputSpecError, match="sample rate 44100 Hz.*16000 Hz"):
        backends["audio"].extract(real_audio, sample_rate=44100)
    with pytest.raises(InputSpecError, match="not an audio input"):
        backends["imu"].extract(real_imu, sample_rate=16000)
