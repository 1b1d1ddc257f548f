"""Joint training (upper bound): at each task, train on the union of every task seen so far.

Not a continual learner (it keeps all data); it bounds what any strategy could reach with the
same side network and features.
"""

from __future__ import annotations

from typing import Any

from training.registry import register
from training.strategies.base import Strategy
from training.taskdata import TaskData


@register("joint")
class Joint(Strategy):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._seen: list[TaskData] = []

    def begin_task(self, data: TaskData) -> None:
        self._seen.append(data)

    def train_data(self, data: TaskData) -> TaskData:
        return TaskData.concat(self._seen, task=data.task)
