"""Typed errors of the demodata package: offline demo data not prepared, or not what its manifest says.

Both derive from ``DemoDataError`` (and so from ``common.errors.ContinuaError``) and stay
``FileNotFoundError`` subclasses, so a caller that only knows "the data is not there" (``except
FileNotFoundError``) treats a corrupt file like a missing one: either way the fix is to prepare
the data again.
"""

from __future__ import annotations

from common.errors import ContinuaError


class DemoDataError(ContinuaError):
    """Base of every error raised on purpose by ``demodata``."""


class DatasetNotPreparedError(DemoDataError, FileNotFoundError):
    """Offline demo data has not been prepared yet (run ``make data``)."""


class DatasetCorruptError(DatasetNotPreparedError):
    """A prepared file exists but does not match its manifest (hash, size or format)."""
