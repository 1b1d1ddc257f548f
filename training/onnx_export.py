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

Why a template (``predictor_template`` + ``export_predictor(learner, template=...)``): tracing
costs 1.5 s of CPU on an idle core and 3-4 s on a robot that keeps serving, and it sat between
the end of the operator's capture and the swap. The graph's *structure* is known as soon as the
task's labels are: the learning worker traces a dry run of the task (the strategy's own
``learn_task`` on one zero sample per label and one throwaway step, so class count, class means
and every branch are those the trained model will have) while the operator is still capturing. After training, only the
weights change: they are written into the template's initializers by name (the graph is traced
without constant folding, so every initializer is a named tensor of the predictor's state, the
strategy's tensors included), and ONNX Runtime's basic, platform-independent optimisations then
fold what torch would have folded. The filled graph passes the same self-check as a fresh trace;
if it does not (a strategy whose prediction reads state the template cannot see), the export
traces afresh.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


class TemplateMismatch(ValueError):
    """A template does not fit the learner's current predictor (other shapes or state names)."""


@dataclass(frozen=True)
class Export:
    """An exported predictor: the ONNX bytes, how they were made (``template`` or ``traced``), seconds."""

    onnx: bytes
    how: str
    seconds: float


@dataclass(frozen=True)
class PredictorTemplate:
    """An untrained, unfolded trace of the predictor a task will produce (see module docstring)."""

    onnx: bytes
    n_classes: int
    seconds: float


def _strategy_copy(strategy: Any, skip: Sequence[str]) -> Any:
    """A deep copy of ``strategy`` without the attributes named in ``skip`` (set to None)."""
    memo: dict[int, Any] = {id(x): None for x in (getattr(strategy, k, None) for k in skip) if x is not None}
    return copy.deepcopy(strategy, memo)


def _cpu_strategy(strategy: Any) -> Any:
    """A CPU deep copy of what ``predict`` needs; the learner's own strategy is never moved.

    The replay buffer, the optimizer and the old-model snapshot are left out of the copy (mapped
    to None through deepcopy's memo): ``predict`` never reads them and the buffer can be 32 MB.
    """
    import torch

    work = _strategy_copy(strategy, ("buffer", "optimizer", "old_model"))
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
            # The strategy's own tensors (class means, masks) as buffers: the tracer then names
            # them as initializers instead of baking anonymous constants, so a template can be filled.
            for k, v in vars(strategy).items():
                if isinstance(v, torch.Tensor):
                    self.register_buffer(f"strategy_{k.lstrip('_')}", v)

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


def _trace(module: Any, tap_dims: Mapping[str, list[int]]) -> bytes:
    """The predictor module traced to ONNX, unfolded (every initializer a named state tensor)."""
    import torch

    names = input_names(tap_dims)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(module, _example_inputs(tap_dims), buf, dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=[OUTPUT_NAME],
                          dynamic_axes={n: {0: "batch"} for n in [*names, OUTPUT_NAME]}, do_constant_folding=False)
    _pass_warnings(caught)
    return buf.getvalue()


def _fill(template: bytes, state: Mapping[str, Any]) -> bytes:
    """The template with every initializer replaced by the state tensor of the same name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(template)
    for init in model.graph.initializer:
        tensor = state.get(init.name)
        if tensor is None:
            raise TemplateMismatch(f"template initializer {init.name!r} is not in the predictor's state")
        arr = tensor.detach().cpu().numpy()
        old = numpy_helper.to_array(init)
        if arr.shape != old.shape or arr.dtype != old.dtype:
            raise TemplateMismatch(f"template initializer {init.name!r} is {old.dtype}{list(old.shape)}, "
                                   f"the predictor's is {arr.dtype}{list(arr.shape)}")
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return model.SerializeToString()


def _ort_fold(data: bytes) -> bytes:
    """ONNX Runtime's basic (platform-independent) optimisations saved: constant folding of the
    unfolded trace, so serving runs the same graph as a folded export (0.9 against 1.2 ms)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="continua-onnx-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.log_severity_level = 3
        ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        with open(opts.optimized_model_filepath, "rb") as f:
            return f.read()


@contextlib.contextmanager
def _quiet(logger: str = "training"):
    """The dry run's strategy log lines (routing shares of a task not learned yet) would mislead."""
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


