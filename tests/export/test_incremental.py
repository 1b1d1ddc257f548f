"""The incremental audio extractor equals batch extraction on the matching second of audio."""

from __future__ import annotations

import numpy as np
import pytest

from export import InputSpecError, load_backend
from export.incremental import IncrementalAudioExtractor

CHUNK = 320  # 20 ms, the mic topic's chunk size


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_stream_matches_batch_at_block_boundaries(models_dir, real_audio, kind):
    stream = real_audio[:3].reshape(-1)  # 3 s of real speech
    inc = IncrementalAudioExtractor(models_dir, kind)
    batch = load_backend("audio", "onnxruntime", models_dir)
    checked, last = 0, -1
    for start in range(0, len(stream), CHUNK):
        inc.push(stream[start:start + CHUNK])
        b = inc.stats()["blocks"] - 1  # taps describe the second ending at block b's last sample
        taps = inc.taps()
        if taps is None or b == last or b % 3:
            continue
        last, end = b, 1280 * b + 1632
        ref = batch.extract(stream[None, end - 16000:end])
        for name, v in ref.values.items():
            np.testing.assert_allclose(taps.values[name], v, atol=1e-4, rtol=1e-4)
        checked += 1
    assert checked >= 5


def test_needs_a_full_second_and_rejects_bad_chunks(models_dir, real_audio):
    inc = IncrementalAudioExtractor(models_dir)
    inc.push(real_audio[0, :8000])
    assert inc.taps() is None
    inc.push(real_audio[0, 8000:])
    assert inc.taps() is not None and inc.taps().values["embedding"].shape == (1, 96)
    with pytest.raises(InputSpecError):
        inc.push(real_audio[:1])  # 2-D
    with pytest.raises(InputSpecError):
        inc.push(real_audio[0].astype(np.float64))
