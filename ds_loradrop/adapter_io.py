"""Adapters to and from safetensors files: gathered from ZeRO-3 partitions, a shared adapter once.

Layout of an adapter directory::

    adapter_model.safetensors   {target}.layers.{i}.lora_A/B (own) and {target}.shared.lora_A/B (once)
    adapter_config.json         r, alpha, targets, base model, which layers use which adapter
    plan.json                   the LoRA-drop plan (when there is one)
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from ds_loradrop.distributed import barrier, is_rank_zero
from ds_loradrop.engine import gathered_parameters
from ds_loradrop.errors import UsageError
from ds_loradrop.lora import AdapterLayout, LoRAAdapter, named_adapters
from ds_loradrop.plan import Plan

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PLAN_NAME = "plan.json"


def gather_adapter_state(layout: AdapterLayout) -> dict[str, torch.Tensor]:
    """CPU copies of every adapter's weights under canonical names. Call on every rank."""
    state = {}
    for name, adapter in named_adapters(layout).items():
        with gathered_parameters(adapter.parameters()):
            state[f"{name}.lora_A"] = adapter.lora_A.detach().cpu().clone().contiguous()
            state[f"{name}.lora_B"] = adapter.lora_B.detach().cpu().clone().contiguous()
    return state


def adapter_usage(layout: AdapterLayout) -> dict[str, list[str | None]]:
    """For every target, the adapter name each layer uses (None where it has none)."""
    by_id = {id(adapter): name for name, adapter in named_adapters(layout).items()}
    return {
        target: [by_id[id(w.adapter)] if w.adapter is not None else None for w in wrappers]
        for target, wrappers in layout.items()
    }


def save_adapters(
    layout: AdapterLayout, directory: str, *, r: int, alpha: float, base_model: str, plan: Plan | None
) -> None:
    """Gather on every rank, write on rank 0, then wait so other ranks can read the files."""
    state = gather_adapter_state(layout)
    if is_rank_zero():
        os.makedirs(directory, exist_ok=True)
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "ds-loradrop"})
        config = {
            "r": r,
            "lora_alpha": alpha,
            "targets": list(layout),
            "base_model": base_model,
            "layers": adapter_usage(layout),
        }
        with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
            json.dump(config, handle, indent=2)
        if plan is not None:
            plan.save(os.path.join(directory, PLAN_NAME))
    barrier()


def load_adapter_state(directory: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, WEIGHTS_NAME))


def copy_into_adapters(layout: AdapterLayout, state: dict[str, torch.Tensor], names: list[str]) -> None:
    """Copy saved weights into the current (not yet partitioned) adapters of the given names."""
    adapters = named_adapters(layout)
    with torch.no_grad():
        for name in names:
            adapters[name].lora_A.copy_(state[f"{name}.lora_A"])
            adapters[name].lora_B.copy_(state[f"{name}.lora_B"])


def read_config_file(directory: str) -> dict:
    """The adapter directory's ``adapter_config.json`` (any writer); UsageError unless it has that file,
    the weights file and valid JSON."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        raise UsageError(f"{directory!r} is not an adapter directory ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    try:
        with open(path) as handle:
            return json.load(handle)
    except ValueError as error:
        raise UsageError(f"{path!r} is not valid JSON ({error})") from error


def read_adapter_config(directory: str) -> dict:
    """This project's adapter config; UsageError for anything else."""
    config = read_config_file(directory)
    path = os.path.join(directory, CONFIG_NAME)
    missing = [key for key in ("r", "lora_alpha", "base_model", "layers") if key not in config]
    if missing:
        raise UsageError(f"{path!r} lacks {missing}: not an adapter written by ds-loradrop")
    return config


def attach_saved_adapters(layout: AdapterLayout, directory: str) -> None:
    """Rebuild the saved adapters (own, shared once, or none per layer) with their weights.

    Call before the model is handed to DeepSpeed. Raises UsageError if the saved targets or layer
    counts do not match the model.
    """
    config = read_adapter_config(directory)
    if sorted(config["layers"]) != sorted(layout):
        raise UsageError(f"adapter targets {sorted(config['layers'])} do not match the model's {sorted(layout)}")
    state = load_adapter_state(directory)
    built: dict[str, LoRAAdapter] = {}
    for target, names in config["layers"].items():
        wrappers = layout[target]
        if len(names) != len(wrappers):
            raise UsageError(f"adapter has {len(names)} layers for {target!r}, the model has {len(wrappers)}")
        for wrapper, name in zip(wrappers, names):
            if name is None:
                wrapper.adapter = None
                continue
            if name not in built:
                if f"{name}.lora_A" not in state or f"{name}.lora_B" not in state:
                    raise UsageError(f"adapter weights in {directory!r} lack {name!r}, which its config names")
                adapter = LoRAAdapter(wrapper.in_features, wrapper.out_features, config["r"], config["lora_alpha"])
                adapter.is_shared = name.endswith(".shared")
                with torch.no_grad():
                    adapter.lora_A.copy_(state[f"{name}.lora_A"])
                    adapter.lora_B.copy_(state[f"{name}.lora_B"])
                built[name] = adapter
            wrapper.adapter = built[name]
