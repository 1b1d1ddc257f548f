"""Batch feature extraction through the agent's own backbones, for its learning and evaluate jobs.

One backbone pass per modality per sample (dataset and recording
sources of a learning job, the evaluate job).

Why a class of its own: live capture, MCAP replay and dataset sources
must all produce taps through the *same* backends (the learner refuses taps from another
model, see ``fingerprints``), and the "absent modality" convention (zero taps, present =
False) must be applied in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import Backend, fingerprint, load_backend
from runtime.intake import MODALITIES, Sample

log = logging.getLogger(__name__)


@dataclass
class SampleTaps:
    """Taps of a batch of samples in the learner's layout."""

    taps: dict[str, list[np.ndarray]]  # modality -> per level (N, dim) float32
    present: np.ndarray  # (N, K) bool, K in MODALITIES order


class FeatureExtractor:
    """Loads the three backends once (building/caching the ONNX models if needed)."""

    def __init__(self, *, kind: str = "auto", model_dir: str | Path = "models", threads: int | None = None,
                 build: bool | str = True) -> None:
        """``build``: see ``export.backends.load_manifest`` ("missing": no torch in this process)."""
        self.backends: dict[str, Backend] = {}
        for m in MODALITIES:
            kw = {} if threads is None else {"threads": threads}
            self.backends[m] = load_backend(m, kind, model_dir, build=build, **kw)
            log.info("backbone %s: %s", m, self.backends[m])
        self.dims = {m: [s.dim for s in b.tap_specs] for m, b in self.backends.items()}

    def fingerprints(self) -> dict[str, object]:
        return {m: fingerprint(b.manifest) for m, b in self.backends.items()}

    def extract(self, samples: list[Sample]) -> SampleTaps:
        """Taps for a batch of samples; each modality runs once for the samples that have it."""
        n = len(samples)
        present = np.zeros((n, len(MODALITIES)), dtype=bool)
        taps: dict[str, list[np.ndarray]] = {}
        for k, m in enumerate(MODALITIES):
            idx = [i for i, s in enumerate(samples) if getattr(s, m) is not None]
            present[idx, k] = True
            levels = [np.zeros((n, d), dtype=np.float32) for d in self.dims[m]]
            if idx:
                batch = np.stack([getattr(samples[i], m) for i in idx])
                out = self.backends[m].extract(batch)
                for b, spec in enumerate(self.backends[m].tap_specs):
                    levels[b][idx] = out.values[spec.name]
            taps[m] = levels
        return SampleTaps(taps=taps, present=present)

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
