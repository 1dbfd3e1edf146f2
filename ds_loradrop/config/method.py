"""The sections of a run configuration that say how to adapt the model: which fine-tuning method, the
adapters (LoRA and the paper's other baselines) and LoRA-drop's decisions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ds_loradrop.errors import UsageError

# The other baselines, as the LoRA-drop paper runs them (its A.1): VeRA r = 512, Tied-LoRA r = 56,
# Sparse Adapter at sparsity 0.5 with SNIP (scored on 320 examples, as its reference code does).
DEFAULT_VERA_R = 512
DEFAULT_VERA_D_INITIAL = 0.1
DEFAULT_TIED_LORA_R = 56
DEFAULT_SPARSITY = 0.5
DEFAULT_SNIP_EXAMPLES = 320


@dataclass
class FinetuningConfig:
    """Which fine-tuning method the run trains (the other sections hold that method's settings)."""

    # The values are the registered methods (ds_loradrop.method.registry); --help lists them.
    method: str = field(default="loradrop", metadata={"help": "The fine-tuning method."})


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
    stop_after_stage1: bool = field(
        default=False,
        metadata={
            "help": "Stop once stage 1 has written plan.json and stage1_adapter/ (e.g. to inspect the layout "
            "or feed launch/importance.py); the same command with --resume auto later trains stage 2 from "
            "that plan without rerunning stage 1."
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
