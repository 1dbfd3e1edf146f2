"""The importance profile of any saved LoRA adapter: this project's (e.g. a run's ``stage1_adapter/``) or a
plain PEFT LoRA adapter trained elsewhere, measured on a task's data exactly as stage 1 measures it,
turned into a ``plan.json`` for a threshold that ``launch/train.py --plan`` trains without stage 1.

The examples are the stage-1 sample a training run with the same settings would draw (same training examples,
held-out slice, tokenisation, stratified sample and seed), so the tool reproduces a run's ``plan.json``
from its ``stage1_adapter/``. One process, on the GPU when there is one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from ds_loradrop.config import RunConfig
from ds_loradrop.data.batching import stratified_sample, tokenize_examples
from ds_loradrop.errors import UsageError
from ds_loradrop.method.adapter_files import (
    adapter_method,
    attach_saved_adapters,
    read_config_file,
    saved_method,
)
from ds_loradrop.method.lora import AdapterLayout, LoRAAdapter, LoRALinear
from ds_loradrop.method.placement import inject_lora
from ds_loradrop.method.plan import Plan, build_plan_for
from ds_loradrop.method.probe import measure_importance
from ds_loradrop.method.registry import with_method_settings
from ds_loradrop.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from ds_loradrop.run_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, RUN_CONFIG_NAME
from ds_loradrop.training.distributed import get_logger

logger = get_logger()

# Flags of launch/importance.py that override the run configuration, by section.
OVERRIDABLE = {
    "model": ("model", "model_cache_dir"),
    "data": ("task", "data_dir", "train_split", "max_train_samples", "max_seq_length"),
    "drop": ("sample_ratio", "threshold", "selection", "low_importance"),
    "train": ("seed",),
}


@dataclass(frozen=True)
class SavedAdapter:
    """What an adapter directory says about itself."""

    kind: str  # "ds-loradrop" or "peft"
    r: int
    alpha: float
    targets: list[str]
    base_model: str | None


def read_saved_adapter(directory: str) -> SavedAdapter:
    """Recognise this project's adapter directory or a plain PEFT LoRA one; UsageError otherwise."""
    config = read_config_file(directory)
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if "layers" in config and "r" in config:
        method = adapter_method(config)
        if not saved_method(config, directory).lora_pairs:
            raise UsageError(
                f"{config_path!r} holds {method} adapters; importance is measured on LoRA adapters "
                f"(lora, loradrop, sparse_lora runs)"
            )
        return SavedAdapter(
            "ds-loradrop", config["r"], config["lora_alpha"], list(config["layers"]), config.get("base_model")
        )
    if config.get("peft_type") == "LORA":
        for flag in ("use_rslora", "use_dora"):
            if config.get(flag):
                raise UsageError(f"{config_path!r}: {flag} adapters are not supported (plain LoRA only)")
        modules = config.get("target_modules")
        modules = [modules] if isinstance(modules, str) else list(modules or [])
        targets = sorted({name.split(".")[-1] for name in modules})
        if not targets:
            raise UsageError(f"{config_path!r} names no target_modules")
        return SavedAdapter(
            "peft",
            int(config["r"]),
            float(config["lora_alpha"]),
            targets,
            config.get("base_model_name_or_path"),
        )
    raise UsageError(f"{config_path!r} is neither a ds-loradrop adapter nor a PEFT LoRA adapter")


