"""Task registry."""

from ds_loradrop.data.tasks.base import SPLITS, EvalExample, Task
from ds_loradrop.data.tasks.dart import DartTask
from ds_loradrop.data.tasks.dialogsum import DialogSumTask
from ds_loradrop.data.tasks.e2e import E2ETask
from ds_loradrop.data.tasks.gsm8k import Gsm8kTask
from ds_loradrop.errors import UsageError

TASKS: dict[str, type[Task]] = {task.name: task for task in (E2ETask, DartTask, DialogSumTask, Gsm8kTask)}

__all__ = ["SPLITS", "TASKS", "EvalExample", "Task", "get_task"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]()
