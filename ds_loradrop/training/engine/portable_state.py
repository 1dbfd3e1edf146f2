"""The trainable state of an engine in a form that does not depend on the number of ranks or the ZeRO stage.

DeepSpeed's own checkpoint holds each rank's partition of the fp32 master weights and Adam's moments: it
can only be loaded by the same number of ranks under the same ZeRO stage. This file holds every trainable
parameter whole — its fp32 master weights and the optimizer's per-parameter tensors (``exp_avg``,
``exp_avg_sq``) — plus the optimizer's step and the LR scheduler's state. Any engine over the same
trainable parameters (by name) can load it: 1, 2 or 4 ranks, ZeRO-1, 2 or 3.

Saving and loading go through DeepSpeed's tensor-fragment API (``safe_get_full_*`` / ``safe_set_full_*``),
which gathers or scatters one parameter's fragments on every ZeRO stage; both are collective (every rank
calls them in the same order). Adam's state is created lazily by its first step, so loading creates it
first, with the saved step, and then writes the saved tensors into it.

For LoRA-drop on SmolLM2-135M this is 291,840 parameters x 3 fp32 tensors: 3.5 MB.
"""

from __future__ import annotations

import json
import os

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors.torch import load_file, save_file

from ds_loradrop.training.distributed import barrier, get_world_size_and_rank, is_rank_zero

TENSORS_NAME = "trainable_state.safetensors"
META_NAME = "trainable_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def _flat_master_partitions(engine) -> list[torch.Tensor]:
    """The fp32 flat partitions the wrapped optimizer updates (ZeRO-3, ZeRO-1/2)."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return list(zero.fp32_partitioned_groups_flat)
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return list(zero.single_partition_of_fp32_groups)
    raise RuntimeError(f"no ZeRO fp32 partitions in {type(zero).__name__}: a portable state needs ZeRO 1-3")


def _inner_optimizer(engine):
    return engine.optimizer.optimizer


def optimizer_step(engine) -> int:
    """Adam's step count (every flat partition holds the same)."""
    state = _inner_optimizer(engine).state.get(_flat_master_partitions(engine)[0], {})
    step = state.get("step", 0)
    return int(step.item() if torch.is_tensor(step) else step)


def save_portable_state(engine, directory: str, step: int) -> None:
    """Write the engine's trainable state into ``directory`` (every rank calls this; rank 0 writes)."""
    tensors = {}
    for name, param in _trainable(engine):
        shape = _shape(param)
        tensors[f"fp32/{name}"] = safe_get_full_fp32_param(param).detach().float().cpu().reshape(shape)
        for key in MOMENTS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:
                raise RuntimeError(f"{name}: no optimizer state {key!r} (save before the first step?)")
            tensors[f"{key}/{name}"] = value.detach().float().cpu().reshape(shape)
    world_size, _ = get_world_size_and_rank()
    meta = {
        "step": step,
        "optimizer_step": optimizer_step(engine),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "param_groups": [
            {k: v for k, v in group.items() if k != "params"}
            for group in _inner_optimizer(engine).param_groups
        ],
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "world_size": world_size,
        "zero_stage": engine.zero_optimization_stage(),
    }
    if is_rank_zero():
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, TENSORS_NAME))
        with open(os.path.join(directory, META_NAME), "w") as handle:
            json.dump(meta, handle, indent=2, default=str)
    barrier()


def read_portable_meta(directory: str) -> dict:
    with open(os.path.join(directory, META_NAME)) as handle:
        return json.load(handle)


def load_portable_state(engine, directory: str) -> dict:
    """Load ``directory``'s portable state into a freshly built engine over the same trainable parameters
    (any number of ranks, any ZeRO stage 1-3). Returns its metadata."""
    meta = read_portable_meta(directory)
    tensors = load_file(os.path.join(directory, TENSORS_NAME))
    named = _trainable(engine)
    expected = {f"fp32/{name}" for name, _ in named}
    saved = {key for key in tensors if key.startswith("fp32/")}
    if expected != saved:
        missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
        raise ValueError(f"{directory}: trainable parameters differ (missing {missing}, unexpected {extra})")
    inner = _inner_optimizer(engine)
    for flat in _flat_master_partitions(engine):
        inner.state[flat] = {
            "step": torch.tensor(float(meta["optimizer_step"]), dtype=torch.float32),
            **{key: torch.zeros_like(flat) for key in MOMENTS},
        }
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link to the new state
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, param in named:
        master = tensors[f"fp32/{name}"]
        safe_set_full_fp32_param(param, master)
        for key in MOMENTS:
            safe_set_full_optimizer_state(param, tensors[f"{key}/{name}"], key)
        if not hasattr(param, "ds_id"):  # ZeRO-1/2: every rank holds the whole module parameter
            with torch.no_grad():
                param.data.copy_(master.to(param.dtype).reshape(param.shape))
    _copy_masters_to_zero3_partitions(engine)
    for group, saved_group in zip(inner.param_groups, meta["param_groups"], strict=True):
        group.update({k: saved_group[k] for k in ("lr", "initial_lr") if k in saved_group})
    if engine.lr_scheduler is not None and meta["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    barrier()
    return meta


def _copy_masters_to_zero3_partitions(engine) -> None:
    """ZeRO-3 computes with its low-precision partitions: refresh them from the loaded fp32 masters (as
    DeepSpeed's universal-checkpoint loading does)."""
    zero = engine.optimizer
    if not hasattr(zero, "fp32_partitioned_groups_flat"):
        return
    for index, fp32 in enumerate(zero.fp32_partitioned_groups_flat):
        if fp32.numel() > 0:
            zero.fp16_partitioned_groups_flat[index].data.copy_(fp32.data)
    for index in range(len(zero.fp16_partitioned_groups_flat)):
        updated = zero.unflatten(
            zero.fp16_partitioned_groups_flat[index], zero.fp16_partitioned_groups[index]
        )
        for partitioned, value in zip(zero.fp16_partitioned_groups[index], updated, strict=True):
            partitioned.data = value.data
