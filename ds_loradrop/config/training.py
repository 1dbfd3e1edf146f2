"""The sections of a run configuration that say how to train, evaluate and track."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ds_loradrop.config.sections import (
    DEFAULT_GRADIENT_ACCUMULATION_STEPS,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_MICRO_BATCH_SIZE,
    QUICK_START_EVAL_SAMPLES,
)
from ds_loradrop.errors import UsageError


@dataclass
class TrainConfig:
    output_dir: str = field(default="outputs/default", metadata={"help": "Where the run writes its files."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output directory that already holds a run."}
    )
    ds_config: str = field(default="ds_configs/zero3.json", metadata={"help": "DeepSpeed JSON config."})
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batch per rank; fills 'auto' in the JSON "
            f"(default {DEFAULT_MICRO_BATCH_SIZE}); must agree with a concrete JSON value."
        },
    )
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches per optimizer step; fills 'auto' in the JSON "
            f"(default {DEFAULT_GRADIENT_ACCUMULATION_STEPS}); must agree with a concrete JSON value."
        },
    )
    max_grad_norm: float | None = field(
        default=None,
        metadata={
            "help": "Gradient clipping; fills 'auto' in the JSON "
            f"(default {DEFAULT_MAX_GRAD_NORM}); must agree with a concrete JSON value."
        },
    )
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = field(
        default="linear", metadata={"help": "Learning-rate schedule after warmup (per stage)."}
    )
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Share of each stage's steps used for warmup."}
    )
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs of the final (stage-2) fine-tuning."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Activation checkpointing of every decoder layer (non-reentrant, so it works with a "
            "shared adapter under ZeRO-2/3): recompute activations in backward instead of keeping them."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Build global batches from examples of similar length (less padding)."},
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Each micro-batch as one sequence without padding, attention kept inside each example "
            "by per-example position ids, LM-head logits only at target positions (same loss; needs a "
            "model that reads packed position ids: Llama-class models in transformers do)."
        },
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Cap on optimizer steps per stage (for short runs); stage 1 takes --stage1_max_steps "
            "instead when that is given."
        },
    )
    save_steps: int | None = field(
        default=None,
        metadata={
            "help": "Write a DeepSpeed checkpoint every N optimizer steps and at the end of each stage."
        },
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints (default: all)."}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "'auto': continue from the newest complete checkpoint in --output_dir (or start if "
            "there is none); or the path of a checkpoint. A finished stage 1 is never rerun."
        },
    )
    eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Every N optimizer steps: the validation loss (every stage; also at each stage's end) "
            "and, in the final stage, the evaluation by generation (see --generate_at_eval_steps)."
        },
    )
    generate_at_eval_steps: bool = field(
        default=True,
        metadata={
            "help": "Evaluate by generation at every --eval_steps of the final stage (false: only the "
            "validation loss there; generation still runs once after training)."
        },
    )
    save_best_by: str | None = field(
        default=None,
        metadata={
            "help": "Keep the final stage's best adapter in <output_dir>/best_adapter (with best.json) by "
            "this metric, measured at every --eval_steps and at the end: val_loss (lower is better) or a "
            "generation metric of the task (bleu, rouge_l, accuracy, exact_match; higher is better)."
        },
    )
    eval_base_model: bool = field(
        default=True,
        metadata={
            "help": "Before training, evaluate the model as loaded (every adapter starts at B = 0, so it "
            "computes the base model) on the same inputs, and report the scores side by side."
        },
    )
    logging_steps: int = field(default=20, metadata={"help": "Log loss and learning rate every N steps."})
    collective_timeout_minutes: float = field(
        default=10.0,
        metadata={
            "help": "How long a collective waits for a silent peer before the job fails (torch's gloo "
            "default is 30 minutes). Raise it if a rank legitimately works alone for longer."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed for sampling, shuffling and adapter init."})

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name} must be > 0, got {value}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise UsageError(f"--max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"--learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not (math.isfinite(self.collective_timeout_minutes) and self.collective_timeout_minutes > 0):
            raise UsageError(
                f"--collective_timeout_minutes must be > 0, got {self.collective_timeout_minutes}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UsageError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.num_train_epochs <= 0:
            raise UsageError(f"--num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UsageError(f"--max_steps must be > 0, got {self.max_steps}")
        for name in ("save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name} must be > 0, got {value}")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise UsageError(f"--eval_steps must be > 0, got {self.eval_steps}")
        if self.logging_steps <= 0:
            raise UsageError(f"--logging_steps must be > 0, got {self.logging_steps}")


@dataclass
class EvalConfig:
    """How to evaluate by generation (training-time evaluation and launch/evaluate.py)."""

    max_eval_samples: int | None = field(
        default=QUICK_START_EVAL_SAMPLES,
        metadata={"help": "Evaluate the first N distinct inputs of the split; 0 = all of them."},
    )
    eval_generation: Literal["auto", "gathered", "synced"] = field(
        default="auto",
        metadata={
            "help": "Under ZeRO-3: 'gathered' materialises the full weights on every rank once per "
            "evaluation, 'synced' generates from partitions with synced_gpus=True, 'auto' gathers when "
            "the model fits in memory."
        },
    )
    eval_batch_size: int = field(
        default=32,
        metadata={
            "help": "Prompts per generate() call per rank (generation of a small model on a CPU is "
            "memory-bound: 32 measured 1.8x faster than 16 for SmolLM2-135M here)."
        },
    )
    num_beams: int = field(default=1, metadata={"help": "1 = greedy decoding; more = beam search."})
    val_loss_samples: int = field(
        default=200,
        metadata={
            "help": "Rows (input + reference) of the evaluated inputs scored for the validation loss at "
            "every --eval_steps and at the end of each stage; 0 = no validation loss."
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens to generate (default: the task's: 64 E2E/DART, 96 DialogSum, 256 GSM8K)."},
    )

    def __post_init__(self) -> None:
        if self.val_loss_samples < 0:
            raise UsageError(
                f"--val_loss_samples must be >= 0 (0 = no validation loss), got {self.val_loss_samples}"
            )
        if self.max_eval_samples is not None and self.max_eval_samples < 0:
            raise UsageError(f"--max_eval_samples must be >= 0 (0 = all inputs), got {self.max_eval_samples}")
        if self.max_eval_samples == 0:
            self.max_eval_samples = None
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise UsageError(f"--max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.eval_batch_size <= 0:
            raise UsageError(f"--eval_batch_size must be > 0, got {self.eval_batch_size}")
        if self.num_beams <= 0:
            raise UsageError(f"--num_beams must be > 0, got {self.num_beams}")


@dataclass
class TrackingConfig:
    report_to: Literal["mlflow", "none"] = field(
        default="mlflow", metadata={"help": "Track the run in MLflow (from the global rank 0 only), or not."}
    )
    mlflow_tracking_uri: str | None = field(
        default=None,
        metadata={
            "help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default local store, "
            "mlflow.db in the working directory)."
        },
    )
    mlflow_experiment: str = field(default="ds-loradrop", metadata={"help": "MLflow experiment name."})
    run_name: str | None = field(
        default=None, metadata={"help": "MLflow run name (default: MLflow picks one)."}
    )
    mlflow_fallback_local: bool = field(
        default=False,
        metadata={
            "help": "If the tracking server fails, move the run to a local store <output_dir>/mlflow.db "
            "instead of only going on without tracking."
        },
    )
    mlflow_system_metrics: bool = field(
        default=True,
        metadata={
            "help": "Log MLflow's system metrics (CPU, memory, disk, network; GPU where one is found) every "
            "$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10), from the global rank 0's node."
        },
    )
    mlflow_log_model: bool = field(
        default=True,
        metadata={
            "help": "At the end of the run log the trained model as an MLflow model (transformers flavour, "
            "task text-generation): the PEFT export with a reference to the base model, or the full "
            "checkpoint for --method full; load it with mlflow.pyfunc.load_model('runs:/<run id>/model')."
        },
    )
    mlflow_register_model: str | None = field(
        default=None,
        metadata={"help": "Also register the logged model as a new version of this registered model."},
    )

    def __post_init__(self) -> None:
        if self.mlflow_register_model is not None:
            if not self.mlflow_register_model.strip():
                raise UsageError("--mlflow_register_model needs a model name")
            if self.report_to != "mlflow":
                raise UsageError("--mlflow_register_model needs MLflow tracking (--report_to mlflow)")
            if not self.mlflow_log_model:
                raise UsageError(
                    "--mlflow_register_model registers the logged model: drop --mlflow_log_model false"
                )
