"""E2E NLG (tuetschek/e2e-dataset v1.0.0): CSV with columns ``mr`` and ``ref``.

One row per (meaning representation, reference) pair. For training, each row is one example: prompt =
the MR, target = that reference. Stratum = the set of attributes the MR mentions (e.g.
``area|eatType|food|name``), so the stage-1 sample keeps the mix of MR shapes of the full set.
"""

from __future__ import annotations

import re

import datasets

from ds_loradrop.tasks.base import Task, require_columns

_ATTRIBUTE = re.compile(r"([^,\[\]]+)\[")


def mr_attributes(mr: str) -> list[str]:
    """``"name[X], area[city centre]"`` -> ``["area", "name"]`` (sorted, unique)."""
    return sorted({name.strip() for name in _ATTRIBUTE.findall(mr)})


class E2ETask(Task):
    name = "e2e"
    train_file = "trainset.csv"
    columns = ("mr", "ref")

    def read_train(self, path: str) -> datasets.Dataset:
        # Every field as text; no "NA"/"None" -> NaN conversion.
        raw = datasets.load_dataset(
            "csv",
            data_files=path,
            split="train",
            keep_default_na=False,
            na_filter=False,
        )
        require_columns(raw.column_names, self.columns, path)
        return raw

    def to_example(self, row: dict) -> dict:
        return {
            "prompt": self.format_prompt(row["mr"]),
            "target": " " + row["ref"].strip(),
            "stratum": "|".join(mr_attributes(row["mr"])),
        }

    @staticmethod
    def format_prompt(mr: str) -> str:
        return f"Meaning representation: {mr.strip()}\nDescription:"
