"""LoRA adapters, the linear layers that carry them, and how they are placed on a model.

``h = W x + (alpha / r) * B A x`` with ``A: (r, in_features)`` Kaiming-uniform and ``B: (out_features,
r)`` zeros, so an adapted model starts out equal to its base. Our own small module rather than PEFT:
LoRA-drop needs (a) one adapter *object* called from several layers and (b) the rank-r activation
``A x`` of every layer for the importance measure, and both are plain here.

Adapters are found by where they sit (``LoRALinear.adapter``), never by parameter-name substrings, and
a shared adapter is one module: it is counted and saved by identity.

Every adapter kind (LoRA here; VeRA, Tied-LoRA and SNIP-pruned LoRA in their own modules) answers the
same few questions, so that training, saving, merging and counting need no case per method:

- ``forward(x, rank_activation_sink=None)``: the update ``delta(x)`` added to the base output;
- ``delta_weight()``: the same update as a dense ``(out_features, in_features)`` matrix (unpartitioned);
- ``saved_tensors()``: its own tensors by name, and ``shared_tensors()``: tensors it shares with other
  adapters, under names global to the model (saved once);
- ``num_masked``: trainable entries that are held at zero and not counted as parameters (0 unless pruned).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ds_loradrop.errors import UsageError

# Called with (z, lora_B, scaling): z = A x of shape (..., r), lora_B of shape (out_features, r).
RankActivationSink = Callable[[torch.Tensor, torch.Tensor, float], None]


def numel_of(param: torch.Tensor) -> int:
    """Full element count of a parameter, also when ZeRO-3 holds only a partition of it locally."""
    return int(getattr(param, "ds_numel", param.numel()))


class LoRAAdapter(nn.Module):
    """``delta(x) = scaling * B (A dropout(x))``.

    Args:
        in_features: input width of the adapted projection.
        out_features: output width of the adapted projection.
        r: rank.
        alpha: LoRA alpha; ``scaling = alpha / r``.
        dropout: dropout probability on the adapter input (training mode only).

    The parameters are owned directly by this module (not by sub-``nn.Linear``s) so that ZeRO-3
    gathers both of them for the one forward call that needs them.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.scaling = alpha / r
        self.is_shared = False  # set when one adapter serves several layers of a target
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        # Same init as PEFT / the LoRA paper's reference code: Kaiming-uniform A, zero B.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    num_masked = 0

    @property
    def num_parameters(self) -> int:
        return self.r * (self.in_features + self.out_features)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.detach().float() @ self.lora_A.detach().float() * self.scaling

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, x: torch.Tensor, rank_activation_sink: RankActivationSink | None = None) -> torch.Tensor:
        """Args: x (..., in_features). Returns (..., out_features)."""
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if rank_activation_sink is not None:
            rank_activation_sink(z, self.lora_B, self.scaling)
        return F.linear(z, self.lora_B) * self.scaling


class LoRALinear(nn.Module):
    """A frozen base ``nn.Linear`` plus an optional adapter (own, shared or none)."""

    def __init__(self, base: nn.Linear, target: str, layer: int):
        super().__init__()
        self.base = base
        self.target = target
        self.layer = layer
        self.adapter: nn.Module | None = None  # LoRAAdapter or another adapter kind (see the module doc)
        self.rank_activation_sink: RankActivationSink | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.adapter is None:
            return out
        return out + self.adapter(x, self.rank_activation_sink).to(out.dtype)


# layout[target][layer] -> the LoRALinear at that place
AdapterLayout = dict[str, list[LoRALinear]]

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
            raise UsageError(
                f"LoRA target {target!r} matches no nn.Linear module of {type(model).__name__}"
            )
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
