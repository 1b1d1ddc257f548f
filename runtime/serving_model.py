"""The learner's prediction in the serving process, computed by ONNX Runtime without torch.

ONNX Runtime runs the graph that
:func:`training.onnx_export.export_predictor` wrote after the last learned task. No torch here.

    model = ServingModel(onnx_bytes, class_names=names, tap_dims=learner.tap_dims)
    probs = model.predict(taps, present)                    # (B, C) float32, rows sum to 1
    state["serving"] = model.to_entry()                     # JSON values + one uint8 array
    model = ServingModel.from_entry(state["serving"], threads=1)

Why: importing this CUDA build of torch costs ~570 MB resident and the serving process has
500 MB; batch-1 predict is also ~10x faster (~1 ms against ~10 ms for torch eager on 1 thread).

Inputs follow ``Learner.predict``'s convention: ``taps`` maps each modality to its levels'
(B, dim) arrays, ``present`` is (B, K) bool with columns in ``tap_dims`` order; an absent
modality's taps are ignored by the graph (zeros by convention). A modality missing from ``taps``
is filled with zeros when its ``present`` column is all False, and is an error otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from training.onnx_export import OUTPUT_NAME, feeds, input_names  # names only: no torch import

log = logging.getLogger(__name__)
FORMAT = 1


def _session(onnx_bytes: bytes, *, threads: int, device: str) -> Any:
    """Options as ``export.backends.onnxruntime.make_session``, on bytes instead of a file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # the backbones' sessions share the same few cores: spinning workers would steal them
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("ServingModel: device='cuda' but onnxruntime has no CUDAExecutionProvider "
                             f"(available: {ort.get_available_providers()}; install onnxruntime-gpu)")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types for invalid graphs
        raise ValueError(f"ServingModel: onnxruntime cannot load the predictor graph: {e}") from e


def serving_entry(onnx_bytes: bytes, *, class_names: list[str], tap_dims: Mapping[str, list[int]]) -> dict[str, Any]:
    """The checkpoint entry of a predictor graph (``ServingModel.from_entry`` reads it) without an
    ONNX Runtime session: the learning worker writes it, the agent loads and checks it before the
    commit (a session per side would only load the same graph twice)."""
    return {"format": FORMAT, "onnx": np.frombuffer(bytes(onnx_bytes), dtype=np.uint8).copy(),
            "class_names": [str(n) for n in class_names],
            "tap_dims": {str(m): [int(d) for d in dims] for m, dims in tap_dims.items()}}


