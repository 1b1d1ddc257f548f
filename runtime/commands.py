"""The control commands' argument schemas, one table shared by the agent and the console.

``COMMANDS`` maps each standard command to its ``Arg`` schema: the agent registers its handlers
with these (``runtime.control.ControlServer.register``) and the console sends exactly these, so
the two cannot drift. ``validate_args`` checks a request's args against a schema before a
handler sees them (reply code ``bad_args``, naming the problem). ``parse_source`` reads the
``source`` of ``learn-new-task`` (``live:SECONDS``, ``mcap:PATH[,PATH...]``, ``dataset:SPLIT``):
the console calls it to fail before sending, the agent to resolve mcap paths inside its
``recordings_dir``. ``QUIET_COMMANDS`` are the polled ones, logged at DEBUG only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

from runtime import access as acl
from runtime.errors import CommandError

QUIET_COMMANDS = frozenset({"ping", "job", "status"})  # polled: logged at DEBUG only


@dataclass(frozen=True)
class Arg:
    """One argument of a command: type, required/default, ranges, choices, custom check.

    ``min``/``max`` bound numbers by value and strings/lists by length. ``check`` raises
    ``ValueError`` with a message for anything the other fields cannot say.
    """

    type: type
    _: KW_ONLY
    required: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    items: type | None = None
    check: Callable[[Any], Any] | None = None
    help: str = ""


def _type_ok(value: Any, typ: type) -> bool:
    if typ is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def validate_args(cmd: str, schema: dict[str, Arg], args: dict[str, Any]) -> dict[str, Any]:
    """Checked keyword arguments for a handler; ``CommandError("bad_args")`` naming the problem."""

    def bad(msg: str) -> CommandError:
        return CommandError("bad_args", f"{cmd}: {msg}")

    unknown = sorted(str(k) for k in args if k not in schema)
    if unknown:
        raise bad(f"unknown argument(s) {unknown}; expected {sorted(schema)}")
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if name not in args:
            if spec.required:
                raise bad(f"missing required argument {name!r} ({spec.type.__name__})")
            out[name] = spec.default
            continue
        value = args[name]
        if not _type_ok(value, spec.type):
            raise bad(f"{name}={value!r} must be {spec.type.__name__}")
        if spec.type is float:
            value = float(value)
            if not math.isfinite(value):
                raise bad(f"{name}={value!r} must be finite")
        size = len(value) if isinstance(value, str | list | dict) else value
        if spec.min is not None and size < spec.min:
            raise bad(f"{name}={value!r} must be >= {spec.min}" + (" long" if size is not value else ""))
        if spec.max is not None and size > spec.max:
            raise bad(f"{name}={value!r} must be <= {spec.max}" + (" long" if size is not value else ""))
        if spec.choices is not None and value not in spec.choices:
            raise bad(f"{name}={value!r} must be one of {list(spec.choices)}")
        if spec.items is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if not _type_ok(item, spec.items):
                    raise bad(f"{name}[{i}]={item!r} must be {spec.items.__name__}")
        if spec.check is not None:
            try:
                spec.check(value)
            except ValueError as exc:
                raise bad(f"{name}={value!r}: {exc}") from None
        out[name] = value
    return out


def parse_source(text: str, recordings_dir: str | Path | None = None) -> dict[str, Any]:
    """``live:SECONDS`` | ``mcap:PATH[,PATH...]`` | ``dataset:SPLIT`` -> ``{"kind", "seconds"|"path"|"split"}``.
    mcap paths must lie inside the agent's ``recordings_dir`` (``runtime.access.recording_path``): the agent
    passes it and gets resolved absolute paths; a console passes None (form only)."""
    kind, sep, rest = str(text).partition(":")
    if not sep or not rest:
        raise ValueError("source must be live:SECONDS, mcap:PATH or dataset:SPLIT")
    if kind == "live":
        try:
            seconds = float(rest)
        except ValueError:
            raise ValueError(f"live:{rest} needs a number of seconds") from None
        if not 0 < seconds <= 3600:
            raise ValueError(f"live:{rest} seconds must be in (0, 3600]")
        return {"kind": "live", "seconds": seconds}
    if kind == "mcap":
        return {"kind": "mcap", "path": ",".join(acl.recording_path(p, recordings_dir) for p in rest.split(","))}
    if kind == "dataset":
        return {"kind": "dataset", "split": rest}
    raise ValueError(f"unknown source kind {kind!r}; expected live, mcap or dataset")


def _labels_check(labels: list[str]) -> None:
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    if any(not s.strip() for s in labels):
        raise ValueError("labels must be non-empty")


# The agreed argument schemas of the standard commands: the agent registers its handlers
# with these and the console sends exactly these, so the two cannot drift.
COMMANDS: dict[str, dict[str, Arg]] = {
    "status": {},
    "tasks": {},
    "learn-new-task": {
        "name": Arg(str, required=True, min=1, max=64, help="task name"),
        "labels": Arg(list, required=True, items=str, min=1, max=100, check=_labels_check),
        "source": Arg(str, required=True, max=4096, check=parse_source,
                      help="live:SECONDS | mcap:PATH | dataset:SPLIT"),
    },
    "teach": {
        "label": Arg(str, required=True, min=1, max=64),
        "seconds": Arg(float, default=5.0, min=0.1, max=600.0),
    },
    "export-skill": {"task": Arg(str, required=True, min=1, max=64, help="a learned task's name")},
    "import-skill": {"path": Arg(str, required=True, min=1, max=4096,
                                 help="a skill package in the agent's skills directory")},
    "cancel": {},
    "rollback": {},
    "save": {},
    "shutdown": {},
}
