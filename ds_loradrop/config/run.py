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
from dataclasses import dataclass, field

from ds_loradrop.config.files import with_moved_keys
from ds_loradrop.config.method import DropConfig, FinetuningConfig, LoraConfig
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
        """Fill the task's sequence length. The method's settings (LoRA's rank and alpha, a baseline's own)
        are checked and filled by its registered method (``method.registry.with_method_settings``)."""
        task = self.data.build_task()
        if self.data.max_seq_length is None:
            self.data.max_seq_length = task.default_max_seq_length

    @property
    def reference_lora_r(self) -> int:
        """The rank of the plain LoRA a run's parameter count is compared with (the task's for VeRA and
        Tied-LoRA, which have their own ranks)."""
        return self.lora.lora_r or self.data.build_task().default_lora_r

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
