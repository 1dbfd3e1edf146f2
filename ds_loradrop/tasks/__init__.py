"""Task registry."""

from ds_loradrop.errors import UsageError
from ds_loradrop.tasks.base import Task
from ds_loradrop.tasks.e2e import E2ETask

TASKS: dict[str, type[Task]] = {"e2e": E2ETask}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]()