def _scramble(module: Any) -> None:
    """Distinct random values in every float tensor: the exporter merges initializers with equal
    data (an untrained model's zero biases), and a merged one could not be filled by name."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))


def predictor_template(learner: Learner, labels: Sequence[str], *, train_step: bool = True) -> PredictorTemplate:
    """The graph ``export_predictor`` will produce once ``learner`` has learned a task of ``labels``.

    A dry run on a copy: the strategy's ``learn_task`` on one zero sample per label (head growth,
    class means, every ``end_task`` step), then an unfolded trace. With ``train_step`` the dry
    run takes one optimisation step (the copy's, thrown away): a fresh process's first training
    step costs ~2 s more than the next ones on a CPU (measured: 6.1-6.3 s against 3.8-4.1 s for
    the same task), and the learning worker would rather pay that while the operator captures.
    The learner is left exactly as it was.
    """
    import numpy as np

    from training.learner import LabelledSamples
    from training.strategies.base import torch_threads

    t0 = time.perf_counter()
    with learner._lock:
        strategy = learner.strategy
    work = _strategy_copy(strategy, ("optimizer", "old_model"))
    work.config = dataclasses.replace(work.config, epochs=1 if train_step else 0, max_seconds=0.0)
    dry = LabelledSamples(taps={m: [np.zeros((len(labels), d), np.float32) for d in dims]
                                for m, dims in learner.tap_dims.items()},
                          present=np.ones((len(labels), len(learner.tap_dims)), bool), names=list(labels))
    data, _ = learner._task_data(dry, work.tasks_learned)
    with torch_threads(learner.config.training.threads), _quiet():
        work.learn_task(data)
        cpu = _cpu_strategy(work)
        module = _predictor_module(cpu, learner.tap_dims)
        _scramble(module)
        onnx_bytes = _trace(module, learner.tap_dims)
    return PredictorTemplate(onnx=onnx_bytes, n_classes=cpu.model.num_classes, seconds=time.perf_counter() - t0)


def export_predictor(learner: Learner, template: PredictorTemplate | None = None) -> bytes:
    """The learner's prediction (see module docstring) as ONNX model bytes (``export``'s bytes)."""
    return export(learner, template).onnx


def export(learner: Learner, template: PredictorTemplate | None = None) -> Export:
    """The learner's prediction (see module docstring) as ONNX, with how it was made.

    Works on a deep CPU copy of the current strategy: the learner (which may live on CUDA and keep
    serving meanwhile) is left exactly as it was. With a ``template`` (``predictor_template``),
    the learner's weights are filled into it instead of tracing; a template that does not fit or
    whose filled graph fails the self-check is dropped for a fresh trace (logged). Raises
    ValueError for a learner that knows no class yet (there is nothing to predict) and for a
    trace that fails the self-check.
    """
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
    t0 = time.perf_counter()
    with torch_threads(learner.config.training.threads):
        data, how = None, "traced"
        if template is not None:
            try:
                data = _ort_fold(_fill(template.onnx, module.state_dict()))
                _check_graph(data, names, n_classes)
                worst = _self_check(data, work, tap_dims, SELF_CHECK_TOL)
                how = "template"
            except ValueError as exc:  # TemplateMismatch or a failed self-check
                log.warning("export_predictor: template not usable (%s); tracing afresh", exc)
                data = None
        if data is None:
            data = _ort_fold(_trace(module, tap_dims))
            _check_graph(data, names, n_classes)
            worst = _self_check(data, work, tap_dims, SELF_CHECK_TOL)
    seconds = time.perf_counter() - t0
    log.info("exported %s predictor (%d classes, %d inputs) to ONNX (%s): %d bytes in %.2f s (self-check %.1g)",
             strategy.name, n_classes, len(names), how, len(data), seconds, worst)
    return Export(onnx=data, how=how, seconds=seconds)


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
    with torch_threads(learner.config.training.threads):
        logits = strategy.predict(t, torch.as_tensor(present, device=dev))
    ref = torch.softmax(logits.float(), dim=1).cpu().numpy()
    got = _session(onnx_bytes).run([OUTPUT_NAME], feeds(learner.tap_dims, taps, present))[0]
    if got.shape != ref.shape:
        raise ValueError(f"predictor_parity: ONNX probs {got.shape} vs torch {ref.shape}")
    return float(np.max(np.abs(got - ref))) if ref.size else 0.0
