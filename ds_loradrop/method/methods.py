"""Which adapters each ``--method`` places on the model for its final training, and what its adapter files
record to rebuild them (the one place that maps a method name to adapter kinds)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ds_loradrop.config import RunConfig
from ds_loradrop.method.adapter_files import copy_into_adapters, load_adapter_state
from ds_loradrop.method.lora import AdapterLayout
from ds_loradrop.method.placement import attach_own_adapters, attach_planned_adapters
from ds_loradrop.method.plan import Plan
from ds_loradrop.method.sparse_lora import apply_masks, attach_sparse_adapters
from ds_loradrop.method.tied_lora import attach_tied_adapters
from ds_loradrop.method.vera import attach_vera_adapters

AttachAdapters = Callable[[AdapterLayout], None]


def final_adapters(
    cfg: RunConfig,
    plan: Plan | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    stage1_adapter_dir: str | None = None,
) -> AttachAdapters | None:
    """How to attach the adapters the method trains last (None: ``full`` trains every weight, no adapter).

    ``plan``: LoRA-drop's layout; ``masks``: SNIP's; ``stage1_adapter_dir``: where ``--stage2_init carry``
    takes the retained layers' stage-1 weights from."""
    lora, method = cfg.lora, cfg.finetuning.method
    if method == "full":
        return None
    if method == "lora":
        return lambda layout: attach_own_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
    if method == "vera":
        return lambda layout: attach_vera_adapters(
            layout, lora.vera_r, lora.vera_d_initial, lora.vera_projection_seed, lora.lora_dropout
        )
    if method == "tied_lora":
        return lambda layout: attach_tied_adapters(
            layout, lora.tied_lora_r, lora.lora_alpha, lora.lora_dropout
        )
    if method == "sparse_lora":

        def attach_pruned(layout: AdapterLayout) -> None:
            attach_sparse_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
            apply_masks(layout, masks)

        return attach_pruned

    def attach_planned(layout: AdapterLayout) -> None:
        attach_planned_adapters(layout, plan, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
        if cfg.drop.stage2_init == "carry":
            stage1 = load_adapter_state(stage1_adapter_dir)
            names = [f"{t}.layers.{i}" for t, target in plan.targets.items() for i in target.retained]
            copy_into_adapters(layout, stage1, names)

    return attach_planned


def adapter_settings(cfg: RunConfig) -> dict:
    """What the adapter files record besides tensors, to rebuild the adapters of this run's method."""
    lora, method = cfg.lora, cfg.finetuning.method
    if method == "vera":
        return {
            "method": method,
            "r": lora.vera_r,
            "d_initial": lora.vera_d_initial,
            "projection_seed": lora.vera_projection_seed,
        }
    if method == "tied_lora":
        return {"method": method, "r": lora.tied_lora_r, "lora_alpha": lora.lora_alpha}
    if method == "sparse_lora":
        return {"method": method, "r": lora.lora_r, "lora_alpha": lora.lora_alpha, "sparsity": lora.sparsity}
    return {"method": method, "r": lora.lora_r, "lora_alpha": lora.lora_alpha}
