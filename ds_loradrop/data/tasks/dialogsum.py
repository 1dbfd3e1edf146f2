"""DialogSum (cylnlp/dialogsum): JSON lines ``fname``, ``dialogue``, ``summary``, ``topic``; the test
split has ``summary1``, ``summary2``, ``summary3`` (three references) instead of ``summary``.

Stratum: the dialogue's number of turns in buckets (2-4, 5-8, 9-12, 13-16, 17+), so the sample keeps
the length mix (topics are nearly unique per dialogue and make no strata).
"""

from __future__ import annotations

from typing import ClassVar

from ds_loradrop.data.tasks.base import EvalExample, Task, require_fields
from ds_loradrop.data.tasks.readers import read_jsonl
from ds_loradrop.errors import UsageError

_TEST_SUMMARIES = ("summary1", "summary2", "summary3")


def turn_bucket(dialogue: str) -> str:
    turns = dialogue.count("\n") + 1
    for upper in (4, 8, 12, 16):
        if turns <= upper:
            return f"turns<={upper}"
    return "turns>16"


class DialogSumTask(Task):
    name = "dialogsum"
    split_files: ClassVar[dict[str, tuple[str, ...]]] = {
        split: (f"dialogsum.{published}.jsonl",)
        for split, published in (("train", "train"), ("validation", "dev"), ("test", "test"))
    }
    max_new_tokens = 96
    default_max_seq_length = 768
    default_lora_r = 16  # the paper's rank for summarisation
    metrics = ("bleu", "rouge_l")

    def read_records(self, path: str) -> list[dict]:
        records = []
        for line, record in read_jsonl(path):
            require_fields(record, ("fname", "dialogue"), path, line)
            if "summary" in record:
                summaries = [record["summary"]]
            elif all(name in record for name in _TEST_SUMMARIES):
                summaries = [record[name] for name in _TEST_SUMMARIES]
            else:
                raise UsageError(
                    f"{path}:{line}: missing field 'summary' (or 'summary1'..'summary3' in the test layout)"
                )
            records.append(
                {
                    "id": record["fname"],
                    "dialogue": record["dialogue"],
                    "summaries": [s.strip() for s in summaries],
                }
            )
        return records

    def training_examples(self, record: dict) -> list[dict]:
        prompt = self.format_prompt(record["dialogue"])
        return [
            {"prompt": prompt, "target": " " + summary, "stratum": turn_bucket(record["dialogue"])}
            for summary in record["summaries"]
            if summary
        ]

    def eval_examples(self, records: list[dict], split: str) -> list[EvalExample]:
        return [EvalExample(r["id"], self.format_prompt(r["dialogue"]), r["summaries"]) for r in records]

    @staticmethod
    def format_prompt(dialogue: str) -> str:
        return f"Dialogue:\n{dialogue.strip()}\nSummary:"
