"""The one error base of continua: a message, an optional machine-readable code and fix, one str rule.

Every package has exactly one base deriving from :class:`ContinuaError` (``SensorsError``,
``DemoDataError``, ``ExportError``, ``TrainingError``, ``ContinuaRuntimeError``; ``common`` raises
``ContinuaError`` subclasses directly, e.g. ``ConfigError``), and every error a package raises on
purpose derives from that base, so ``except ContinuaError`` catches exactly "continua refused" and
lets programming errors surface. Errors that are also a builtin kind keep it as a mixin
(``class WireError(SensorsError, ValueError)``), so ``except ValueError`` still catches them.

The shape, the same for all of them:

- ``message``: for humans, naming the offending value and what was expected;
- ``code``: a short, stable string a caller can branch on or count by (``"bad_args"``,
  ``"payload_size"``...), or None;
- ``fix``: what to do about it (``"run `make data`"``), or None.

``str(err)`` is ``"<code>: <message>; <fix>"``, leaving out the parts that are None, so an error
without code and fix prints exactly its message. Subclasses with their own constructor arguments
(``WireError(reason, detail)``) map them onto this shape in one ``super().__init__`` call instead
of each formatting its own string and storing its own copies.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ContinuaError"]


class ContinuaError(Exception):
    """Base of every error continua raises on purpose; see the module docstring for the shape."""

    def __init__(self, message: Any = "", *, code: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.fix = fix

    def __str__(self) -> str:
        text = str(self.message)
        if self.code:
            text = f"{self.code}: {text}"
        return f"{text}; {self.fix}" if self.fix else text

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take their own positional arguments (WireError(reason, detail)), so the default
        # "call the class with self.args" cannot rebuild them; restore the attributes instead, which
        # lets any of them cross a process boundary (multiprocessing, a process pool) intact.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[ContinuaError], args: tuple[Any, ...], state: dict[str, Any]) -> ContinuaError:
    err = cls.__new__(cls, *args)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err
