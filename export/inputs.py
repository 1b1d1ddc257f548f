"""Host-side input checks: one clear, typed error naming the expected spec, before any graph runs.

Driven by the manifest's input spec (so ONNX Runtime and TensorRT backends need no torch model).
"""

from __future__ import annotations

import numpy as np

from export.errors import InputSpecError
from export.taps import InputSpec


def prepare_batch(modality: str, spec: InputSpec, batch: object, *, sample_rate: int | None = None) -> np.ndarray:
    """Validate ``batch`` against ``spec`` and convert it to the graph dtype (C-contiguous)."""
    expected = spec.describe()
    if not isinstance(batch, np.ndarray):
        raise InputSpecError(modality, f"got {type(batch).__name__}, not a numpy array", expected)
    names = spec.extra.get("dim_names", [f"dim{i}" for i in range(len(spec.shape))])
    if batch.ndim != len(spec.shape):
        raise InputSpecError(modality, f"shape {batch.shape} has {batch.ndim} dims, not {len(spec.shape)}", expected)
    if batch.shape[0] == 0:
        raise InputSpecError(modality, "empty batch (batch size 0)", expected)
    for i, (want, have) in enumerate(zip(spec.shape, batch.shape, strict=True)):
        if want is not None and want != have:
            raise InputSpecError(modality, f"shape {batch.shape}: {names[i]} is {have}, not {want}", expected)
    min_hw = spec.extra.get("min_hw")
    if min_hw and min(batch.shape[1:3]) < min_hw:
        raise InputSpecError(modality, f"image {batch.shape[1]}x{batch.shape[2]} smaller than {min_hw} px", expected)
    if batch.dtype.name not in spec.host_dtypes:
        raise InputSpecError(modality, f"dtype {batch.dtype.name}", expected)
    want_rate = spec.extra.get("sample_rate")
    if sample_rate is not None and sample_rate != want_rate:
        what = f"{want_rate} Hz" if want_rate else "no sample rate (not an audio input)"
        raise InputSpecError(modality, f"sample rate {sample_rate} Hz", f"{what}; {expected}")
    if batch.dtype.kind == "f":
        if not np.isfinite(batch).all():
            raise InputSpecError(modality, "NaN or inf values", expected)
        limit = spec.extra.get("float_abs_max")
        if limit is not None and batch.dtype.name == "float32" and np.abs(batch).max() > limit * 1.0001:
            raise InputSpecError(modality, f"float PCM peak {np.abs(batch).max():.3g} outside [-{limit}, {limit}] "
                                 "(int16-range floats? pass int16)", expected)
    scale = spec.extra.get("host_scale", {}).get(batch.dtype.name, 1.0)
    out = batch.astype(spec.dtype, copy=False)
    if scale != 1.0:
        out = out * np.asarray(scale, dtype=spec.dtype)
    return np.ascontiguousarray(out)
