"""The LoRA layer maths: the adapter and the linear layer that carries one (placement is in ``placement``).

``h = W x + (alpha / r) * B A x`` with ``A: (r, in_features)`` Kaiming-uniform and ``B: (out_features,
r)`` zeros, so an adapted model starts out equal to its base. Our own small module rather than PEFT:
LoRA-drop needs (a) one adapter *object* called from several layers and (b) the rank-r activation
``A x`` of every layer for the importance measure, and both are plain here.

A shared adapter is one module called from several layers: it is counted and saved by identity.

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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(
        self, x: torch.Tensor, rank_activation_sink: RankActivationSink | None = None
    ) -> torch.Tensor:
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
