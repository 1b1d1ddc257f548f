"""Offline demo data: prepared once by ``make data`` (``python -m sensors.datasets.prepare``),
loaded with hash verification by :func:`sensors.datasets.store.load`, and streamed as live
sensors by ``python -m sensors.datasets.publish``, whose scene can be driven live ("show
class c for S seconds": ``sensors.datasets.scene_control``).

Importing this package is cheap: the heavy sources (scikit-learn, sktime, the speech
synthesisers) are touched only by ``prepare``.
"""

from sensors.datasets.store import (
    DATASETS,
    DatasetCorruptError,
    DatasetNotPreparedError,
    data_dir,
    load,
    manifest,
    speech_split,
)

__all__ = [
    "DATASETS",
    "DatasetCorruptError",
    "DatasetNotPreparedError",
    "data_dir",
    "load",
    "manifest",
    "speech_split",
]
