"""Shared fixtures for export tests: the exported models (built once, cached by content hash)
and *real* inputs for every modality (never random noise for parity)."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SPEECH_WORDS = ["trouser", "sneaker", "ankle boot", "pullover"]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    from export import build

    out = REPO / "models"
    build(None, out)  # cheap when the cache is valid
    return out


def _store(name: str) -> dict | None:
    try:
        from demodata.store import load
    except ImportError:
        return None
    try:
        return load(name)
    except Exception:  # not prepared yet (DatasetNotPreparedError) or unreadable: use the fallback
        return None


@pytest.fixture(scope="session")
def real_images() -> np.ndarray:
    """(8, H, W, 3) uint8 RGB: Fashion-MNIST test images, else scikit-learn digits, upscaled x8."""
    d = _store("fashion_mnist")
    if d is not None:
        imgs = d["x_test"][:8]
    else:
        from sklearn.datasets import load_digits

        imgs = (load_digits().images[:8] * (255 / 16)).astype(np.uint8)
    big = np.kron(imgs, np.ones((8, 8), dtype=np.uint8))  # nearest upscale to 224 / 64 px
    return np.repeat(big[..., None], 3, axis=-1).copy()


def _synth(word: str, tmp: Path) -> np.ndarray:
    wav = tmp / "w.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), word], check=True, capture_output=True)
    elif shutil.which("flite"):
        subprocess.run(["flite", "-t", word, "-o", str(wav)], check=True, capture_output=True)
    else:
        pytest.skip("no speech data prepared and neither espeak-ng nor flite installed")
    with wave.open(str(wav)) as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    if rate != 16000:  # espeak-ng speaks at 22.05 kHz: resample with torchaudio
        import torch
        import torchaudio

        pcm = torchaudio.functional.resample(torch.from_numpy(pcm.astype(np.float32)), rate, 16000).numpy()
        pcm = np.clip(pcm, -32768, 32767).astype(np.int16)
    out = np.zeros(16000, dtype=np.int16)
    n = min(len(pcm), 16000)
    out[(16000 - n) // 2:(16000 - n) // 2 + n] = pcm[:n]
    return out


@pytest.fixture(scope="session")
def real_audio(tmp_path_factory) -> np.ndarray:
    """(4, 16000) int16: spoken words (prepared speech set, else espeak-ng/flite synthesis)."""
    d = _store("speech")
    if d is not None:
        return np.ascontiguousarray(d["audio"][:4])
    tmp = tmp_path_factory.mktemp("speech")
    return np.stack([_synth(w, tmp) for w in SPEECH_WORDS])


@pytest.fixture(scope="session")
def real_imu() -> np.ndarray:
    """(8, 6, 100) float32: BasicMotions accelerometer + gyroscope windows (2 per class)."""
    d = _store("basic_motions")
    if d is not None:
        return np.ascontiguousarray(d["x_test"][::5][:8].astype(np.float32))
    sktime = pytest.importorskip("sktime.datasets")
    x, _ = sktime.load_basic_motions(split="test", return_type="numpy3D")
    return np.ascontiguousarray(x[::5][:8].astype(np.float32))


@pytest.fixture(scope="session")
def real_inputs(real_images, real_audio, real_imu) -> dict[str, np.ndarray]:
    return {"image": real_images, "audio": real_audio, "imu": real_imu}
