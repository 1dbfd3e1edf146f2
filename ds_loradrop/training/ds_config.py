"""Reading a DeepSpeed JSON and filling its ``"auto"`` values from the run configuration (pure).

One owner per knob (the Hugging Face Trainer convention):

- ``"auto"`` (or absent) in the JSON: filled from the CLI value, or the documented default.
- a concrete JSON value: kept; a CLI value that differs is an error, never silently overridden.
- ``train_batch_size`` must equal micro x accumulation x world size.
- precision ``"auto"``: bf16 where the accelerator does bf16 matmuls natively (not on the CPU).
- ZeRO bucket sizes ``"auto"``: from the model's hidden size, as the HF Trainer does.
- an ``optimizer`` section may use ``"auto"`` for lr / weight_decay (filled from the run config);
  a ``scheduler`` section is refused: the learning-rate schedule belongs to the run config.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from ds_loradrop.config import (
    DEFAULT_GRADIENT_ACCUMULATION_STEPS,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_MICRO_BATCH_SIZE,
    TrainConfig,
)
from ds_loradrop.errors import UsageError

AUTO = "auto"


@dataclass(frozen=True)
class BatchSettings:
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    max_grad_norm: float

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def steps_per_epoch(self, num_examples: int) -> int:
        return num_examples // self.global_batch_size

    def steps(self, num_examples: int, epochs: int, max_steps: int | None, what: str = "training set") -> int:
        """Optimizer steps of a stage: whole global batches per epoch, times epochs, capped by ``max_steps``.

        Raises:
            UsageError: the data is smaller than one global batch.
        """
        if self.steps_per_epoch(num_examples) == 0:
            raise UsageError(
                f"the {what} ({num_examples} examples) is smaller than one global batch of "
                f"{self.global_batch_size} (micro {self.micro_batch_size} x accumulation "
                f"{self.gradient_accumulation_steps} x {self.world_size} ranks)"
            )
        total = self.steps_per_epoch(num_examples) * epochs
        return min(total, max_steps) if max_steps is not None else total


def load_ds_config(path: str) -> dict:
    """Read a DeepSpeed JSON file. Raises UsageError naming the file when it can't be used."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as error:
        raise UsageError(f"cannot read ds_config {path!r}: {error.strerror}") from error
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"ds_config {path!r} is not valid JSON: {error.msg} at line {error.lineno}"
        ) from error
    if not isinstance(config, dict):
        raise UsageError(f"ds_config {path!r} must hold a JSON object, not {type(config).__name__}")
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def is_bf16(config: dict) -> bool:
    return bool(config.get("bf16", {}).get("enabled", False))


def _fill(config: dict, key: str, cli_value: Any, default: Any, flag: str) -> Any:
    json_value = config.get(key, AUTO)
    if json_value == AUTO:
        config[key] = default if cli_value is None else cli_value
    elif cli_value is not None and cli_value != json_value:
        raise UsageError(
            f"--{flag} {cli_value} conflicts with {key} = {json_value} in the ds_config; "
            f'set it in one place (use "auto" in the JSON to take the command line\'s value)'
        )
    return config[key]


def resolve_ds_config(
    raw: dict,
    train: TrainConfig,
    *,
    world_size: int,
    hidden_size: int,
    accelerator_has_native_bf16: bool,
) -> tuple[dict, BatchSettings]:
    """Return a copy of ``raw`` with every ``"auto"`` filled, and the batch settings it implies.

    Raises:
        UsageError: a CLI value conflicts with a concrete JSON value, an ``"auto"`` is left that we
            don't know how to fill, or the JSON has a ``scheduler`` section.
    """
    config = copy.deepcopy(raw)
    micro = _fill(
        config,
        "train_micro_batch_size_per_gpu",
        train.per_device_train_batch_size,
        DEFAULT_MICRO_BATCH_SIZE,
        "per_device_train_batch_size",
    )
    accumulation = _fill(
        config,
        "gradient_accumulation_steps",
        train.gradient_accumulation_steps,
        DEFAULT_GRADIENT_ACCUMULATION_STEPS,
        "gradient_accumulation_steps",
    )
    clipping = _fill(config, "gradient_clipping", train.max_grad_norm, DEFAULT_MAX_GRAD_NORM, "max_grad_norm")
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", accumulation),
    ):
        if not isinstance(value, int) or value <= 0:
            raise UsageError(f"ds_config {key} must be a positive integer, got {value!r}")
    global_batch = micro * accumulation * world_size
    json_global = config.get("train_batch_size", AUTO)
    if json_global == AUTO:
        config["train_batch_size"] = global_batch
    elif json_global != global_batch:
        raise UsageError(
            f"ds_config train_batch_size = {json_global} but micro-batch {micro} x accumulation "
            f"{accumulation} x world size {world_size} = {global_batch}"
        )

    for precision in ("bf16", "fp16"):
        section = config.get(precision)
        if isinstance(section, dict) and section.get("enabled") == AUTO:
            section["enabled"] = precision == "bf16" and accelerator_has_native_bf16
    if is_bf16(config) and config.get("fp16", {}).get("enabled", False):
        raise UsageError("ds_config enables both bf16 and fp16")

    zero = config.get("zero_optimization", {})
    bucket_defaults = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, default in bucket_defaults.items():
        if zero.get(key) == AUTO:
            zero[key] = default

    if "scheduler" in config:
        raise UsageError(
            "ds_config has a 'scheduler' section; the learning-rate schedule is set by --lr_scheduler "
            "and --warmup_ratio, so remove it from the JSON"
        )
    if "optimizer" in config:
        params = config["optimizer"].setdefault("params", {})
        for key, value, flag in (
            ("lr", train.learning_rate, "learning_rate"),
            ("weight_decay", train.weight_decay, "weight_decay"),
        ):
            if params.get(key, AUTO) == AUTO:
                params[key] = value
            elif params[key] != value:
                raise UsageError(
                    f"ds_config optimizer.params.{key} = {params[key]} conflicts with --{flag} {value}; "
                    f'use "auto" in the JSON to take the command line\'s value'
                )

    leftover = _find_auto(config)
    if leftover:
        raise UsageError(f'ds_config has "auto" values this tool cannot fill: {leftover}')
    return config, BatchSettings(micro, accumulation, world_size, float(clipping))


def _find_auto(value: Any, path: str = "") -> list[str]:
    if value == AUTO:
        return [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _find_auto(item, f"{path}.{key}" if path else key)]
    return []
