"""TOML-backed dataclass configs shared by every continua process.

Why here: ``sensors`` is the leftmost package of the data flow, so every other package may
import it. A process declares a keyword-only dataclass with working defaults; this module
fills it from a TOML table, rejects unknown keys with a message naming them (a typo in a
robot's launch file must not silently fall back to a default), and renders the effective
config for the log at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, published as tomli before it joined the stdlib
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the key and value."""


def _coerce(name: str, typ: Any, value: Any) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ) and isinstance(value, dict):
        return from_dict(typ, value, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        for arg in args:
            try:
                return _coerce(name, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{name}={value!r} does not fit {typ}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        args = typing.get_args(typ)
        item = args[0] if args else Any
        seq = [_coerce(f"{name}[]", item, v) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return dict(value)
    if typ is Any:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is Path and isinstance(value, str):
        return Path(value)
    if isinstance(typ, type) and not isinstance(value, typ):
        raise ConfigError(f"{name} must be {typ.__name__}, got {value!r}")
    if typ is int and isinstance(value, bool):
        raise ConfigError(f"{name} must be int, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a mapping; unknown keys and wrong types raise ``ConfigError``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(fields)}")
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed one is a ``ConfigError`` naming the path."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {p} is not valid TOML: {exc}") from None


def load_config(cls: type[T], path: str | Path | None = None, section: str | None = None, **overrides: Any) -> T:
    """Defaults <- TOML file (optionally one ``[section]``) <- keyword overrides (not None)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = read_toml(p)
        if section is not None:
            data = data.get(section, {})
            if not isinstance(data, dict):
                raise ConfigError(f"[{section}] in {p} must be a table")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config (Paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def format_config(cfg: Any) -> str:
    """One line for the log: ``ClassName {"key": value, ...}``."""
    return f"{type(cfg).__name__} {json.dumps(to_dict(cfg), sort_keys=True)}"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def cli_config(cls: type[T], args: Any, section: str, **overrides: Any) -> T | None:
    """The start of every continua command-line tool, in one place: logging at
    ``args.log_level``, then defaults <- ``args.config`` TOML ``[section]`` <- flag overrides,
    then the effective config in the log. A bad config is printed (naming the key) and gives
    None, so ``main`` can return 2 instead of a traceback."""
    import logging
    import sys

    logging.basicConfig(level=str(getattr(args, "log_level", "INFO")).upper(), format=LOG_FORMAT)
    try:
        cfg = load_config(cls, getattr(args, "config", None), section, **overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None
    logging.getLogger(cls.__module__).info("effective config: %s", format_config(cfg))
    return cfg
