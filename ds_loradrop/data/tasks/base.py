"""What a task is: its published split files, how a record becomes training examples and evaluation
examples, its stratum key for the stage-1 sample, and its generation length.

Readers return plain records (dicts) and raise UsageError naming the file and line of a malformed
row; ``datasets`` does the mapping and tokenisation from there.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import datasets

from ds_loradrop.errors import UsageError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class EvalExample:
    """One input to generate for, with every reference it is scored against."""

    id: str
    prompt: str
    references: list[str]
    # A chat input: the conversation so far, rendered with the tokenizer's chat template at generation
    # (``prompt`` then only identifies it).
    messages: list[dict] | None = None


class Task(ABC):
    """A text-to-text task read from its published file layout."""

    name: str
    # split -> candidate file names (published names), first existing one wins
    split_files: dict[str, tuple[str, ...]]
    max_new_tokens: int
    metrics: tuple[str, ...]
    default_eval_split: str = "validation"
    # Prompt + target + EOS tokens that keep >= 99 % of training examples whole, measured with the
    # SmolLM2 tokenizer (49,152 pieces; Llama-2's 32,000-piece tokenizer gives similar counts):
    # E2E 100 % at 128, DART 99.9 % at 256, DialogSum 99.45 % at 768, GSM8K 99.93 % at 512.
    default_max_seq_length: int = 128
    default_lora_r: int = 8  # the paper's rank; 16 for summarisation

    def split_path(self, data_dir: str, split: str) -> str:
        """The file of ``split`` in ``data_dir``. Raises UsageError saying what is missing."""
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if not os.path.isdir(data_dir):
            raise UsageError(f"data directory {data_dir!r} for task {self.name!r} does not exist")
        candidates = self.split_files.get(split, ())
        if not candidates:
            raise UsageError(f"task {self.name!r} publishes no {split} split{self.missing_split_hint(split)}")
        for name in candidates:
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                return path
        names = " or ".join(repr(os.path.join(data_dir, name)) for name in candidates)
        raise UsageError(
            f"{split} file {names} for task {self.name!r} does not exist{self.missing_split_hint(split)}"
        )

    def missing_split_hint(self, split: str) -> str:
        return ""

    @abstractmethod
    def read_records(self, path: str) -> list[dict]:
        """Parse one published split file into records."""

    @abstractmethod
    def training_examples(self, record: dict) -> list[dict]:
        """``{"prompt", "target", "stratum"}`` training examples of one record (one per reference)."""

    @abstractmethod
    def eval_examples(self, records: list[dict], split: str) -> list[EvalExample]:
        """One example per distinct input, with all of its references, in file order."""

    def load_records(self, data_dir: str, split: str) -> list[dict]:
        path = self.split_path(data_dir, split)
        records = self.read_records(path)
        if not records:
            raise UsageError(f"{path}: no records")
        return records

    def load_train(
        self,
        data_dir: str,
        max_samples: int | None = None,
        split: str = "train",
        exclude_prompts: set[str] = frozenset(),
    ) -> datasets.Dataset:
        """Training examples (``prompt``, ``target``, ``stratum``) of ``split``: the first ``max_samples``
        examples, leaving out those whose prompt is in ``exclude_prompts`` (a held-out evaluation slice)."""
        examples = self.first_training_examples(data_dir, split, max_samples, exclude_prompts)
        return datasets.Dataset.from_list(examples)

    def first_training_examples(
        self,
        data_dir: str,
        split: str,
        max_samples: int | None = None,
        exclude_prompts: set[str] = frozenset(),
    ) -> list[dict]:
        """:meth:`load_train`'s examples as the parsed dicts (not to be changed); a UsageError when none."""
        examples = self.every_training_example(data_dir, split)
        if exclude_prompts:
            examples = [ex for ex in examples if ex["prompt"] not in exclude_prompts]
        if max_samples is not None:
            examples = examples[:max_samples]
        if not examples:
            raise UsageError(f"task {self.name!r}: no training examples in the {split} split of {data_dir!r}")
        return examples

    def every_training_example(self, data_dir: str, split: str) -> list[dict]:
        """Every training example of ``split``, in file order. Parsed once per task object and file version:
        a run reads its training split three times (the checks, the training examples, a random preset's
        tokenizer text) and its validation split as held-out examples in between. Callers must not change
        the list or its dicts."""
        path = self.split_path(data_dir, split)
        try:
            stamp = os.stat(path)
            version = (stamp.st_mtime_ns, stamp.st_size)
        except OSError:  # not a local file (a hub dataset): one version for the task object's life
            version = None
        key = (path, version)  # the split's file names the data directory and split
        parsed = self.__dict__.setdefault("_parsed_examples", {})
        if key not in parsed:
            records = self.load_records(data_dir, split)
            for stale in [other for other in parsed if other[0] == path]:  # one version kept per file
                del parsed[stale]
            parsed[key] = [ex for record in records for ex in self.training_examples(record)]
        return parsed[key]

    def load_eval(self, data_dir: str, split: str, max_samples: int | None = None) -> list[EvalExample]:
        examples = self.eval_examples(self.load_records(data_dir, split), split)
        if max_samples is not None:
            examples = examples[:max_samples]
        if not examples:
            raise UsageError(
                f"task {self.name!r}: no evaluation examples in the {split} split of {data_dir!r}"
            )
        return examples

    def training_text(self, data_dir: str, max_examples: int = 20000, split: str = "train") -> list[str]:
        """Text to train a tokenizer on: prompts and targets of the first training examples."""
        examples = self.first_training_examples(data_dir, split, max_examples)
        return [text for ex in examples for text in (ex["prompt"], ex["target"])]


def require_fields(record: dict, fields: tuple[str, ...], path: str, line: int) -> None:
    missing = [name for name in fields if name not in record]
    if missing:
        raise UsageError(f"{path}:{line}: missing field(s) {missing}")
