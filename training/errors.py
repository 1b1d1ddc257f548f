"""Typed errors of the training package (one module, as STYLE.md asks)."""

from __future__ import annotations

from common.errors import ContinuaError


class TrainingError(ContinuaError):
    """Base class of every error raised by continua.training."""


class ReplayBufferError(TrainingError):
    """A replay buffer cannot be saved or loaded (wrong schema, unreadable directory)."""


class BufferCorruptError(ReplayBufferError):
    """A persisted buffer's manifest is missing or corrupt (segments are checked one by one instead)."""


class ScenarioError(TrainingError):
    """A scenario or split cannot be built or does not match its recorded hash."""


class FeatureCacheError(TrainingError):
    """Cached backbone features are missing, stale or unreadable."""


class FeatureDatasetError(TrainingError, ValueError):
    """A pre-extracted feature dataset does not follow the documented format."""


class UnknownStrategyError(TrainingError, KeyError):
    """No strategy of that name is registered."""


class TrainingCancelled(TrainingError):
    """Training stopped early because the cancel event was set (the model keeps its last step)."""


class LearnerStateError(TrainingError):
    """A saved learner cannot be loaded: no usable generation, or an old pickle-format directory."""