def attach_peft_adapters(
    model: torch.nn.Module, layout: AdapterLayout, directory: str, saved: SavedAdapter
) -> None:
    """Own adapters with the PEFT file's ``lora_A`` / ``lora_B`` (same ``alpha / r`` scaling)."""
    state = load_file(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    names = {id(module): name for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    for wrappers in layout.values():
        for wrapper in wrappers:
            prefix = f"base_model.model.{names[id(wrapper)]}"
            keys = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
            if not all(key in state for key in keys):
                raise UsageError(
                    f"PEFT adapter {directory!r} has no LoRA on {names[id(wrapper)]!r}: the importance "
                    f"needs one on every layer of {wrapper.target!r}"
                )
            adapter = LoRAAdapter(wrapper.in_features, wrapper.out_features, saved.r, saved.alpha)
            with torch.no_grad():
                adapter.lora_A.copy_(state[keys[0]])
                adapter.lora_B.copy_(state[keys[1]])
            wrapper.adapter = adapter


def run_config_for(run_dir: str | None, overrides: dict[str, object]) -> RunConfig:
    """The configuration of ``run_dir`` (its ``run_config.json``) or the defaults, with ``overrides``
    (flag name -> value; None = not given) applied."""
    values: dict[str, dict] = {}
    if run_dir is not None:
        path = os.path.join(run_dir, RUN_CONFIG_NAME)
        if not os.path.isfile(path):
            raise UsageError(
                f"--run {run_dir!r} has no {RUN_CONFIG_NAME}: not a training run's output directory"
            )
        with open(path) as handle:
            values = {k: v for k, v in json.load(handle).items() if k != "resolved"}
    for section, names in OVERRIDABLE.items():
        for name in names:
            if overrides.get(name) is not None:
                values.setdefault(section, {})[name] = overrides[name]
    return with_method_settings(RunConfig.from_dict(values))


def stage1_sample(cfg: RunConfig, tokenizer) -> list[dict]:
    """The examples stage 1 of a run with ``cfg`` trains on and measures importance over."""
    from ds_loradrop.recipes.checks import load_eval_examples, load_training_examples

    task = cfg.data.build_task()
    examples = load_training_examples(cfg, task, *load_eval_examples(cfg, task))
    tokenized, _ = tokenize_examples(examples, tokenizer, cfg.data.max_seq_length)
    return stratified_sample(tokenized.to_list(), cfg.drop.sample_ratio, cfg.train.seed)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def adapter_importance(
    adapter_dir: str,
    cfg: RunConfig,
    *,
    batch_size: int,
    model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Plan:
    """Measure the saved adapter's importance on the stage-1 sample of ``cfg`` and select layers.

    The base model is ``model`` if given, else the one the adapter names, else ``cfg.model.model``. The
    model and adapters compute in ``dtype`` (bf16 as a bf16 training run's stage 1 does); the squared
    norms are summed in fp32 and accumulated in fp64 whatever the dtype."""
    saved = read_saved_adapter(adapter_dir)
    model_name = model or saved.base_model or cfg.model.model
    model_path = resolve_model_path(
        model_name,
        cfg.model.model_cache_dir,
        lambda max_examples: cfg.data.build_task().training_text(
            cfg.data.resolved_data_dir(), max_examples, cfg.data.train_split
        ),
    )
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    sample = stage1_sample(cfg, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(model_path, dtype, cfg.model.trust_remote_code)
    model.config.use_cache = False
    if saved.kind == "peft":
        layout = inject_lora(model, saved.targets)
        attach_peft_adapters(model, layout, adapter_dir, saved)
    else:
        layout = attach_saved_adapters(model, adapter_dir)
        missing = [f"{t} layer {w.layer}" for t, ws in layout.items() for w in ws if w.adapter is None]
        if missing:
            raise UsageError(
                f"adapter {adapter_dir!r} has no LoRA on {', '.join(missing[:3])}: the importance needs "
                f"one on every layer (a stage-1 or plain LoRA adapter)"
            )
    model.to(device=device, dtype=dtype)  # after the adapters are attached: created on the CPU in fp32
    logger.info(
        f"importance of {adapter_dir} ({saved.kind}, r={saved.r}, {str(dtype).removeprefix('torch.')}) "
        f"over {len(sample)} sampled examples"
    )
    sums, num_tokens = measure_importance(
        model, layout, sample, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, device=device
    )
    return build_plan_for(
        sums, num_tokens, cfg.drop, seed=cfg.train.seed, num_sampled=len(sample), world_size=1
    )
