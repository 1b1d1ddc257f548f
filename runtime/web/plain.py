"""Strict JSON for what the agent sends, shared by the page's WebSocket and the Foxglove channels.

Why strict: ``json.dumps`` writes ``NaN`` and ``Infinity`` for non-finite floats, which neither a
browser's ``JSON.parse`` nor the Foxglove app accepts, so one odd ``novelty`` would break a
message. Here they become ``null``, numpy scalars become numbers, bytes become text, and a value
with no JSON form is dropped rather than failing the whole message.
"""

from __future__ import annotations

import json
import math
from typing import Any

_DROP = object()  # marker: a value that has no JSON form


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON, or ``_DROP`` (only ever inside a container, where it is left out)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        out = {str(k): json_safe(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        items = [json_safe(v) for v in value]
        return [v for v in items if v is not _DROP]
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays
    if callable(item):
        try:
            plain = item()
        except (TypeError, ValueError):
            return _DROP
        return _DROP if plain is value else json_safe(plain)
    return _DROP


def dumps(value: Any) -> str:
    """``json_safe(value)`` as text; ``allow_nan=False`` fails loudly should anything slip through."""
    return json.dumps(json_safe(value), allow_nan=False)
