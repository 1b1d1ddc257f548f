"""Typed errors of the runtime package.

One family per failure so that callers catch exactly what they can survive: a console
catches ``ControlTimeoutError`` and ``RemoteError``, a command handler raises
``CommandError`` (or ``BusyError``) to send a clean error reply instead of an internal
error, and the agent catches ``CheckpointWriteError`` to keep its state in memory when the
disk is full.
"""

from __future__ import annotations

from common.errors import ContinuaError


class ContinuaRuntimeError(ContinuaError):
    """Base of every error raised on purpose by ``runtime``."""


class CommandError(ContinuaRuntimeError):
    """Raised by a command handler: becomes ``{"ok": false, "error": {"code", "message"}}``.

    ``code`` is a short, stable string a console can branch on (``"bad_args"``,
    ``"busy"``, ``"not_found"``...); ``message`` is for humans.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class BusyError(CommandError):
    """A long-running job is already active (one ``learn-new-task`` at a time)."""

    def __init__(self, message: str) -> None:
        super().__init__("busy", message)


class JobCancelledError(ContinuaRuntimeError):
    """Raised inside a job's function by ``JobHandle.check_cancelled`` to stop it early."""


class ControlError(ContinuaRuntimeError):
    """Client side: a control request did not produce a successful reply."""


class ControlTimeoutError(ControlError):
    """No reply within the timeout: agent not running, wrong endpoint, or key not allowed.

    With CurveZMQ a rejected key gets no answer at all (by design), so a timeout is also
    what an operator whose key is not on the allow-list sees; the message says so.
    """


class RemoteError(ControlError):
    """The agent answered ``ok: false``; ``code`` and ``message`` come from the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class KeyFileError(ContinuaRuntimeError):
    """A CurveZMQ key file or key directory is missing or unusable (or a secret key others can read)."""


class EndpointError(ContinuaRuntimeError):
    """An endpoint the agent must bind is unusable: in use, not an address of this machine, or
    not a loopback address while ``--insecure`` is on. The agent exits 2 with this one line."""


class CheckpointError(ContinuaRuntimeError):
    """Base of checkpoint store errors."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, read-only directory...); nothing half-written was left.

    The previous good checkpoint is untouched; the caller keeps its state in memory.
    """


class NoCheckpointError(CheckpointError):
    """No loadable checkpoint (none saved yet, or all corrupt: see ``corrupt``)."""

    def __init__(self, message: str, corrupt: list | None = None) -> None:
        super().__init__(message)
        self.corrupt = list(corrupt or [])