class ServingModel:
    """ONNX Runtime session on an exported predictor graph, with its class names and tap dims.

    Immutable once built (ORT's ``run`` may be called from several threads): after each task the
    caller builds a new instance and swaps the reference.
    """

    def __init__(self, onnx_bytes: bytes, *, class_names: list[str], tap_dims: dict[str, list[int]],
                 threads: int = 1, device: str = "cpu") -> None:
        if threads <= 0:
            raise ValueError(f"ServingModel: threads must be > 0, got {threads}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"ServingModel: device must be 'cpu' or 'cuda', got {device!r}")
        if not tap_dims or any(not dims or any(int(d) <= 0 for d in dims) for dims in tap_dims.values()):
            raise ValueError(f"ServingModel: tap_dims must map each modality to positive dims, got {tap_dims}")
        self.onnx_bytes = bytes(onnx_bytes)
        self.class_names = [str(n) for n in class_names]
        self.tap_dims = {str(m): [int(d) for d in dims] for m, dims in tap_dims.items()}
        self.modalities = list(self.tap_dims)
        self.threads, self.device = int(threads), device
        self.session = _session(self.onnx_bytes, threads=self.threads, device=device)
        self.providers = self.session.get_providers()
        self._check_graph()

    def _check_graph(self) -> None:
        want = input_names(self.tap_dims)
        have = [i.name for i in self.session.get_inputs()]
        if have != want:
            raise ValueError(f"ServingModel: graph inputs {have} do not match tap_dims {self.tap_dims} "
                             f"(expected {want})")
        levels = [(m, b, d) for m, dims in self.tap_dims.items() for b, d in enumerate(dims)]
        for i, (m, b, d) in zip(self.session.get_inputs(), levels, strict=False):  # present comes last
            if i.shape[1] != d:
                raise ValueError(f"ServingModel: graph input {i.name!r} has dim {i.shape[1]}, tap_dims[{m!r}][{b}] is {d}")
        outs = self.session.get_outputs()
        if [o.name for o in outs] != [OUTPUT_NAME] or len(outs[0].shape) != 2:
            raise ValueError(f"ServingModel: graph outputs {[(o.name, o.shape) for o in outs]}, "
                             f"expected [({OUTPUT_NAME!r}, ['batch', C])]")
        c = outs[0].shape[1]
        if c != len(self.class_names):
            raise ValueError(f"ServingModel: the graph predicts {c} classes but {len(self.class_names)} "
                             f"class names were given: {self.class_names}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _validate(self, taps: Mapping[str, list[np.ndarray]], present: np.ndarray
                  ) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
        present = np.asarray(present)
        k = len(self.modalities)
        if present.ndim != 2 or present.shape[1] != k:
            raise ValueError(f"ServingModel.predict: present must be (B, {k}) for {self.modalities}, "
                             f"got shape {present.shape}")
        if present.dtype != bool and not np.issubdtype(present.dtype, np.integer):
            raise ValueError(f"ServingModel.predict: present must be bool, got dtype {present.dtype}")
        present = present.astype(bool, copy=False)
        n = present.shape[0]
        out: dict[str, list[np.ndarray]] = {}
        for k_, (m, dims) in enumerate(self.tap_dims.items()):
            levels = taps.get(m)
            if levels is None:
                if present[:, k_].any():
                    raise ValueError(f"ServingModel.predict: no taps for modality {m!r} but present marks it "
                                     f"present in {int(present[:, k_].sum())} of {n} rows")
                out[m] = [np.zeros((n, d), np.float32) for d in dims]
                continue
            if len(levels) != len(dims):
                raise ValueError(f"ServingModel.predict: taps[{m!r}] has {len(levels)} levels, "
                                 f"expected {len(dims)} (dims {dims})")
            arrs = []
            for b, (level, d) in enumerate(zip(levels, dims, strict=True)):
                x = np.asarray(level)
                if x.shape != (n, d):
                    raise ValueError(f"ServingModel.predict: taps[{m!r}][{b}] has shape {x.shape}, expected "
                                     f"({n}, {d}) (batch from present {present.shape})")
                arrs.append(x)
            out[m] = arrs
        return out, present

    def predict(self, taps: Mapping[str, list[np.ndarray]], present: np.ndarray) -> np.ndarray:
        """(B, C) float32 class probabilities; keys of ``taps`` outside ``tap_dims`` are ignored."""
        checked, present = self._validate(taps, present)
        if present.shape[0] == 0:
            return np.zeros((0, self.num_classes), np.float32)
        return self.session.run([OUTPUT_NAME], feeds(self.tap_dims, checked, present))[0]

    # ---- checkpoint entry ----------------------------------------------------------------------
    def to_entry(self) -> dict[str, Any]:
        """Plain JSON values plus the graph as a uint8 array (stored as ``state["serving"]``)."""
        return serving_entry(self.onnx_bytes, class_names=self.class_names, tap_dims=self.tap_dims)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], *, threads: int = 1, device: str = "cpu") -> ServingModel:
        """Inverse of :meth:`to_entry`; keys it does not know (e.g. "openset") are ignored."""
        if entry.get("format") != FORMAT:
            raise ValueError(f"ServingModel.from_entry: format {entry.get('format')!r}, expected {FORMAT}")
        missing = [k for k in ("onnx", "class_names", "tap_dims") if k not in entry]
        if missing:
            raise ValueError(f"ServingModel.from_entry: entry lacks {missing} (has {sorted(entry)})")
        raw = entry["onnx"]
        if isinstance(raw, np.ndarray):
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise ValueError(f"ServingModel.from_entry: onnx must be a 1-D uint8 array, got {raw.dtype} "
                                 f"{raw.shape}")
            raw = raw.tobytes()
        elif not isinstance(raw, bytes | bytearray):
            raise ValueError(f"ServingModel.from_entry: onnx must be a uint8 array or bytes, got {type(raw).__name__}")
        return cls(bytes(raw), class_names=list(entry["class_names"]), tap_dims=dict(entry["tap_dims"]),
                   threads=threads, device=device)
