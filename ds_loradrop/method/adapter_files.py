"""Adapters to and from safetensors files: gathered from ZeRO-3 partitions, a shared adapter once.

Layout of an adapter directory::

    adapter_model.safetensors   {target}.layers.{i}.lora_A/B (own) and {target}.shared.lora_A/B (once);
                                the other methods' tensors under the same per-layer names (VeRA's d and b,
                                Tied-LoRA's u and v, a pruned LoRA's masks) and their shared tensors once
                                (``vera_projection.vera_A/B``, ``{target}.tied.lora_A/B``)
    adapter_config.json         method, r, alpha (and the method's settings), targets, base model, which
                                layers use which adapter
    plan.json                   the LoRA-drop plan (when there is one)
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from ds_loradrop.errors import UsageError
from ds_loradrop.method.lora import AdapterLayout
from ds_loradrop.method.placement import inject_lora, named_adapters
from ds_loradrop.method.plan import Plan
from ds_loradrop.method.registry import Method, registered_methods
from ds_loradrop.run_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PLAN_NAME
from ds_loradrop.training.distributed import barrier, is_rank_zero
from ds_loradrop.training.engine import gathered_parameters


def gather_adapter_state(layout: AdapterLayout) -> dict[str, torch.Tensor]:
    """CPU copies of every adapter's weights under canonical names. Call on every rank."""
    state = {}
    for name, adapter in named_adapters(layout).items():
        with gathered_parameters(adapter.parameters()):
            tensors = {f"{name}.{key}": value for key, value in adapter.saved_tensors().items()}
            tensors.update(adapter.shared_tensors())  # the same tensors again for each sharer: kept once
            for key, value in tensors.items():
                state[key] = value.detach().cpu().clone().contiguous()
    return state


def adapter_usage(layout: AdapterLayout) -> dict[str, list[str | None]]:
    """For every target, the adapter name each layer uses (None where it has none)."""
    by_id = {id(adapter): name for name, adapter in named_adapters(layout).items()}
    return {
        target: [by_id[id(w.adapter)] if w.adapter is not None else None for w in wrappers]
        for target, wrappers in layout.items()
    }


def save_adapters(
    layout: AdapterLayout, directory: str, *, settings: dict, base_model: str, plan: Plan | None
) -> None:
    """Gather on every rank, write on rank 0, then wait so other ranks can read the files.

    ``settings``: what rebuilds the adapters besides their tensors: ``method``, ``r`` and the method's own
    values (``lora_alpha``; VeRA's ``d_initial``, ``projection_seed``; ``sparsity``)."""
    state = gather_adapter_state(layout)
    if is_rank_zero():
        os.makedirs(directory, exist_ok=True)
        save_file(state, os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "ds-loradrop"})
        config = {
            **settings,
            "targets": list(layout),
            "base_model": base_model,
            "layers": adapter_usage(layout),
        }
        with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w") as handle:
            json.dump(config, handle, indent=2)
        if plan is not None:
            plan.save(os.path.join(directory, PLAN_NAME))
    barrier()


def load_adapter_state(directory: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, ADAPTER_WEIGHTS_NAME))


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
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS_NAME)):
        raise UsageError(
            f"{directory!r} is not an adapter directory "
            f"({ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} expected)"
        )
    try:
        with open(path) as handle:
            return json.load(handle)
    except ValueError as error:
        raise UsageError(f"{path!r} is not valid JSON ({error})") from error


def read_adapter_config(directory: str) -> dict:
    """This project's adapter config; UsageError for anything else."""
    config = read_config_file(directory)
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    required = ("r", "base_model", "layers") + (
        ("lora_alpha",) if saved_method(config, directory).has_alpha else ()
    )
    missing = [key for key in required if key not in config]
    if missing:
        raise UsageError(f"{path!r} lacks {missing}: not an adapter written by ds-loradrop")
    return config


def adapter_method(config: dict) -> str:
    """The method an adapter config was written by (files from before methods were recorded: LoRA)."""
    return config.get("method", "lora")


def saved_method(config: dict, directory: str) -> Method:
    """The registered method that wrote an adapter config; UsageError for one this version does not know."""
    name = adapter_method(config)
    methods = registered_methods()
    if name not in methods:
        raise UsageError(
            f"{os.path.join(directory, ADAPTER_CONFIG_NAME)!r} names method {name!r}, which this version "
            f"does not know (it knows {list(methods)})"
        )
    return methods[name]


def _adapter_builder(config: dict, state: dict[str, torch.Tensor], directory: str):
    """A function (name, wrapper) -> a new adapter of the saved method, its tensors copied in."""

    def need(*keys: str) -> list[torch.Tensor]:
        absent = [key for key in keys if key not in state]
        if absent:
            raise UsageError(f"adapter weights in {directory!r} lack {absent}, which its config implies")
        return [state[key] for key in keys]

    rebuild = saved_method(config, directory).rebuild(config, need)

    def rebuild_without_gradients(name: str, wrapper) -> torch.nn.Module:
        with torch.no_grad():
            return rebuild(name, wrapper)

    return rebuild_without_gradients


def attach_saved_adapters(model: torch.nn.Module, directory: str) -> AdapterLayout:
    """Wrap the saved adapter's targets of ``model`` and rebuild its adapters (own, shared once, or
    none per layer) with their weights; returns the layout.

    Call before the model is handed to DeepSpeed. Raises UsageError if the saved targets or layer
    counts do not match the model.
    """
    config = read_adapter_config(directory)
    layout = inject_lora(model, list(config["layers"]))
    state = load_adapter_state(directory)
    build = _adapter_builder(config, state, directory)
    built: dict[str, torch.nn.Module] = {}
    for target, names in config["layers"].items():
        wrappers = layout[target]
        if len(names) != len(wrappers):
            raise UsageError(f"adapter has {len(names)} layers for {target!r}, the model has {len(wrappers)}")
        for wrapper, name in zip(wrappers, names):
            if name is None:
                wrapper.adapter = None
                continue
            if name not in built:
                built[name] = build(name, wrapper)
            wrapper.adapter = built[name]
    return layout
