"""Offline demo data for the demo, the benchmarks and the tests: prepare, verify, load, stream.

Prepared once by ``make data`` (``python -m demodata.prepare``),
loaded with hash verification by :func:`demodata.store.load`, and streamed as live
sensors by ``python -m demodata.publish``, whose scene can be driven live ("show
class c for S seconds": ``demodata.scene_control``).

Importing this package is cheap: the heavy sources (scikit-learn, sktime, the speech
synthesisers) are touched only by ``prepare``.
"""

from demodata.store import (
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
