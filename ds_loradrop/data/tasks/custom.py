"""Your own data (``--task custom``): a local JSON Lines / JSON / CSV / Parquet file or a hub dataset id
(``datasets.load_dataset``), in one of the common formats:

- ``prompt_completion``: ``{"prompt", "completion"}`` (TRL's prompt-completion format);
- ``alpaca``: ``{"instruction", "input" (optional), "output"}``, prompted with the Alpaca template;
- ``messages``: ``{"messages": [{"role", "content"}, ...]}``, rendered with the tokenizer's chat
  template, loss on the assistant turns only (:mod:`ds_loradrop.data.chat`); the last assistant turn is
  what evaluation generates and scores.

The stage-1 stratum is a column of the user's choice or a bucket of the target's length. The metric is
BLEU and ROUGE-L, or exact match. Splits: ``train`` is ``--dataset``, ``validation`` / ``test`` is
``--eval_dataset``; without one, the first ``--max_eval_samples`` inputs of ``--dataset`` are held out
and evaluated.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import datasets

from ds_loradrop.data import chat
from ds_loradrop.data.tasks.base import EvalExample, Task
from ds_loradrop.data.tasks.readers import read_csv, read_json_array, read_jsonl
from ds_loradrop.errors import UsageError

FORMATS = ("prompt_completion", "alpaca", "messages")
FORMAT_FIELDS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
METRIC_SETS = {"bleu_rouge": ("bleu", "rouge_l"), "exact_match": ("exact_match",)}
LENGTH_STRATUM = "length"


def length_bucket(text: str) -> str:
    """Powers of two of the word count: ``words<=1``, ``words<=2``, ``words<=4``, ..."""
    words = max(1, len(text.split()))
    return f"words<={2 ** math.ceil(math.log2(words))}"


def alpaca_prompt(instruction: str, context: str) -> str:
    if context.strip():
        return ALPACA_PROMPT.format(
            context=", paired with an input that provides further context",
            instruction=instruction.strip(),
            input=f"### Input:\n{context.strip()}\n\n",
        )
    return ALPACA_PROMPT.format(context="", instruction=instruction.strip(), input="")


class CustomTask(Task):
    name = "custom"
    split_files: ClassVar[dict[str, tuple[str, ...]]] = {}
    max_new_tokens = 128
    default_max_seq_length = 512

    def __init__(
        self,
        dataset: str | None,
        eval_dataset: str | None = None,
        dataset_format: str = "auto",
        stratify_by: str = LENGTH_STRATUM,
        eval_metric: str = "bleu_rouge",
    ):
        if dataset is None:
            raise UsageError("--task custom needs --dataset (a .jsonl/.json/.csv/.parquet file or a hub id)")
        if dataset_format not in ("auto", *FORMATS):
            raise UsageError(
                f"--dataset_format must be auto or one of {list(FORMATS)}, got {dataset_format!r}"
            )
        if eval_metric not in METRIC_SETS:
            raise UsageError(f"--eval_metric must be one of {list(METRIC_SETS)}, got {eval_metric!r}")
        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.dataset_format = dataset_format
        self.stratify_by = stratify_by
        self.metrics = METRIC_SETS[eval_metric]
        self.default_eval_split = "validation" if eval_dataset else "train"

    # --- files -----------------------------------------------------------------------------------------

    def split_path(self, data_dir: str, split: str) -> str:
        """``--dataset`` for train, ``--eval_dataset`` for validation / test (``data_dir`` is unused)."""
        source = self.dataset if split == "train" else self.eval_dataset
        flag = "--dataset" if split == "train" else "--eval_dataset"
        if source is None:
            raise UsageError(
                f"--task custom has no {split} split without --eval_dataset; evaluate a held-out slice of "
                "--dataset with --eval_split train --max_eval_samples N"
            )
        if os.path.exists(source):
            if not source.endswith(LOCAL_SUFFIXES):
                raise UsageError(
                    f"{flag} {source!r}: expected a file ending in one of {list(LOCAL_SUFFIXES)}"
                )
            return source
        if source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/")):
            raise UsageError(f"{flag} {source!r} does not exist")
        return source  # a hub dataset id

    def read_records(self, path: str, split: str = "train") -> list[dict]:
        numbered = read_numbered(path, split)
        if not numbered:
            raise UsageError(f"{path}: no records")
        data_format = self.dataset_format
        if data_format == "auto":
            data_format = detect_format(numbered[0][1], f"{path}:{numbered[0][0]}")
        return [self.parse_record(record, data_format, f"{path}:{where}") for where, record in numbered]

    def load_records(self, data_dir: str, split: str) -> list[dict]:
        return self.read_records(self.split_path(data_dir, split), split)

    def parse_record(self, record: dict, data_format: str, where: str) -> dict:
        missing = [name for name in FORMAT_FIELDS[data_format] if name not in record]
        if missing:
            raise UsageError(f"{where}: missing field(s) {missing} of the {data_format} format")
        if data_format == "messages":
            messages = chat.check_messages(record["messages"], where)
            context, answer = chat.split_last_turn(messages)
            parsed = {"prompt": chat.encode_json(context), "target": answer, "messages": messages}
        else:
            texts = {name: record.get(name, "") for name in (*FORMAT_FIELDS[data_format], "input")}
            for name, value in texts.items():
                if value is not None and not isinstance(value, str):
                    raise UsageError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
            if data_format == "alpaca":
                prompt = alpaca_prompt(texts["instruction"], texts["input"] or "")
                parsed = {"prompt": prompt, "target": texts["output"]}
            else:
                parsed = {"prompt": texts["prompt"], "target": texts["completion"]}
        if self.stratify_by == LENGTH_STRATUM:
            parsed["stratum"] = length_bucket(parsed["target"])
        elif self.stratify_by in record:
            parsed["stratum"] = str(record[self.stratify_by])
        else:
            raise UsageError(f"{where}: no column {self.stratify_by!r} (--stratify_by) in this row")
        return parsed

    # --- training and evaluation examples ----------------------------------------------------------

    def training_examples(self, record: dict) -> list[dict]:
        row = {"prompt": record["prompt"], "target": record["target"], "stratum": record["stratum"]}
        if "messages" in record:
            row["messages"] = chat.encode_json(record["messages"])
        return [row]

    def eval_examples(self, records: list[dict], split: str) -> list[EvalExample]:
        references: dict[str, list[str]] = {}
        contexts: dict[str, list[dict] | None] = {}
        for record in records:
            references.setdefault(record["prompt"], []).append(record["target"].strip())
            if "messages" in record:
                contexts[record["prompt"]] = chat.split_last_turn(record["messages"])[0]
        return [
            EvalExample(f"custom-{split}-{i}", prompt, refs, messages=contexts.get(prompt))
            for i, (prompt, refs) in enumerate(references.items())
        ]


def detect_format(record: dict, where: str) -> str:
    for name, fields in FORMAT_FIELDS.items():
        if all(field in record for field in fields):
            return name
    raise UsageError(
        f"{where}: cannot tell the format from the fields {sorted(record)}; expected 'messages', "
        "'instruction' + 'output' (alpaca) or 'prompt' + 'completion' (or pass --dataset_format)"
    )


def read_numbered(path: str, split: str) -> list[tuple[str, dict]]:
    """(where, record) pairs: ``line N`` for JSON Lines and CSV, ``item N`` / ``row N`` otherwise."""
    if path.endswith(".jsonl"):
        return [(str(line), record) for line, record in read_jsonl(path)]
    if path.endswith(".json"):
        items = read_json_array(path)
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise UsageError(f"{path}: item {i}: expected a JSON object")
        return [(f"item {i}", item) for i, item in enumerate(items)]
    if path.endswith(".csv"):
        return [(str(i + 2), row) for i, row in enumerate(read_csv(path, ()))]
    if path.endswith(".parquet"):
        table = datasets.load_dataset("parquet", data_files=path, split="train")
    else:
        try:
            table = datasets.load_dataset(path, split=split)
        except Exception as error:  # the hub client raises many kinds; all mean "cannot use this id"
            raise UsageError(f"dataset {path!r} (split {split}) cannot be loaded: {error}") from error
    return [(f"row {i}", row) for i, row in enumerate(table)]
