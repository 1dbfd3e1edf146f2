"""DART v1.1.1 (Yale-LILY/dart): a JSON list of ``{tripleset, annotations: [{source, text}]}``, or the
WebNLG-style XML (``<entry>`` with ``<modifiedtripleset><mtriple>s | p | o</mtriple>`` and ``<lex
comment=SOURCE>text</lex>``). Both layouts are read; the JSON wins when both exist.

Training: one row per (triple set, non-empty annotation). Evaluation: one example per triple set
against all of its annotations. Stratum: the annotation's source (``webnlg``, ``e2e``, ``WikiSQL_lily``,
...), so the sample keeps the mix of domains.
"""

from __future__ import annotations

from typing import ClassVar

from ds_loradrop.data.tasks.base import EvalExample, Task
from ds_loradrop.data.tasks.readers import read_json_array, read_xml_root
from ds_loradrop.errors import UsageError

_STEM = "dart-v1.1.1-full-{}"


class DartTask(Task):
    name = "dart"
    split_files: ClassVar[dict[str, tuple[str, ...]]] = {
        split: (_STEM.format(published) + ".json", _STEM.format(published) + ".xml")
        for split, published in (("train", "train"), ("validation", "dev"), ("test", "test"))
    }
    max_new_tokens = 64
    default_max_seq_length = 256
    metrics = ("bleu", "rouge_l")

    def missing_split_hint(self, split: str) -> str:
        if split == "train":
            return (
                "; only the dev split is published beside the data here: train on it with "
                "--train_split validation and evaluate on a held-out slice with --eval_split validation "
                "--max_eval_samples N"
            )
        return ""

    def read_records(self, path: str) -> list[dict]:
        return self._read_xml(path) if path.endswith(".xml") else self._read_json(path)

    @staticmethod
    def _read_json(path: str) -> list[dict]:
        records = []
        for index, item in enumerate(read_json_array(path)):
            if not isinstance(item, dict) or "tripleset" not in item or "annotations" not in item:
                raise UsageError(f"{path}: item {index} lacks 'tripleset' or 'annotations'")
            triples = item["tripleset"]
            if not all(isinstance(t, list) and len(t) == 3 for t in triples):
                raise UsageError(
                    f"{path}: item {index} has a triple that is not [subject, predicate, object]"
                )
            annotations = [
                {"source": a.get("source", ""), "text": a.get("text") or ""} for a in item["annotations"]
            ]
            records.append({"id": f"dart-{index}", "triples": triples, "annotations": annotations})
        return records

    @staticmethod
    def _read_xml(path: str) -> list[dict]:
        records = []
        for index, entry in enumerate(read_xml_root(path).iter("entry")):
            triples = []
            for mtriple in entry.iter("mtriple"):
                parts = (mtriple.text or "").split(" | ")
                if len(parts) != 3:
                    raise UsageError(
                        f"{path}: entry {entry.get('eid', index)} has a triple without 3 parts: "
                        f"{mtriple.text!r}"
                    )
                triples.append([part.strip() for part in parts])
            annotations = [
                {"source": lex.get("comment", ""), "text": lex.text or ""} for lex in entry.iter("lex")
            ]
            records.append(
                {"id": f"dart-{entry.get('eid', index)}", "triples": triples, "annotations": annotations}
            )
        return records

    def training_examples(self, record: dict) -> list[dict]:
        prompt = self.format_prompt(record["triples"])
        return [
            {"prompt": prompt, "target": " " + a["text"].strip(), "stratum": a["source"]}
            for a in record["annotations"]
            if a["text"].strip()
        ]

    def eval_examples(self, records: list[dict], split: str) -> list[EvalExample]:
        return [
            EvalExample(
                record["id"],
                self.format_prompt(record["triples"]),
                [a["text"].strip() for a in record["annotations"] if a["text"].strip()],
            )
            for record in records
        ]

    @staticmethod
    def format_prompt(triples: list[list[str]]) -> str:
        return "Triples: " + " ; ".join(" | ".join(t) for t in triples) + "\nText:"
