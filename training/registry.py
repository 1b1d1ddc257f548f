"""Strategy registry: one dict, name -> class, filled by the ``@register`` decorator (torch2trt style).

Every module in ``training/strategies/`` is imported on first lookup, so a new file that
decorates its classes (e.g. ``ours.py`` with "ours", "ours-no-freeze", ...) appears in
``names()`` and in the benchmark's ``--strategies`` without touching this file. A module that
fails to import is recorded in ``disabled()`` with the reason instead of breaking the others.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from training.errors import UnknownStrategyError

if TYPE_CHECKING:
    from training.model import SideNetwork
    from training.strategies.base import Strategy, StrategyConfig

log = logging.getLogger(__name__)
STRATEGIES: dict[str, type[Strategy]] = {}
_DISABLED: dict[str, str] = {}
_loaded: list[bool] = []
S = TypeVar("S")


def register(name: str) -> Callable[[type[S]], type[S]]:
    """Class decorator: register a Strategy subclass under ``name`` (sets ``cls.name``)."""

    def deco(cls: type[S]) -> type[S]:
        if name in STRATEGIES and STRATEGIES[name] is not cls:
            raise ValueError(f"strategy {name!r} is already registered by {STRATEGIES[name].__qualname__}")
        cls.name = name  # type: ignore[attr-defined]
        STRATEGIES[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def _load_all() -> None:
    if _loaded:
        return
    _loaded.append(True)
    import training.strategies as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        try:
            importlib.import_module(f"training.strategies.{info.name}")
        except Exception as exc:  # a broken optional strategy must not hide the others
            _DISABLED[info.name] = f"{type(exc).__name__}: {exc}"
            log.warning("strategy module %s disabled: %s", info.name, _DISABLED[info.name])


def names() -> list[str]:
    """Registered strategy names (built-ins first in a stable order, then the rest sorted)."""
    _load_all()
    first = ["naive", "ewc", "replay", "lwf", "ncm", "joint"]
    return [n for n in first if n in STRATEGIES] + sorted(n for n in STRATEGIES if n not in first)


def declared_names() -> list[str]:
    """Strategy names the modules of ``training/strategies/`` declare with ``@register("...")``,
    read from their source without importing them (so without torch); ``names()`` is what
    actually imported. Empty when the sources cannot be read (then nothing is checked)."""
    import re
    from importlib import resources

    found: list[str] = []
    try:
        for res in resources.files("training.strategies").iterdir():
            if res.name.endswith(".py") and not res.name.startswith("_"):
                found += re.findall(r'@register\(\s*"([^"]+)"\s*\)', res.read_text())
    except (OSError, ModuleNotFoundError):
        return []
    return sorted(set(found))


def disabled() -> dict[str, str]:
    """Strategy modules that failed to import -> reason."""
    _load_all()
    return dict(_DISABLED)


def get(name: str) -> type[Strategy]:
    _load_all()
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(f"unknown strategy {name!r}; registered: {names()}"
                                   + (f"; disabled modules: {_DISABLED}" if _DISABLED else "")) from None


def create(name: str, model: SideNetwork, config: StrategyConfig | None = None, **kw: Any) -> Strategy:
    """Instantiate strategy ``name`` on ``model``."""
    return get(name)(model, config, **kw)
