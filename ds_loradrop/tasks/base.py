"""What a task is: where its files are, how a row becomes a prompt and a target, and its strata."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import datasets

from ds_loradrop.errors import UsageError

# Columns every task's training dataset has after `Task.load_train`.
TRAIN_COLUMNS = ("prompt", "target", "stratum")


class Task(ABC):
    """A text-to-text task read from its published file layout.

    Subclasses define ``name``, ``train_file`` and how rows map to ``prompt`` / ``target`` /
    ``stratum`` (the key of the stratified stage-1 sample).
    """

    name: str
    train_file: str

    def train_path(self, data_dir: str) -> str:
        if not os.path.isdir(data_dir):
            raise UsageError(f"data directory {data_dir!r} for task {self.name!r} does not exist")
        path = os.path.join(data_dir, self.train_file)
        if not os.path.isfile(path):
            raise UsageError(f"training file {path!r} for task {self.name!r} does not exist")
        return path

    @abstractmethod
    def read_train(self, path: str) -> datasets.Dataset:
        """Read the published training file into a Dataset with the task's raw columns."""

    @abstractmethod
    def to_example(self, row: dict) -> dict:
        """Map one raw row to ``{"prompt", "target", "stratum"}``."""

    def load_train(self, data_dir: str, max_samples: int | None = None) -> datasets.Dataset:
        """Training rows as ``prompt``, ``target``, ``stratum`` (first ``max_samples`` rows if given)."""
        raw = self.read_train(self.train_path(data_dir))
        if max_samples is not None:
            raw = raw.select(range(min(max_samples, len(raw))))
        if len(raw) == 0:
            raise UsageError(f"task {self.name!r}: no training rows in {data_dir!r}")
        return raw.map(
            self.to_example, remove_columns=raw.column_names, keep_in_memory=True, desc=f"{self.name}: prompts"
        )

    def training_text(self, data_dir: str, max_rows: int = 20000) -> list[str]:
        """Text to train a tokenizer on: prompts and targets of the first rows."""
        examples = self.load_train(data_dir, max_rows)
        return [text for ex in examples for text in (ex["prompt"], ex["target"])]


def require_columns(found: list[str], required: tuple[str, ...], path: str) -> None:
    missing = [column for column in required if column not in found]
    if missing:
        raise UsageError(f"{path}: missing column(s) {missing}; found {found}")
