"""Experience replay strategy: new samples trained together with replayed ones from the buffer.

Experience replay (ER): every minibatch is the new samples plus as many replayed from the
class-balanced buffer; cross-entropy over both. The buffer is filled at the end of each task."""

from __future__ import annotations

from training.registry import register
from training.strategies.base import Strategy


@register("replay")
class Replay(Strategy):
    """The base loop already mixes ``replay_batch`` buffered samples in when ``uses_buffer``."""

    uses_buffer = True
