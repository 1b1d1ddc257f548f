"""Backbone registry: modality name -> class, filled by the ``register`` decorator."""

from __future__ import annotations

from collections.abc import Callable

from export.backbones.base import Backbone

BACKBONES: dict[str, type[Backbone]] = {}


def register(cls: type[Backbone]) -> type[Backbone]:
    BACKBONES[cls.modality] = cls
    return cls


def _load_all() -> None:
    # Imported lazily so `import export` stays cheap; each module registers itself.
    from export.backbones import audio, image, imu  # noqa: F401


def modalities() -> list[str]:
    _load_all()
    return sorted(BACKBONES)


def create(modality: str) -> Backbone:
    """Instantiate the frozen backbone of ``modality`` (weights from installed packages)."""
    _load_all()
    try:
        factory: Callable[[], Backbone] = BACKBONES[modality]
    except KeyError:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(BACKBONES)}") from None
    return factory().frozen()


__all__ = ["BACKBONES", "Backbone", "create", "modalities", "register"]
