"""GSM8K (openai/grade-school-math): JSON lines ``question``, ``answer``; the worked answer ends with
``#### <final answer>`` (an integer, possibly with thousands separators such as ``1,080``).

Training: question -> the full worked answer. Evaluation reference: the final answer. Stratum: the
number of solution lines (reasoning steps, 8+ together), so the sample keeps the difficulty mix.
"""

from __future__ import annotations

from typing import ClassVar

from ds_loradrop.data.tasks.base import EvalExample, Task, require_fields
from ds_loradrop.data.tasks.readers import read_jsonl
from ds_loradrop.errors import UsageError

ANSWER_MARK = "####"


def final_answer(answer: str) -> str:
    """The text after ``####``, stripped."""
    return answer.split(ANSWER_MARK)[-1].strip()


class Gsm8kTask(Task):
    name = "gsm8k"
    split_files: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("train.jsonl",), "test": ("test.jsonl",)}
    max_new_tokens = 256
    default_max_seq_length = 512
    metrics = ("accuracy",)
    default_eval_split = "test"

    def missing_split_hint(self, split: str) -> str:
        if split == "validation":
            return (
                "; GSM8K has train and test only: evaluate on --eval_split test, or on a held-out slice "
                "of train"
            )
        return ""

    def read_records(self, path: str) -> list[dict]:
        records = []
        for index, (line, record) in enumerate(read_jsonl(path)):
            require_fields(record, ("question", "answer"), path, line)
            if ANSWER_MARK not in record["answer"]:
                raise UsageError(f"{path}:{line}: answer has no '{ANSWER_MARK} <final answer>' line")
            records.append(
                {"id": f"gsm8k-{index}", "question": record["question"], "answer": record["answer"]}
            )
        return records

    def training_examples(self, record: dict) -> list[dict]:
        steps = min(record["answer"].strip().count("\n"), 8)
        return [
            {
                "prompt": self.format_prompt(record["question"]),
                "target": " " + record["answer"].strip(),
                "stratum": f"steps={steps}",
            }
        ]

    def eval_examples(self, records: list[dict], split: str) -> list[EvalExample]:
        return [
            EvalExample(r["id"], self.format_prompt(r["question"]), [final_answer(r["answer"])])
            for r in records
        ]

    @staticmethod
    def format_prompt(question: str) -> str:
        return f"Question: {question.strip()}\nAnswer:"
