"""The learner's config tree (``[learner]``, ``[learner.model]``, ``[learner.training]``), torch-free.

Why one tree: the learner, its side network and its strategy each read their knobs from the
dataclass that owns them, so each knob is defined and defaulted exactly once (copied fields had
drifted: ``max_seconds`` 30 in one and 0 in another). ``LearnerConfig`` holds a ``ModelConfig``
(the side network's shape) and a ``StrategyConfig`` (the training loop every strategy shares);
a launch file sets them in nested tables::

    [learner]
    strategy = "ours"

    [learner.training]
    max_seconds = 30.0
    device = "auto"

    [learner.model]
    d = 128

The old flat keys (``[learner] epochs``) are refused with a message naming the new place
(``LearnerConfig.moved``, read by ``common.config.from_dict``).

Why torch-free: the robot's serving process reads and prints every config at start-up but never
imports torch (it serves an ONNX export of the learner); only the training worker builds a
``training.learner.Learner`` from this config. ``training.model`` and
``training.strategies.base`` import their configs from here. The strategy name is checked
against the names the strategy modules declare (read from their source, see
``training.registry.declared_names``) so a typo fails at start-up, not at the first learned task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.config import (
    ConfigError,
    from_dict,
    require,
    require_non_negative,
    require_positive,
    upgrade_moved,
)
from training.errors import UnknownStrategyError
from training.registry import declared_names

ADAPTERS = ("none", "moe")
DEVICES = "cpu, cuda, cuda:N or auto"


def _device_ok(device: str) -> bool:
    return device in ("cpu", "cuda", "auto") or device.startswith("cuda:")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the side network (``[learner.model]``). ``tap_dims``: modality -> tap dims ordered
    shallow -> deep; it comes from the backbone export at run time (``LearnerConfig.model_config``),
    so the tree leaves it empty and ``SideNetwork`` refuses an empty one."""

    tap_dims: dict[str, list[int]] = field(default_factory=dict)
    d: int = 128  # token width of every level
    adapter: str = "none"  # "moe": the cross-modal mixture of experts (training.moe)
    n_experts: int = 10
    top_k: int = 2  # experts each token is routed to
    freeze_threshold: float = 0.10  # an expert with this share of a task's routing is frozen after it
    # Routing-collapse counters (training.moe): at most this many experts frozen per task (0: no
    # limit), never fewer than min_free_experts left free, and gate noise std in training.
    freeze_per_task: int = 2
    min_free_experts: int = 2
    gate_noise: float = 0.5
    # Fixed mean-pooling of taps before the side network, modality -> factor per level (1: keep),
    # e.g. {"image": [1, 1, 1, 2]}: the <= 2 KB replay layout (with buffer_dtype "int8"). Pooled
    # in the model, so the serving export and the replay buffer see the same pooled taps.
    tap_pool: dict[str, list[int]] = field(default_factory=dict)
    bottleneck: int = 32  # hidden width of one expert
    # For a strategy with a modality_dropout hyperparameter (ours and its ablations) the learner
    # sets this from it (model_overrides; see LearnerConfig.modality_dropout).
    modality_dropout: float = 0.0
    proj_dim: int = 128  # per-modality projection, the width of z_joint
    num_classes: int = 0  # the head grows with each task
    fusion_hidden: int = 256

    def __post_init__(self) -> None:
        for mod, dims in self.tap_dims.items():
            if not dims or any(int(x) <= 0 for x in dims):
                raise ValueError(f"ModelConfig.tap_dims[{mod!r}] must be a non-empty list of positive dims, got {dims}")
        self.tap_dims = {m: [int(x) for x in dims] for m, dims in self.tap_dims.items()}
        require_positive(self, "d", "proj_dim", "n_experts", "top_k", "bottleneck", "fusion_hidden")
        require(self, ["adapter"], lambda v: v in ADAPTERS, f"one of {ADAPTERS}")
        require(self, ["top_k"], lambda v: v <= self.n_experts, f"<= n_experts={self.n_experts}")
        require(self, ["modality_dropout"], lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        require(self, ["freeze_threshold"], lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        require_non_negative(self, "num_classes", "freeze_per_task", "min_free_experts", "gate_noise")
        require(self, ["min_free_experts"], lambda v: v <= self.n_experts, f"<= n_experts={self.n_experts}")
        self.tap_pool = {m: [int(f) for f in fs] for m, fs in self.tap_pool.items()}
        for mod, factors in self.tap_pool.items():
            dims = self.tap_dims.get(mod)
            if dims is not None and (len(factors) != len(dims) or any(
                    f < 1 or d % f for f, d in zip(factors, dims, strict=False))):
                raise ValueError(f"ModelConfig.tap_pool[{mod!r}] = {factors} must give one factor >= 1 per tap "
                                 f"level dividing its dim (tap dims {dims})")

    def pooled_dims(self) -> dict[str, list[int]]:
        """Tap dims after ``tap_pool`` (what the laterals and the replay buffer hold)."""
        return {m: [d // f for d, f in zip(dims, self.tap_pool.get(m, [1] * len(dims)), strict=True)]
                for m, dims in self.tap_dims.items()}

    @property
    def modalities(self) -> list[str]:
        return list(self.tap_dims)

    @property
    def levels(self) -> int:
        return max(len(d) for d in self.tap_dims.values())


@dataclass(kw_only=True)
class StrategyConfig:
    """The training loop every strategy shares (``[learner.training]``; defined once, Mammoth
    style); ``params`` holds the strategy's own hyperparameters. The defaults are what the robot's
    learner runs with."""

    # 4 passes, modality dropout 0.3: measured live (python -m benchmarks.live, 3 tasks taught from
    # 2 x 8 s of camera frames at 30 Hz, i.e. hundreds of near-duplicates per label): 8 passes and the
    # strategy's 0.1 dropout gave live accuracy 0.91 against 0.97, and twice the training time; the
    # model leaned on the few voices and motion recordings a short capture holds.
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    replay_batch: int = 64  # replayed samples mixed into each batch (strategies with a buffer)
    buffer_size: int = 2000
    buffer_bytes: int = 32 << 20
    buffer_dtype: str = "float16"  # or "int8": a quarter of float32, for small robots
    max_seconds: float = 30.0  # training stops here (end_task still runs); 0 = no limit
    # One intra-op thread: the side network is tiny, and with 2 threads on 2 busy cores a batch-1
    # predict took 196 ms instead of 4.9 ms (OpenMP workers waiting for a core); the other core
    # stays with the backbones.
    threads: int = 1
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (CUDA where torch sees a GPU: resolved_device)
    # Distillation from a teacher's logits carried by the data (a fleet peer's skill package):
    # weight of the KL term and its temperature (Strategy.soft_term); 0 switches it off. Off by
    # measurement: importing 3 packages (class stream, seed 0, the sender's head logits), weight 1
    # made one import fail the gate (old-task drop 0.19); 0.3 and 0 passed all three and ended at
    # 0.955/0.99/0.995 and 0.99/0.995/0.975 on the imported tasks (no difference on one seed).
    soft_weight: float = 0.0
    soft_temperature: float = 2.0
    params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_non_negative(self, "epochs", "replay_batch", "soft_weight")
        require_positive(self, "soft_temperature")
        require_positive(self, "batch_size", "buffer_size", "buffer_bytes", "threads", "lr")
        require(self, ["max_seconds"], lambda v: v >= 0, ">= 0 (0 = no limit)")
        require(self, ["buffer_dtype"], lambda v: v in ("float16", "int8"), "float16 or int8")
        require(self, ["device"], lambda v: isinstance(v, str) and _device_ok(v), DEVICES)

    def resolved_device(self) -> str:
        """``auto``: CUDA where torch sees a GPU (the learning worker on a Jetson), else the CPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


_MODEL_MOVED = ("d", "n_experts", "top_k", "freeze_threshold", "bottleneck", "proj_dim")
_TRAINING_MOVED = ("epochs", "batch_size", "replay_batch", "lr", "max_seconds", "threads", "buffer_size",
                   "buffer_bytes", "buffer_dtype", "seed", "device", "params")


_STRATEGY_SET = ("adapter", "modality_dropout")  # ModelConfig fields a strategy's model_overrides decides
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in _STRATEGY_SET}


@dataclass(kw_only=True)
class LearnerConfig:
    """What a robot's launch file sets for the learner (``[learner]`` and its two nested tables)."""

    # the flat [learner] keys of before the tree -> their place now (common.config.from_dict)
    moved: ClassVar[dict[str, str]] = {**{k: f"model.{k}" for k in _MODEL_MOVED},
                                       **{k: f"training.{k}" for k in _TRAINING_MOVED}}

    strategy: str = "ours"
    max_task_samples: int = 2000  # a bigger task is subsampled (seeded) before training
    # The default of the strategy's own modality_dropout hyperparameter, for strategies that have
    # one (ours and its ablations; it becomes model.modality_dropout), unless training.params names
    # one; None: the strategy's own default (0.1 for ours). 0.3, not 0.1: see StrategyConfig.epochs.
    modality_dropout: float | None = 0.3
    # > 0: pool taps (training.buffer.fit_pool) so one buffered sample costs at most this many
    # bytes; 2048 with training.buffer_dtype "int8" is the <= 2 KB layout (launch/robot-2kb.toml).
    replay_sample_bytes: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    training: StrategyConfig = field(default_factory=StrategyConfig)

    def __post_init__(self) -> None:
        require_positive(self, "max_task_samples")
        require_non_negative(self, "replay_sample_bytes")
        require(self, ["modality_dropout"], lambda v: v is None or 0.0 <= v < 1.0, "in [0, 1) or None")
        if self.training.epochs <= 0:  # a strategy may take 0 passes (export dry runs); a learner may not
            raise ValueError(f"LearnerConfig.training.epochs must be > 0, got {self.training.epochs}")
        for name in _STRATEGY_SET:  # one place per knob: the strategy sets these (model_overrides)
            if getattr(self.model, name) != _MODEL_DEFAULTS[name]:
                raise ValueError(f"[learner.model] {name} is set by the strategy; "
                                 + ("use [learner] modality_dropout" if name == "modality_dropout"
                                    else "pick the strategy (e.g. ours-no-moe) instead"))
        if self.model.tap_dims:
            raise ValueError("LearnerConfig.model.tap_dims comes from the backbone export; leave it unset, "
                             f"got {self.model.tap_dims}")
        declared = declared_names()
        if declared and self.strategy not in declared:  # without importing torch; get() is authoritative
            raise UnknownStrategyError(f"unknown strategy {self.strategy!r}; declared: {declared}")

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> LearnerConfig:
        """The config a learner state holds; states saved before the tree (flat keys) still load."""
        try:
            return from_dict(cls, upgrade_moved(cls, data))
        except ConfigError as exc:
            raise ConfigError(f"saved learner config: {exc}") from exc

    def strategy_config(self) -> StrategyConfig:
        """``training`` as the strategy gets it: the device resolved, ``strategy_params`` applied."""
        return dataclasses.replace(self.training, device=self.training.resolved_device(),
                                   params=self.strategy_params())

    def strategy_params(self) -> dict[str, float]:
        """``training.params`` plus ``modality_dropout`` where the strategy has that hyperparameter."""
        from training.registry import get as get_strategy

        params = dict(self.training.params)
        if self.modality_dropout is not None and "modality_dropout" in getattr(get_strategy(self.strategy),
                                                                               "defaults", {}):
            params.setdefault("modality_dropout", float(self.modality_dropout))
        return params

    def model_config(self, tap_dims: dict[str, list[int]]) -> ModelConfig:
        """``model`` with the backbones' ``tap_dims`` and what the strategy needs (``model_overrides``)."""
        from training.registry import get as get_strategy

        cls = get_strategy(self.strategy)
        over = cls.model_overrides(self.strategy_params()) if hasattr(cls, "model_overrides") else {}
        if self.replay_sample_bytes and not self.model.tap_pool:
            from training.buffer import fit_pool

            over["tap_pool"] = fit_pool(tap_dims, self.training.buffer_dtype, self.replay_sample_bytes)
        return dataclasses.replace(self.model, tap_dims=tap_dims, **over)
