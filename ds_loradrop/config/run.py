"""Typed run configuration: one dataclass per concern, checked on construction.

The run configuration owns *what to learn* (model, data, LoRA, LoRA-drop, learning rate, schedule).
The DeepSpeed JSON owns *how to distribute* (ZeRO stage, precision, micro-batch, accumulation,
clipping). The three batch/clipping fields below default to ``None`` = "not given on the command
line": a JSON value of ``"auto"`` is then filled from the documented default, a concrete JSON value is
taken as is, and a CLI value that contradicts a concrete JSON value is an error (see
:mod:`ds_loradrop.training.ds_config`).

Each field's help text lives once, in ``metadata["help"]``; ``transformers.HfArgumentParser`` turns
the dataclasses into the command line of ``launch/train.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ds_loradrop.config.files import with_moved_keys
from ds_loradrop.config.method import (
    DEFAULT_SNIP_EXAMPLES,
    DEFAULT_SPARSITY,
    DEFAULT_TIED_LORA_R,
    DEFAULT_VERA_D_INITIAL,
    DEFAULT_VERA_R,
    METHOD_FLAGS,
    DropConfig,
    FinetuningConfig,
    LoraConfig,
)
from ds_loradrop.config.sections import DataConfig, ModelConfig
from ds_loradrop.config.training import EvalConfig, TrackingConfig, TrainConfig
from ds_loradrop.errors import UsageError


@dataclass
class RunConfig:
    """Everything one training run was asked to do, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetuning: FinetuningConfig = field(default_factory=FinetuningConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    drop: DropConfig = field(default_factory=DropConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        """Fill what defaults to the task's value (sequence length, LoRA rank) and alpha = 2 r."""
        task = self.data.build_task()
        if self.data.max_seq_length is None:
            self.data.max_seq_length = task.default_max_seq_length
        self._check_and_fill_baseline_settings()
        method, planned = self.finetuning.method, self.drop.plan is not None
        if self.drop.stop_after_stage1 and (method != "loradrop" or planned):
            raise UsageError(
                "--stop_after_stage1 needs a stage 1: --method loradrop without --plan "
                f"(got --method {method}{' with --plan' if planned else ''})"
            )
        # VeRA and Tied-LoRA have their own rank (VeRA no alpha): LoRA's stay unset, so that a saved
        # run_config.json reads back without "--lora_r does not apply" errors.
        if self.lora.lora_r is None and self.finetuning.method not in ("vera", "tied_lora"):
            self.lora.lora_r = task.default_lora_r
        if self.lora.lora_alpha is None and self.finetuning.method != "vera":
            self.lora.lora_alpha = 2.0 * self.lora.lora_r

    @property
    def reference_lora_r(self) -> int:
        """The rank of the plain LoRA a run's parameter count is compared with (the task's for VeRA and
        Tied-LoRA, which have their own ranks)."""
        return self.lora.lora_r or self.data.build_task().default_lora_r

    def _check_and_fill_baseline_settings(self) -> None:
        """Refuse a baseline's flag given to another method and out-of-range values; fill the method's
        defaults."""
        lora, method = self.lora, self.finetuning.method
        for name, owner in METHOD_FLAGS.items():
            if getattr(lora, name) is not None and owner != method:
                raise UsageError(f"--{name} is a setting of --method {owner}; this run is --method {method}")
        if method == "vera":
            for name in ("lora_r", "lora_alpha"):
                if getattr(lora, name) is not None:
                    raise UsageError(
                        f"--{name} does not apply to --method vera (its rank is --vera_r; VeRA has no "
                        "alpha scaling)"
                    )
            lora.vera_r = DEFAULT_VERA_R if lora.vera_r is None else lora.vera_r
            lora.vera_d_initial = (
                DEFAULT_VERA_D_INITIAL if lora.vera_d_initial is None else lora.vera_d_initial
            )
            lora.vera_projection_seed = lora.vera_projection_seed or 0
            if lora.vera_r <= 0:
                raise UsageError(f"--vera_r must be a positive integer, got {lora.vera_r}")
            if not (math.isfinite(lora.vera_d_initial) and lora.vera_d_initial > 0):
                raise UsageError(
                    f"--vera_d_initial must be > 0 (d = 0 would leave b without gradient), got "
                    f"{lora.vera_d_initial}"
                )
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
                raise UsageError(
                    f"--sparsity must be in [0, 1) (the share of LoRA's entries pruned), got {lora.sparsity}"
                )
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
        """Rebuild from :meth:`to_dict` output (or an earlier version's); unknown sections or keys are an
        error."""
        values = with_moved_keys(values)
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(values) - set(sections)
        if unknown:
            raise UsageError(f"unknown run configuration sections: {sorted(unknown)}")
        built = {}
        for section_field in dataclasses.fields(cls):
            section_cls = section_field.default_factory
            given = values.get(section_field.name, {})
            names = {f.name for f in dataclasses.fields(section_cls)}
            unknown_keys = set(given) - names
            if unknown_keys:
                raise UsageError(f"unknown keys in section {section_field.name!r}: {sorted(unknown_keys)}")
            built[section_field.name] = section_cls(**given)
        return cls(**built)


# The sections in the order of RunConfig's fields (the command line groups its flags so).
CONFIG_SECTIONS = tuple(f.default_factory for f in dataclasses.fields(RunConfig))
