"""Where adapters sit on a model: wrapping the target projections, attaching own / shared / no adapters per
layer, freezing the rest, and counting and naming adapters by identity (a shared adapter once).

Adapters are found by where they sit (``LoRALinear.adapter``), never by parameter-name substrings.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ds_loradrop.errors import UsageError
from ds_loradrop.method.lora import AdapterLayout, LoRAAdapter, LoRALinear, numel_of
from ds_loradrop.method.plan import Plan

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _find_targets(model: nn.Module, targets: list[str]) -> dict[str, dict[int, tuple[nn.Module, str]]]:
    found: dict[str, dict[int, tuple[nn.Module, str]]] = {t: {} for t in targets}
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name not in found or not isinstance(child, nn.Linear):
                continue
            full_name = f"{name}.{child_name}" if name else child_name
            match = _LAYER_INDEX.search(f".{full_name}")
            if match is None:
                raise UsageError(f"target {child_name!r} at {full_name!r} is not inside a numbered layer")
            layer = int(match.group(1))
            if layer in found[child_name]:
                raise UsageError(f"target {child_name!r} matches more than one module in layer {layer}")
            found[child_name][layer] = (module, child_name)
    return found


def inject_lora(model: nn.Module, targets: list[str]) -> AdapterLayout:
    """Wrap every target projection in a :class:`LoRALinear` (no adapter attached yet).

    Args:
        model: a causal LM whose decoder layers live in a numbered ``ModuleList``.
        targets: attribute names of ``nn.Linear`` projections, e.g. ``["q_proj", "v_proj"]``.

    Returns:
        ``layout[target][layer]``, the wrappers in layer order.

    Raises:
        UsageError: a target matches no ``nn.Linear``, or the layer numbering has gaps.
    """
    found = _find_targets(model, targets)
    layout: AdapterLayout = {}
    for target, by_layer in found.items():
        if not by_layer:
            raise UsageError(f"LoRA target {target!r} matches no nn.Linear module of {type(model).__name__}")
        if sorted(by_layer) != list(range(len(by_layer))):
            raise UsageError(f"LoRA target {target!r} found in layers {sorted(by_layer)}, not 0..n-1")
        wrappers = []
        for layer in range(len(by_layer)):
            parent, attribute = by_layer[layer]
            wrapper = LoRALinear(getattr(parent, attribute), target, layer)
            setattr(parent, attribute, wrapper)
            wrappers.append(wrapper)
        layout[target] = wrappers
    return layout


def attach_own_adapters(layout: AdapterLayout, r: int, alpha: float, dropout: float) -> None:
    """Give every wrapped layer its own fresh adapter (plain LoRA; LoRA-drop stage 1)."""
    for wrappers in layout.values():
        for wrapper in wrappers:
            wrapper.adapter = LoRAAdapter(wrapper.in_features, wrapper.out_features, r, alpha, dropout)


def freeze_all_but_adapters(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for adapter in unique_adapters(model):
        for param in adapter.parameters():
            param.requires_grad_(True)


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every adapter (its parameters and floating-point buffers) in ``dtype``, the dtype the base model
    computes in. DeepSpeed casts the whole module under ZeRO-1/2 (bf16 adapters) but not parameters that
    ZeRO-3 did not create itself (fp32 adapters over a bf16 base): cast here, both stages train the same
    way, bf16 forward and fp32 master weights in the optimizer."""
    for adapter in unique_adapters(model):
        adapter.to(dtype)


def unique_adapters(model: nn.Module) -> list[LoRAAdapter]:
    """Every adapter of the model once, by identity, in first-use order."""
    seen: dict[int, LoRAAdapter] = {}
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.adapter is not None:
            seen.setdefault(id(module.adapter), module.adapter)
    return list(seen.values())


def count_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters, each counted once (a shared adapter counts once); entries a pruned adapter
    holds at zero are not parameters."""
    trained = sum(numel_of(p) for p in model.parameters() if p.requires_grad)
    return trained - sum(adapter.num_masked for adapter in unique_adapters(model))


def count_full_lora_parameters(layout: AdapterLayout, r: int) -> int:
    """Parameters of plain LoRA (an own adapter on every wrapped layer) for the same model."""
    return sum(r * (w.in_features + w.out_features) for wrappers in layout.values() for w in wrappers)


def named_adapters(layout: AdapterLayout) -> dict[str, LoRAAdapter]:
    """Canonical adapter names: ``{target}.layers.{i}`` for own adapters, ``{target}.shared`` once.

    Layers without an adapter (``--low_importance drop``) have no entry.
    """
    names: dict[str, LoRAAdapter] = {}
    for target, wrappers in layout.items():
        for wrapper in wrappers:
            adapter = wrapper.adapter
            if adapter is None:
                continue
            if adapter.is_shared:
                names.setdefault(f"{target}.shared", adapter)
            else:
                names[f"{target}.layers.{wrapper.layer}"] = adapter
    return names


def merged_weight(wrapper: LoRALinear) -> torch.Tensor:
    """``W + delta W``: the dense weight equivalent to a wrapped layer (unpartitioned only)."""
    weight = wrapper.base.weight.detach()
    if wrapper.adapter is None:
        return weight.clone()
    return (weight.float() + wrapper.adapter.delta_weight()).to(weight.dtype)


def attach_planned_adapters(layout: AdapterLayout, plan: Plan, r: int, alpha: float, dropout: float) -> None:
    """Stage 2: own adapters on retained layers, ONE shared adapter per target on shared layers.

    Raises:
        UsageError: the plan's targets or layer counts do not match the model.
    """
    if set(plan.targets) != set(layout):
        raise UsageError(f"plan targets {sorted(plan.targets)} do not match the model's {sorted(layout)}")
    for name, target in plan.targets.items():
        wrappers = layout[name]
        if len(target.normalized) != len(wrappers):
            raise UsageError(
                f"plan has {len(target.normalized)} layers for {name!r}, the model has {len(wrappers)}"
            )
        for layer in target.retained:
            wrapper = wrappers[layer]
            wrapper.adapter = LoRAAdapter(wrapper.in_features, wrapper.out_features, r, alpha, dropout)
        if target.shared:
            first = wrappers[target.shared[0]]
            shared = LoRAAdapter(first.in_features, first.out_features, r, alpha, dropout)
            shared.is_shared = True
            for layer in target.shared:
                wrappers[layer].adapter = shared
        for layer in target.dropped:
            wrappers[layer].adapter = None
