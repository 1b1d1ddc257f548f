"""The learner's prediction as one ONNX graph, served by ONNX Runtime in a torch-free process.

    from training.onnx_export import export_predictor, predictor_parity

    onnx_bytes = export_predictor(learner)                # after each learned task, in the worker
    assert predictor_parity(learner, onnx_bytes, taps, present) < 1e-4

The graph is ``softmax(learner.strategy.predict(taps, present))``: the side network plus the
strategy's own prediction rule (e.g. Ours mixes head log-probs with nearest-mean-of-exemplars
log-probs; NCM is cosine similarity to class means), exactly what ``Learner.predict`` returns as
``.probs``. The strategy's state (class means, counts) is baked into the graph as constants, so
the graph must be exported again after every task.

Names (defined once here, used by the export and by :mod:`runtime.serving_model`):
inputs ``f"{modality}_{level}"`` float32 (B, dim) for each modality in ``tap_dims`` order and
each of its levels (shallow -> deep), then ``"present"`` bool (B, K); output ``"probs"`` float32
(B, C). The batch dimension is dynamic everywhere.

Why the legacy (TorchScript) exporter: ~2 s for this model against ~26 s for the dynamo one, and
the worker exports after every task. Why this module imports torch only inside its functions: the
serving process imports the names from here and must never import torch (~570 MB resident).
"""

from __future__ import annotations

import copy
import io
import logging
import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from training.learner import Learner

log = logging.getLogger(__name__)

PRESENT_NAME = "present"
OUTPUT_NAME = "probs"
OPSET = 17
EXAMPLE_BATCH = 3  # >= 2, so that no size-1 batch dimension can be specialised into the graph
SELF_CHECK_TOL = 1e-4  # max abs probs difference ORT vs torch accepted by export_predictor


def tap_input_name(modality: str, level: int) -> str:
    """The graph input holding tap ``level`` of ``modality``."""
    return f"{modality}_{level}"


def tap_input_names(tap_dims: Mapping[str, list[int]]) -> list[str]:
    """Tap input names in graph order: modalities in ``tap_dims`` order, levels shallow -> deep."""
    return [tap_input_name(m, b) for m, dims in tap_dims.items() for b in range(len(dims))]


def input_names(tap_dims: Mapping[str, list[int]]) -> list[str]:
    """Every graph input name in order: the taps, then ``present``."""
    return [*tap_input_names(tap_dims), PRESENT_NAME]


def _cpu_strategy(strategy: Any) -> Any:
    """A CPU deep copy of what ``predict`` needs; the learner's own strategy is never moved.

    The replay buffer, the optimizer and the old-model snapshot are left out of the copy (mapped
    to None through deepcopy's memo): ``predict`` never reads them and the buffer can be 32 MB.
    """
    import torch

    skip = [getattr(strategy, k, None) for k in ("buffer", "optimizer", "old_model")]
    memo: dict[int, Any] = {id(x): None for x in skip if x is not None}
    work = copy.deepcopy(strategy, memo)
    work.model.cpu().eval()
    work.device = "cpu"
    for k, v in list(vars(work).items()):  # state predict reads: class means, counts, ... (top level)
        if isinstance(v, torch.Tensor):
            setattr(work, k, v.detach().cpu())
    return work


def _predictor_module(strategy: Any, tap_dims: Mapping[str, list[int]]) -> Any:
    import torch
    from torch import nn

    class Predictor(nn.Module):
        """Flat graph inputs -> the strategy's taps dict -> softmax of ``strategy.predict``."""

        def __init__(self) -> None:
            super().__init__()
            self.model = strategy.model  # registered, so its weights become named initializers
            self.layout = [(m, len(d)) for m, d in tap_dims.items()]

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            taps, i = {}, 0
            for m, n in self.layout:
                taps[m] = list(inputs[i : i + n])
                i += n
            return torch.softmax(strategy.predict(taps, inputs[i]).float(), dim=1)

    return Predictor().eval()


def _example_inputs(tap_dims: Mapping[str, list[int]], batch: int = EXAMPLE_BATCH) -> tuple[Any, ...]:
    import torch

    gen = torch.Generator().manual_seed(0)
    taps = [torch.randn(batch, d, generator=gen) for dims in tap_dims.values() for d in dims]
    present = torch.ones(batch, len(tap_dims), dtype=torch.bool)
    present[0, 0] = False  # one absent modality: both branches of the absent-token select are traced
    return (*taps, present)


def export_predictor(learner: Learner) -> bytes:
    """The learner's prediction (see module docstring) as ONNX model bytes.

    Works on a deep CPU copy of the current strategy: the learner (which may live on CUDA and keep
    serving meanwhile) is left exactly as it was. Raises ValueError for
    a learner that knows no class yet (there is nothing to predict).
    """
    import torch

    from training.strategies.base import torch_threads

    with learner._lock:  # a swapped-in strategy is never trained again: copying it outside is safe
        strategy = learner.strategy
    n_classes = strategy.model.num_classes
    if n_classes == 0:
        raise ValueError("export_predictor: the learner has 0 classes (learn a task first); "
                         "there is no prediction to export")
    work = _cpu_strategy(strategy)
    tap_dims = learner.tap_dims
    module = _predictor_module(work, tap_dims)
    names = input_names(tap_dims)
    dynamic = {n: {0: "batch"} for n in [*names, OUTPUT_NAME]}
    buf = io.BytesIO()
    t0 = time.perf_counter()
    with torch_threads(learner.config.threads):
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(module, _example_inputs(tap_dims), buf, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=[OUTPUT_NAME], dynamic_axes=dynamic,
                              do_constant_folding=True)
        _pass_warnings(caught)
        data = buf.getvalue()
        _check_graph(data, names, n_classes)
        worst = _self_check(data, work, tap_dims, SELF_CHECK_TOL)
    log.info("exported %s predictor (%d classes, %d inputs) to ONNX: %d bytes in %.2f s (self-check %.1g)",
             strategy.name, n_classes, len(names), len(data), time.perf_counter() - t0, worst)
    return data


