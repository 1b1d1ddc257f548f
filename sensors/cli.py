"""Start-up, Ctrl-C and exit codes shared by the sensors command-line tools.

Why one place: ``sensors.record``, ``sensors.inspect``, ``sensors.play``, ``sensors.bridge`` and
``sensors.publish`` all parse their flags, load their config (``common.config.cli_config``), run
until a limit or SIGINT/SIGTERM, print a summary and turn the failures they expect into one
stderr line and an exit code (a bad config or key: ``config error: ...`` and 2). Written once,
the tools cannot drift apart in the flags, messages and exit codes that launch scripts and
tests rely on.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from common.config import Failure, add_cli_args, cli_config, cli_exit, flag_overrides
from sensors.curve import parse_endpoint_keys
from sensors.errors import CurveKeyError

C = TypeVar("C")

CONFIG_FAILURES: tuple[Failure, ...] = ((CurveKeyError, "config error: ", 2),)
"""A key file that cannot be used is a config error, found only once the tool opens its sockets."""


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM (only possible from the main thread; tests call main()
    from other threads and stop it with --max-messages/--seconds instead)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler: Callable[[int, Any], None] = lambda signum, frame: stop.set()  # noqa: E731
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def print_json(summary: Any) -> None:
    """The last stdout line of a tool: its summary as one sorted JSON object."""
    print(json.dumps(summary, sort_keys=True))


def run_until_stopped(
    work: Callable[[threading.Event], Any],
    report: Callable[[Any], None] = print_json,
    failures: tuple[Failure, ...] = CONFIG_FAILURES,
) -> int:
    """``work(stop)`` with SIGINT/SIGTERM setting ``stop``, then ``report`` its result: exit code
    0; one of ``failures`` instead: its stderr line and exit code (``common.config.cli_exit``)."""
    stop = threading.Event()

    def body() -> int:
        with stop_on_signals(stop):
            result = work(stop)
        report(result)
        return 0

    return cli_exit(body, failures)


def run_tool(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    cls: type[C],
    section: str,
    work: Callable[[C, threading.Event], Any],
    *,
    report: Callable[[C, Any], None] | None = None,
    failures: tuple[Failure, ...] = CONFIG_FAILURES,
    curve_keys: bool = False,
    flags: argparse.ArgumentParser | None = None,
) -> int:
    """A tool's ``main`` after its own flags: ``--config``/``--log-level`` (and, with
    ``curve_keys``, ``--curve-key ENDPOINT=KEYFILE`` for ``curve_publisher_keys``) on ``flags``
    (default ``parser``; a sub-command's parser), parse ``argv``, load ``cls`` from ``[section]``
    with every flag named like a field as an override, then ``run_until_stopped(work(cfg, stop))``
    and ``report(cfg, result)`` (default: the JSON summary line). A bad config is exit code 2."""
    target = flags if flags is not None else parser
    if curve_keys:
        target.add_argument("--curve-key", action="append", default=None, metavar="ENDPOINT=KEYFILE",
                            help="accept only this publisher at ENDPOINT (CurveZMQ; repeatable)")
    add_cli_args(target, section)
    args = parser.parse_args(argv)
    extra: dict[str, Any] = {}
    if curve_keys:
        try:
            extra["curve_publisher_keys"] = parse_endpoint_keys(args.curve_key)
        except CurveKeyError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
    cfg = cli_config(cls, args, section, **flag_overrides(cls, args), **extra)
    if cfg is None:
        return 2
    show: Callable[[Any], None] = print_json if report is None else lambda result: report(cfg, result)
    return run_until_stopped(lambda stop: work(cfg, stop), show, failures)
