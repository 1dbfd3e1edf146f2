"""Sparse Adapter (He et al., 2022) on LoRA: LoRA pruned once at initialisation by SNIP, then trained.

SNIP (Lee et al., 2019) scores each weight by ``|dL/dm|`` for a gate ``m = 1`` multiplied into it, which is
``|w * dL/dw|`` summed over a few hundred training examples; one global ranking over every entry of every
A and B keeps the top ``1 - sparsity`` (0.5: half of LoRA's entries, about LoRA-drop's budget). The masks are
fixed for the whole run: a pruned entry is multiplied by 0 in every forward, so it neither acts nor learns.

Initialisation: with LoRA's zero B every SNIP score is zero (the gradient of A goes through B, and B's
score is ``|g * 0|``), so scoring follows the reference code's other LoRA init ("bert": A and B drawn from
N(0, 0.02)). Training then starts from the same A and B = 0, so the adapted model starts equal to its base
as every other method here does. Trainable parameters: the entries kept.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ds_loradrop.method.lora import AdapterLayout, LoRAAdapter
from ds_loradrop.method.placement import named_adapters

SCORING_INIT_STD = 0.02
MASKS_NAME = "sparse_masks.safetensors"


class SparseLoRAAdapter(LoRAAdapter):
    """A LoRA adapter with fixed 0/1 masks on A and B (all ones until :func:`apply_masks`)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(in_features, out_features, r, alpha, dropout)
        with torch.no_grad():
            self.lora_A.normal_(0.0, SCORING_INIT_STD)
            self.lora_B.normal_(0.0, SCORING_INIT_STD)
        self.register_buffer("mask_A", torch.ones(r, in_features), persistent=False)
        self.register_buffer("mask_B", torch.ones(out_features, r), persistent=False)
        self.saliency_gates: tuple[torch.Tensor, torch.Tensor] | None = None  # set while SNIP scores

    @property
    def num_masked(self) -> int:
        return int((self.mask_A == 0).sum()) + int((self.mask_B == 0).sum())

    def masked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A = self.lora_A * self.mask_A.to(self.lora_A.dtype)
        lora_B = self.lora_B * self.mask_B.to(self.lora_B.dtype)
        if self.saliency_gates is not None:
            gate_A, gate_B = self.saliency_gates
            lora_A, lora_B = lora_A * gate_A.to(lora_A.dtype), lora_B * gate_B.to(lora_B.dtype)
        return lora_A, lora_B

    def forward(self, x: torch.Tensor, rank_activation_sink=None) -> torch.Tensor:
        lora_A, lora_B = self.masked_weights()
        z = F.linear(self.dropout(x.to(lora_A.dtype)), lora_A)
        if rank_activation_sink is not None:
            rank_activation_sink(z, lora_B, self.scaling)
        return F.linear(z, lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        lora_A, lora_B = (t.detach().float() for t in self.masked_weights())
        return lora_B @ lora_A * self.scaling

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        lora_A, lora_B = self.masked_weights()
        return {
            "lora_A": lora_A,
            "lora_B": lora_B,
            "mask_A": self.mask_A.bool(),
            "mask_B": self.mask_B.bool(),
        }


def attach_sparse_adapters(layout: AdapterLayout, r: int, alpha: float, dropout: float = 0.0) -> None:
    """Every wrapped layer gets its own :class:`SparseLoRAAdapter` (unpruned, scoring init)."""
    for wrappers in layout.values():
        for wrapper in wrappers:
            wrapper.adapter = SparseLoRAAdapter(wrapper.in_features, wrapper.out_features, r, alpha, dropout)


def sparse_adapters(layout: AdapterLayout) -> dict[str, SparseLoRAAdapter]:
    return {
        name: adapter
        for name, adapter in named_adapters(layout).items()
        if isinstance(adapter, SparseLoRAAdapter)
    }


def global_keep_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep the ``round((1 - sparsity) * N)`` highest-scoring of all N entries, ranked together (ties: the
    earlier entry in name order). Pure. scores: name -> tensor of any shape. Returns name -> bool mask."""
    names = sorted(scores)
    flat = torch.cat([scores[name].flatten().double() for name in names])
    keep = max(1, round((1.0 - sparsity) * flat.numel()))
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[torch.argsort(flat, descending=True, stable=True)[:keep]] = True
    masks, offset = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = kept[offset : offset + size].reshape(scores[name].shape)
        offset += size
    return masks


def apply_masks(layout: AdapterLayout, masks: dict[str, torch.Tensor]) -> None:
    """Fix the masks (``{adapter}.mask_A`` / ``.mask_B``) and start training: B = 0, pruned A entries 0.

    Call on unpartitioned adapters (before the model goes to DeepSpeed)."""
    with torch.no_grad():
        for name, adapter in sparse_adapters(layout).items():
            adapter.mask_A.copy_(masks[f"{name}.mask_A"])
            adapter.mask_B.copy_(masks[f"{name}.mask_B"])
            adapter.lora_A.mul_(adapter.mask_A)
            adapter.lora_B.zero_()


def masks_digest(masks: dict[str, torch.Tensor]) -> str:
    """A short hash of the masks, to check that every rank holds the same ones."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_masks(masks: dict[str, torch.Tensor], path: str) -> None:
    """Write atomically: a resumed run trusts a masks file that exists."""
    staging = path + ".tmp"
    save_file({name: mask.bool().contiguous() for name, mask in masks.items()}, staging)
    os.replace(staging, path)


def load_masks(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)
