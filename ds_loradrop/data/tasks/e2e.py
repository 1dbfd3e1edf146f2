"""E2E NLG (tuetschek/e2e-dataset v1.0.0): CSV with columns ``mr`` and ``ref``.

One row per (meaning representation, reference) pair. Training: each row is one example (prompt = the
MR, target = that reference). Evaluation: one example per distinct MR (grouped by the exact string, in
order of first appearance) against all of its references. Stratum: the set of attributes the MR
mentions (e.g. ``area|eatType|food|name``), so the stage-1 sample keeps the mix of MR shapes.
"""

from __future__ import annotations

import re
from typing import ClassVar

from ds_loradrop.data.tasks.base import EvalExample, Task
from ds_loradrop.data.tasks.readers import read_csv

_ATTRIBUTE = re.compile(r"([^,\[\]]+)\[")


def mr_attributes(mr: str) -> list[str]:
    """``"name[X], area[city centre]"`` -> ``["area", "name"]`` (sorted, unique)."""
    return sorted({name.strip() for name in _ATTRIBUTE.findall(mr)})


class E2ETask(Task):
    name = "e2e"
    split_files: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("trainset.csv",),
        "validation": ("devset.csv",),
        "test": ("testset_w_refs.csv",),
    }
    max_new_tokens = 64
    metrics = ("bleu", "rouge_l")

    def read_records(self, path: str) -> list[dict]:
        return read_csv(path, ("mr", "ref"))

    def training_examples(self, record: dict) -> list[dict]:
        return [
            {
                "prompt": self.format_prompt(record["mr"]),
                "target": " " + record["ref"].strip(),
                "stratum": "|".join(mr_attributes(record["mr"])),
            }
        ]

    def eval_examples(self, records: list[dict], split: str) -> list[EvalExample]:
        references: dict[str, list[str]] = {}
        for record in records:
            references.setdefault(record["mr"], []).append(record["ref"].strip())
        return [
            EvalExample(f"e2e-{split}-{i}", self.format_prompt(mr), refs)
            for i, (mr, refs) in enumerate(references.items())
        ]

    @staticmethod
    def format_prompt(mr: str) -> str:
        return f"Meaning representation: {mr.strip()}\nDescription:"
