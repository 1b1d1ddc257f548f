"""TOML-backed dataclass configs shared by every continua process.

Why here: ``common`` is the neutral home every package may import, whatever its place in the
data flow. A process declares a keyword-only dataclass with working defaults; this module
fills it from a TOML table, rejects unknown keys with a message naming them (a typo in a
robot's launch file must not silently fall back to a default), and renders the effective
config for the log at start-up.

A key that moved to a nested table is declared once on its dataclass (``moved``, old key ->
new dotted place), so an old launch file gets "[learner] epochs moved to [learner.training]
epochs" instead of a bare unknown-key error, and a state a program saved before the move can be
read with ``upgrade_moved``. ``require`` and its two shorthands are the field checks every
config's ``__post_init__`` runs, with one message format.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ContinuaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, published as tomli before it joined the stdlib
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ContinuaError, ValueError):
    """A config file or value that cannot be used; the message names the key and value."""


def require(obj: Any, names: Iterable[str], ok: Callable[[Any], bool], what: str) -> None:
    """``ValueError("Cls.name must be WHAT, got VALUE")`` for the first of ``names`` whose value
    ``ok`` refuses: the one check loop of every config's ``__post_init__``."""
    for name in names:
        value = getattr(obj, name)
        if not ok(value):
            raise ValueError(f"{type(obj).__name__}.{name} must be {what}, got {value!r}")


def require_positive(obj: Any, *names: str) -> None:
    """Each named field is > 0."""
    require(obj, names, lambda v: v > 0, "> 0")


def require_non_negative(obj: Any, *names: str) -> None:
    """Each named field is >= 0."""
    require(obj, names, lambda v: v >= 0, ">= 0")


def _join(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def _moved(cls: type) -> dict[str, str]:
    """``cls.moved``: old key -> its new place, dotted relative to ``cls``'s table."""
    return dict(getattr(cls, "moved", None) or {})


def _refuse_moved(cls: type, data: dict[str, Any], fields: dict[str, Any], table: str) -> None:
    moved = {k: v for k, v in _moved(cls).items() if k in data and k not in fields}
    if moved:
        where = f"[{table}] " if table else ""
        lines = []
        for old, new in sorted(moved.items()):
            new_table, _, new_key = new.rpartition(".")
            lines.append(f"{where}{old} moved to [{_join(table, new_table)}] {new_key}")
        raise ConfigError("; ".join(lines))


def upgrade_moved(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with the keys ``cls.moved`` names (in nested tables too) at their new
    place. For states a program wrote before a key moved (a person's TOML file gets the error
    from ``from_dict`` instead, so the file gets fixed). Both places set is a ``ConfigError``."""
    out = dict(data)
    for old, new in _moved(cls).items():
        if old not in out:
            continue
        value = out.pop(old)
        *tables, key = new.split(".")
        node = out
        for t in tables:
            node[t] = dict(node.get(t) or {})
            node = node[t]
        if key in node:
            raise ConfigError(f"{old} and its new place {new} are both set")
        node[key] = value
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints.get(f.name)) and isinstance(out.get(f.name), dict):
            out[f.name] = upgrade_moved(hints[f.name], out[f.name])
    return out


def _coerce(name: str, typ: Any, value: Any, table: str = "") -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ) and isinstance(value, dict):
        return from_dict(typ, value, prefix=f"{name}.", table=table)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        for arg in args:
            try:
                return _coerce(name, arg, value, table)
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


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", *, table: str = "") -> T:
    """Build ``cls`` from a mapping; moved keys (``cls.moved``), unknown keys and wrong types raise
    ``ConfigError``. ``table``: the TOML table ``data`` came from (``learner``), for the messages;
    a nested dataclass field is read from the nested table (``[learner.training]``)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _refuse_moved(cls, data, fields, table)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(fields)}")
    kwargs = {k: _coerce(prefix + k, hints[k], v, _join(table, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, LookupError) as exc:  # LookupError: a name not in a registry (a strategy)
        raise ConfigError(f"{f'[{table}]' if table else prefix.rstrip('.') or cls.__name__}: {exc}") from exc


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
    return from_dict(cls, data, table=section or "")


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


def add_cli_args(parser: Any, section: str) -> None:
    """The two flags ``cli_config`` reads, ``--config`` (a TOML file with a ``[section]`` table)
    and ``--log-level``, added to an ``argparse`` parser or sub-parser in one place so that no
    tool spells them differently."""
    article = "an" if section[:1] in "aeiou" else "a"
    parser.add_argument("--config", default=None, help=f"TOML file with {article} [{section}] table")
    parser.add_argument("--log-level", default="INFO")


def flag_overrides(cls: type, args: Any) -> dict[str, Any]:
    """The parsed flags named like a field of ``cls``, as ``cli_config`` overrides: a tool's
    flags cannot drift from its config, and an unset flag (None) keeps the TOML/default."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}


Failure = tuple[Any, str, int]
"""(exception class or tuple of them, stderr prefix, exit code): a failure a tool expects."""


def cli_exit(work: Callable[[], int], failures: tuple[Failure, ...]) -> int:
    """``work()``'s exit code; a failure of one of ``failures`` (the first that matches) is one
    stderr line ``<prefix><message>`` and that failure's exit code instead of a traceback, so
    every tool maps a bad key or a missing device to the same message and code."""
    caught = tuple(c for kinds, _, _ in failures for c in (kinds if isinstance(kinds, tuple) else (kinds,)))
    try:
        return work()
    except caught as exc:
        prefix, code = next((p, c) for kinds, p, c in failures if isinstance(exc, kinds))
        print(f"{prefix}{exc}", file=sys.stderr)
        return code
