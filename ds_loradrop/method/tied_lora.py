"""Tied-LoRA (Renduchintala et al., 2023), its TL6 form: one trainable low-rank pair per target tied across
all layers, and trained scaling vectors per layer.

``delta(x) = scaling * v * (B (u * (A x)))`` with ``A: (r, in)`` and ``B: (out, r)`` shared by every layer
of a target (q_proj layers share one pair, v_proj layers another: their shapes differ under GQA), and per
layer ``u: (r,)`` and ``v: (out,)``. Initialised as LoRA (A Kaiming-uniform, B zero) with u = v = 1, so
training starts exactly where LoRA does and the adapted model starts equal to its base; ``scaling =
alpha / r``. Trainable parameters: ``r (in + out)`` once per target plus ``r + out`` per layer.

The tied pair is a :class:`TiedPair` module that every layer's adapter calls, which is the shared adapter's
case under ZeRO-3 (one module called from several layers, gathered for each call, its gradient summed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ds_loradrop.method.lora import AdapterLayout


def tied_pair_name(target: str) -> str:
    return f"{target}.tied"


class TiedPair(nn.Module):
    """The trainable pair of one target. Its parameters are used inside its own ``forward`` so that ZeRO-3
    gathers them for each call."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        z = u * F.linear(x.to(self.lora_A.dtype), self.lora_A)
        return v * F.linear(z, self.lora_B) * scaling


class TiedLoRAAdapter(nn.Module):
    """One layer's ``u`` and ``v`` over its target's :class:`TiedPair`."""

    num_masked = 0
    is_shared = False  # an own adapter per layer (its shared part is a child module)

    def __init__(self, pair: TiedPair, target: str, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.pair = pair
        self.target = target
        self.r, self.in_features = pair.lora_A.shape  # built before ZeRO partitions anything
        self.out_features = pair.lora_B.shape[0]
        self.scaling = alpha / self.r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.tied_u = nn.Parameter(torch.ones(self.r))
        self.tied_v = nn.Parameter(torch.ones(self.out_features))

    @property
    def num_parameters(self) -> int:
        return self.r + self.out_features

    def forward(self, x: torch.Tensor, rank_activation_sink=None) -> torch.Tensor:
        """Args: x (..., in_features). Returns (..., out_features)."""
        return self.pair(self.dropout(x), self.tied_u, self.tied_v, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.pair.lora_A.detach().float(), self.pair.lora_B.detach().float()
        u, v = self.tied_u.detach().float(), self.tied_v.detach().float()
        return (v.unsqueeze(-1) * B) @ (u.unsqueeze(-1) * A) * self.scaling

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"tied_u": self.tied_u, "tied_v": self.tied_v}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        name = tied_pair_name(self.target)
        return {f"{name}.lora_A": self.pair.lora_A, f"{name}.lora_B": self.pair.lora_B}


def attach_tied_adapters(
    layout: AdapterLayout,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    pairs: dict[str, TiedPair] | None = None,
) -> dict[str, TiedPair]:
    """Give every wrapped layer a Tied-LoRA adapter over its target's pair (new ones unless ``pairs`` given,
    e.g. loaded from a file). Returns the pairs by target."""
    pairs = dict(pairs or {})
    for target, wrappers in layout.items():
        if target not in pairs:
            pairs[target] = TiedPair(wrappers[0].in_features, wrappers[0].out_features, r)
        for wrapper in wrappers:
            wrapper.adapter = TiedLoRAAdapter(pairs[target], target, alpha, dropout)
    return pairs
