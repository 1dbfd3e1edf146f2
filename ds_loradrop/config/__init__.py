"""The run configuration: one dataclass per concern (``sections``: model, data; ``method``: the fine-tuning
method, adapters, LoRA-drop; ``training``: training, evaluation, tracking), gathered and checked together in
``run.RunConfig``; ``files`` reads a --config file into flag defaults.

Imports only ``errors`` (and, for the tasks' defaults, ``data``).
"""

from ds_loradrop.config.method import DropConfig, FinetuningConfig, LoraConfig
from ds_loradrop.config.run import CONFIG_SECTIONS, RunConfig
from ds_loradrop.config.sections import (
    DEFAULT_DATA_ROOT,
    DEFAULT_DATA_ROOT_ENV,
    DEFAULT_GRADIENT_ACCUMULATION_STEPS,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_MICRO_BATCH_SIZE,
    SMOLLM2_135M,
    TINY_LLAMA,
    TINY_LLAMA2,
    DataConfig,
    ModelConfig,
)
from ds_loradrop.config.training import EvalConfig, TrackingConfig, TrainConfig

__all__ = [
    "CONFIG_SECTIONS",
    "DEFAULT_DATA_ROOT",
    "DEFAULT_DATA_ROOT_ENV",
    "DEFAULT_GRADIENT_ACCUMULATION_STEPS",
    "DEFAULT_MAX_GRAD_NORM",
    "DEFAULT_MICRO_BATCH_SIZE",
    "SMOLLM2_135M",
    "TINY_LLAMA",
    "TINY_LLAMA2",
    "DataConfig",
    "DropConfig",
    "EvalConfig",
    "FinetuningConfig",
    "LoraConfig",
    "ModelConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
]
