"""Worker threads started and joined the one way every long-lived component does it.

Why daemon threads with a bounded join: a component's ``stop`` sets its stop event and then
waits for its threads, but a thread stuck in a blocking call must not hang the process at exit,
so the wait is bounded (5 s) and the thread is a daemon that dies with the process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

JOIN_TIMEOUT_S = 5.0


def start_daemon(target: Callable[[], object], name: str) -> threading.Thread:
    """A started daemon thread running ``target()``, named for logs and ``py-spy``."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def join_all(threads: Iterable[threading.Thread | None], timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Join each thread (``None``: never started) for at most ``timeout_s`` each."""
    for thread in threads:
        if thread is not None:
            thread.join(timeout=timeout_s)
