"""VeRA (Kopiczko et al., 2023): one frozen random pair shared by every adapted layer, trained scaling
vectors.

``delta(x) = b * (B (d * (A x)))`` with ``A: (r, max_in)`` and ``B: (max_out, r)`` frozen, drawn once
from a seeded generator and shared by all targets (each layer slices ``A[:, :in]`` and ``B[:out]``), and
per layer ``d: (r,)`` (starts at ``d_initial``) and ``b: (out,)`` (starts at zero, so the adapted model
starts equal to its base). No ``alpha / r`` scaling. Trainable parameters: ``r + out`` per layer; the
frozen pair is not counted (the VeRA paper's count).

Follows PEFT's ``tuners/vera`` exactly (same sizing, same Kaiming-uniform draw with gain sqrt(2) from a
``torch.Generator`` seeded with the projection seed, A drawn before B), so the pair equals PEFT's for the
same seed and an exported adapter is a plain PEFT VeRA adapter.

The pair lives in one :class:`VeRAProjection` module, a child of every layer's adapter: frozen buffers,
not parameters, so ZeRO never partitions them, and non-persistent, so checkpoints do not hold one copy
per layer (the adapter files hold it once).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ds_loradrop.method.lora import AdapterLayout

PROJECTION_NAME = "vera_projection"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform over fan-in with gain sqrt(2), as PEFT draws VeRA's pair (bound sqrt(6 / fan_in))."""
    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """The frozen shared pair. ``vera_A: (r, max_in)``, ``vera_B: (max_out, r)``."""

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)

    @classmethod
    def draw(cls, r: int, max_in: int, max_out: int, seed: int) -> VeRAProjection:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vera_A = kaiming_uniform((r, max_in), generator)
        vera_B = kaiming_uniform((max_out, r), generator)
        return cls(vera_A, vera_B)

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]


class VeRAAdapter(nn.Module):
    """One layer's scaling vectors over the shared :class:`VeRAProjection`."""

    num_masked = 0
    is_shared = False  # an own adapter per layer (its shared part is a child module)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        projection: VeRAProjection,
        d_initial: float,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.r = projection.r
        self.projection = projection
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), float(d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))

    @property
    def num_parameters(self) -> int:
        return self.r + self.out_features

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.projection.vera_A[:, : self.in_features], self.projection.vera_B[: self.out_features, :])

    def forward(self, x: torch.Tensor, rank_activation_sink=None) -> torch.Tensor:
        """Args: x (..., in_features). Returns (..., out_features)."""
        vera_A, vera_B = self._sliced()
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        z = self.vera_lambda_d * F.linear(x, vera_A.to(x.dtype))
        return self.vera_lambda_b * F.linear(z, vera_B.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        vera_A, vera_B = (t.detach().float() for t in self._sliced())
        d, b = self.vera_lambda_d.detach().float(), self.vera_lambda_b.detach().float()
        return (b.unsqueeze(-1) * vera_B) @ (d.unsqueeze(-1) * vera_A)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_d": self.vera_lambda_d, "vera_lambda_b": self.vera_lambda_b}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{PROJECTION_NAME}.vera_A": self.projection.vera_A,
            f"{PROJECTION_NAME}.vera_B": self.projection.vera_B,
        }


def largest_shape(layout: AdapterLayout) -> tuple[int, int]:
    """(max in_features, max out_features) over every wrapped layer: the size of the shared pair."""
    wrappers = [w for ws in layout.values() for w in ws]
    return max(w.in_features for w in wrappers), max(w.out_features for w in wrappers)


def attach_vera_adapters(
    layout: AdapterLayout,
    r: int,
    d_initial: float,
    projection_seed: int,
    dropout: float = 0.0,
    projection: VeRAProjection | None = None,
) -> VeRAProjection:
    """Give every wrapped layer a VeRA adapter over one shared pair (drawn from ``projection_seed`` unless
    a saved ``projection`` is given). Returns the pair."""
    if projection is None:
        max_in, max_out = largest_shape(layout)
        projection = VeRAProjection.draw(r, max_in, max_out, projection_seed)
    for wrappers in layout.values():
        for wrapper in wrappers:
            wrapper.adapter = VeRAAdapter(
                wrapper.in_features, wrapper.out_features, projection, d_initial, dropout
            )
    return projection
