"""Task registry."""

from ds_loradrop.errors import UsageError
from ds_loradrop.tasks.base import SPLITS, EvalExample, Task
from ds_loradrop.tasks.dart import DartTask
from ds_loradrop.tasks.dialogsum import DialogSumTask
from ds_loradrop.tasks.e2e import E2ETask
from ds_loradrop.tasks.gsm8k import Gsm8kTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (E2ETask, DartTask, DialogSumTask, Gsm8kTask)}

__all__ = ["SPLITS", "TASKS", "EvalExample", "Task", "get_task"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]()
