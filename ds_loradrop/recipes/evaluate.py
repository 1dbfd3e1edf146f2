"""Evaluate a saved adapter (or the bare base model) by generation, under DeepSpeed or plain python."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ds_loradrop.config import DataConfig, EvalConfig, TrainConfig
from ds_loradrop.errors import UsageError
from ds_loradrop.eval.evaluation import METRICS_NAME, PREDICTIONS_NAME, evaluate
from ds_loradrop.eval.generation import prompt_token_budget
from ds_loradrop.method.adapter_files import attach_saved_adapters, read_adapter_config
from ds_loradrop.method.placement import cast_adapters
from ds_loradrop.models.loading import (
    load_for_deepspeed,
    load_model_config,
    load_tokenizer,
    resolve_model_path,
)
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import get_logger, get_world_size_and_rank
from ds_loradrop.training.ds_config import load_ds_config, resolve_ds_config

logger = get_logger()


@dataclass
class OfflineEvalConfig:
    task: str = field(
        default="e2e", metadata={"help": "Task name: e2e, dart, dialogsum, gsm8k or custom (with --dataset)."}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "--task custom: the data file or hub id whose --split train is evaluated."},
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "--task custom: the data of --split validation / test."}
    )
    dataset_format: str = field(
        default="auto", metadata={"help": "--task custom: prompt_completion, alpaca, messages or auto."}
    )
    eval_metric: str = field(
        default="bleu_rouge", metadata={"help": "--task custom: bleu_rouge or exact_match."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "The task's published files (default: $DS_LORADROP_DATA_ROOT/<task>)."},
    )
    split: str = field(default="validation", metadata={"help": "train, validation or test."})
    model: str | None = field(
        default=None,
        metadata={"help": "Base model: path, hub id or preset (default: the adapter's base model)."},
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "Adapter directory written by launch/train.py (omit: the base model)."},
    )
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where predictions and metrics go."})
    ds_config: str = field(default="ds_configs/zero3.json", metadata={"help": "DeepSpeed JSON config."})
    model_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache for the presets (tiny-llama, tiny-llama2, smollm2-135m)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})

    def data_config(self) -> DataConfig:
        custom = {
            name: getattr(self, name) for name in ("dataset", "eval_dataset", "dataset_format", "eval_metric")
        }
        return DataConfig(task=self.task, data_dir=self.data_dir, **custom)

    def resolved_data_dir(self) -> str:
        return self.data_config().resolved_data_dir()


def evaluate_saved(cfg: OfflineEvalConfig, eval_cfg: EvalConfig) -> dict:
    """Load base model (+ adapter), build an inference engine, generate, score, write. Returns metrics."""
    task = cfg.data_config().build_task()
    data_dir = cfg.resolved_data_dir()
    examples = task.load_eval(data_dir, cfg.split, eval_cfg.max_eval_samples)
    adapter_config = read_adapter_config(cfg.adapter) if cfg.adapter else None
    model = cfg.model or (adapter_config or {}).get("base_model")
    if model is None:
        raise UsageError("pass --model (there is no --adapter to take the base model from)")
    for name in (PREDICTIONS_NAME, METRICS_NAME):
        if os.path.exists(os.path.join(cfg.output_dir, name)):
            raise UsageError(f"{os.path.join(cfg.output_dir, name)!r} exists; choose another --output_dir")
    raw_ds_config = load_ds_config(cfg.ds_config)
    load_model_config(model, cfg.trust_remote_code, cfg.model_cache_dir)  # fails early on an unusable model
    ds_engine.init_distributed()
    world_size, _ = get_world_size_and_rank()
    model_path = resolve_model_path(
        model, cfg.model_cache_dir, lambda max_examples: task.training_text(data_dir, max_examples, "train")
    )
    model_config = load_model_config(model_path, cfg.trust_remote_code)
    ds_config, _ = resolve_ds_config(
        raw_ds_config,
        TrainConfig(),
        world_size=world_size,
        hidden_size=model_config.hidden_size,
        accelerator_has_native_bf16=ds_engine.accelerator_has_native_bf16(),
    )
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    lm, zero3_loading = load_for_deepspeed(model_path, ds_config, cfg.trust_remote_code)
    if adapter_config is not None:
        attach_saved_adapters(lm, cfg.adapter)
        cast_adapters(lm, ds_engine.model_dtype(ds_config))  # as in training: ZeRO-3 casts only its own
    engine = ds_engine.build_inference_engine(lm, ds_config)
    max_prompt_tokens = prompt_token_budget(model_config, eval_cfg.max_new_tokens or task.max_new_tokens)
    metrics = evaluate(
        engine,
        tokenizer,
        task,
        examples,
        cfg.split,
        eval_cfg,
        device=ds_engine.local_device(),
        output_dir=cfg.output_dir,
        max_prompt_tokens=max_prompt_tokens,
    )
    ds_engine.destroy_engine(engine)
    del zero3_loading  # referenced while the model lived (see load_for_deepspeed)
    ds_engine.shutdown_distributed()
    return metrics
