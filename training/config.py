"""The learner's config (``[learner]`` table): a module of its own so that it imports no torch.

Why: the robot's serving process reads and prints every config at start-up but never imports
torch (it serves an ONNX export of the learner); only the training worker builds a
``training.learner.Learner`` from this config. The strategy name is checked against the names
the strategy modules declare (read from their source, see ``training.registry.declared_names``)
so a typo fails at start-up, not at the first learned task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from training.errors import UnknownStrategyError
from training.registry import declared_names

if TYPE_CHECKING:
    from training.model import ModelConfig
    from training.strategies.base import StrategyConfig


@dataclass(kw_only=True)
class LearnerConfig:
    """What a robot's launch file sets for the learner (``[learner]`` table)."""

    strategy: str = "ours"
    # 4 passes, modality dropout 0.3: measured live (python -m benchmarks.live, 3 tasks taught from
    # 2 x 8 s of camera frames at 30 Hz, i.e. hundreds of near-duplicates per label): 8 passes and the
    # strategy's 0.1 dropout gave live accuracy 0.91 against 0.97, and twice the training time; the
    # model leaned on the few voices and motion recordings a short capture holds.
    epochs: int = 4
    batch_size: int = 64
    replay_batch: int = 64
    lr: float = 2e-3
    max_seconds: float = 30.0
    # One intra-op thread: the side network is tiny, and with 2 threads on 2 busy cores a batch-1
    # predict took 196 ms instead of 4.9 ms (OpenMP workers waiting for a core); the other core
    # stays with the backbones.
    threads: int = 1
    max_task_samples: int = 2000
    buffer_size: int = 2000
    buffer_bytes: int = 32 << 20
    buffer_dtype: str = "float16"
    d: int = 128
    n_experts: int = 10
    top_k: int = 2
    freeze_threshold: float = 0.10
    bottleneck: int = 32
    proj_dim: int = 128
    seed: int = 0
    device: str = "cpu"
    params: dict[str, float] = field(default_factory=dict)
    # applied to strategies that have a modality dropout (ours and its ablations) unless ``params``
    # names one; None: the strategy's own default (0.1 for ours)
    modality_dropout: float | None = 0.3

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "threads", "max_task_samples", "buffer_size", "d", "n_experts",
                     "top_k", "bottleneck", "proj_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LearnerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_seconds < 0:
            raise ValueError(f"LearnerConfig.max_seconds must be >= 0 (0 = no limit), got {self.max_seconds}")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ValueError(f"LearnerConfig.device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.modality_dropout is not None and not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"LearnerConfig.modality_dropout must be in [0, 1) or None, got {self.modality_dropout!r}")
        declared = declared_names()
        if declared and self.strategy not in declared:  # without importing torch; get() is authoritative
            raise UnknownStrategyError(f"unknown strategy {self.strategy!r}; declared: {declared}")

    def strategy_config(self) -> StrategyConfig:
        from training.strategies.base import StrategyConfig

        return StrategyConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                              replay_batch=self.replay_batch, buffer_size=self.buffer_size,
                              buffer_bytes=self.buffer_bytes, buffer_dtype=self.buffer_dtype,
                              max_seconds=self.max_seconds, threads=self.threads, seed=self.seed,
                              device=self.resolved_device(), params=self.strategy_params())

    def strategy_params(self) -> dict[str, float]:
        """``params`` plus ``modality_dropout`` where the strategy has that hyperparameter."""
        from training.registry import get as get_strategy

        params = dict(self.params)
        if self.modality_dropout is not None and "modality_dropout" in getattr(get_strategy(self.strategy),
                                                                               "defaults", {}):
            params.setdefault("modality_dropout", float(self.modality_dropout))
        return params

    def resolved_device(self) -> str:
        """``auto``: CUDA where torch sees a GPU (the learning worker on a Jetson), else the CPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def model_config(self, tap_dims: dict[str, list[int]]) -> ModelConfig:
        from training.model import ModelConfig
        from training.registry import get as get_strategy

        cls = get_strategy(self.strategy)
        over = cls.model_overrides(self.strategy_params()) if hasattr(cls, "model_overrides") else {}
        return ModelConfig(tap_dims=tap_dims, d=self.d, n_experts=self.n_experts, top_k=self.top_k,
                           freeze_threshold=self.freeze_threshold, bottleneck=self.bottleneck,
                           proj_dim=self.proj_dim, **over)
