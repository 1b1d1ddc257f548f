"""A robot's install, made here: the packages named in ``CONTINUA_ABSENT`` cannot be imported.

Put this folder on ``PYTHONPATH`` and every Python process started with that environment (the
agent, its learning worker) sees ``ModuleNotFoundError`` for those top-level packages, exactly as
when they are not installed (``pip install .`` without the ``export`` extra). Each lookup of one of them
(an import, or a probe such as torch's ``find_spec`` of optional packages) is appended to
``CONTINUA_ABSENT_LOG``.
"""

from __future__ import annotations

import os
import sys

_ABSENT = {n.strip() for n in os.environ.get("CONTINUA_ABSENT", "").split(",") if n.strip()}
_LOG = os.environ.get("CONTINUA_ABSENT_LOG")


class _Hidden:
    """A finder of ``sys.meta_path`` that finds nothing of the absent packages: with every finder
    wrapped, ``import X`` raises ModuleNotFoundError and ``importlib.util.find_spec(X)`` is None."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _ABSENT:
            if _LOG:
                with open(_LOG, "a") as f:
                    f.write(f"{os.getpid()} {name}\n")
            return None
        find = getattr(self._inner, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


if _ABSENT:
    sys.meta_path[:] = [_Hidden(f) for f in sys.meta_path]