def _pass_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Drop the legacy exporter's deprecation notice (kept on purpose, see module docstring) and
    its TracerWarnings; pass any other warning on.

    Why TracerWarnings may go: the side network validates shapes in Python (``u.shape[1] != K``),
    and every such check warns although the sizes it compares are fixed by the weights. A real
    branch on a tensor value would freeze the example's path into the graph; ``_self_check``
    catches that by comparing ORT with torch on every presence pattern and other batch sizes.
    """
    import torch

    traced = {f"{w.filename}:{w.lineno}" for w in caught if issubclass(w.category, torch.jit.TracerWarning)}
    if traced:
        log.debug("export_predictor: TracerWarnings at %s (checked by the self-check)", sorted(traced))
    for w in caught:
        if not issubclass(w.category, DeprecationWarning | FutureWarning | torch.jit.TracerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _presence_patterns(k: int) -> np.ndarray:
    """Every (2^k, k) presence pattern, all-present first (k capped at 10: 1024 rows)."""
    k_all = min(k, 10)
    rows = [[bool((i >> j) & 1) for j in range(k_all)] for i in range(2**k_all)][::-1]
    return np.concatenate([np.asarray(rows, bool), np.ones((len(rows), k - k_all), bool)], axis=1)


def _self_check(data: bytes, strategy: Any, tap_dims: Mapping[str, list[int]], tol: float) -> float:
    """Max abs ORT-vs-torch probs difference on batches of 1 and 2^K rows (every presence pattern)."""
    import torch

    rng = np.random.default_rng(0)
    sess = _session(data)
    worst = 0.0
    for present in (np.ones((1, len(tap_dims)), bool), _presence_patterns(len(tap_dims))):
        n = len(present)
        taps = {m: [rng.normal(size=(n, d)).astype(np.float32) for d in dims] for m, dims in tap_dims.items()}
        with torch.no_grad():
            t = {m: [torch.from_numpy(x) for x in lv] for m, lv in taps.items()}
            ref = torch.softmax(strategy.predict(t, torch.from_numpy(present)).float(), dim=1).numpy()
        got = sess.run([OUTPUT_NAME], feeds(tap_dims, taps, present))[0]
        worst = max(worst, float(np.max(np.abs(got - ref))))
    if not worst <= tol:
        raise ValueError(f"export_predictor: ONNX Runtime and torch probs differ by {worst:.3g} (> {tol:g}) on "
                         "the self-check batches: the trace froze a data-dependent branch of "
                         f"{strategy.name}.predict")
    return worst


def _check_graph(data: bytes, names: list[str], n_classes: int) -> None:
    """Fail loudly if the exporter dropped or renamed an input, or the class dim is not static C."""
    import onnx

    graph = onnx.load_model_from_string(data).graph
    have = [i.name for i in graph.input]
    if have != names:
        raise ValueError(f"export_predictor: graph inputs {have}, expected {names}")
    outs = [o.name for o in graph.output]
    if outs != [OUTPUT_NAME]:
        raise ValueError(f"export_predictor: graph outputs {outs}, expected [{OUTPUT_NAME!r}]")
    dims = graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2 or dims[1].dim_value != n_classes:
        raise ValueError(f"export_predictor: output shape {[d.dim_param or d.dim_value for d in dims]}, "
                         f"expected ['batch', {n_classes}]")


def feeds(tap_dims: Mapping[str, list[int]], taps: Mapping[str, list[np.ndarray]],
          present: np.ndarray) -> dict[str, np.ndarray]:
    """ORT feeds from already validated taps (every modality of ``tap_dims``) and present (B, K)."""
    out = {tap_input_name(m, b): np.ascontiguousarray(taps[m][b], dtype=np.float32)
           for m, dims in tap_dims.items() for b in range(len(dims))}
    out[PRESENT_NAME] = np.ascontiguousarray(present, dtype=bool)
    return out


def _session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def predictor_parity(learner: Learner, onnx_bytes: bytes, taps: Mapping[str, list[np.ndarray]],
                     present: np.ndarray) -> float:
    """Max abs difference between ONNX Runtime's probs and the learner's (``Learner.predict(...).probs``,
    computed here on the strategy's own device, so a CUDA learner works too) on one batch.

    ``taps`` must hold every modality of ``learner.tap_dims`` (zeros where absent) and ``present``
    be (B, K) bool. The worker refuses an export whose parity exceeds its tolerance.
    """
    import torch

    from training.strategies.base import torch_threads

    present = np.asarray(present, dtype=bool)
    missing = [m for m in learner.tap_dims if m not in taps]
    if missing:
        raise ValueError(f"predictor_parity: taps lack modalities {missing} (give zeros and present False)")
    with learner._lock:
        strategy = learner.strategy
    dev = strategy.device
    t = {m: [torch.as_tensor(np.asarray(x, np.float32), device=dev) for x in taps[m]] for m in learner.tap_dims}
    with torch_threads(learner.config.threads):
        logits = strategy.predict(t, torch.as_tensor(present, device=dev))
    ref = torch.softmax(logits.float(), dim=1).cpu().numpy()
    got = _session(onnx_bytes).run([OUTPUT_NAME], feeds(learner.tap_dims, taps, present))[0]
    if got.shape != ref.shape:
        raise ValueError(f"predictor_parity: ONNX probs {got.shape} vs torch {ref.shape}")
    return float(np.max(np.abs(got - ref))) if ref.size else 0.0
