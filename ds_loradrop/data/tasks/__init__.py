"""Task registry."""

from ds_loradrop.data.tasks.base import SPLITS, EvalExample, Task
from ds_loradrop.data.tasks.custom import CustomTask
from ds_loradrop.data.tasks.dart import DartTask
from ds_loradrop.data.tasks.dialogsum import DialogSumTask
from ds_loradrop.data.tasks.e2e import E2ETask
from ds_loradrop.data.tasks.gsm8k import Gsm8kTask
from ds_loradrop.errors import UsageError

TASKS: dict[str, type[Task]] = {task.name: task for task in (E2ETask, DartTask, DialogSumTask, Gsm8kTask)}
TASK_NAMES = (*TASKS, CustomTask.name)

__all__ = ["SPLITS", "TASKS", "TASK_NAMES", "CustomTask", "EvalExample", "Task", "get_task"]


def get_task(name: str, data=None) -> Task:
    """The task ``name``; ``custom`` is built from the data settings ``data`` (a DataConfig)."""
    if name == CustomTask.name:
        if data is None:
            raise UsageError("--task custom needs its data settings (--dataset, ...)")
        return CustomTask(
            data.dataset, data.eval_dataset, data.dataset_format, data.stratify_by, data.eval_metric
        )
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {sorted(TASK_NAMES)}")
    return TASKS[name]()
