"""The SNIP pass: connection sensitivity of every LoRA entry, summed over examples and ranks.

Each sparse adapter's weights are multiplied by gates ``m = 1`` that require a gradient (plain tensors, not
parameters, so DeepSpeed leaves them alone); ``dL/dm`` accumulates over the rank's examples, is summed over
ranks and its absolute value is the score (the reference code's ``|mask.grad|``). The model's own
parameters are frozen (an inference engine), so nothing is updated.
"""

from __future__ import annotations

import random

import torch

from ds_loradrop.data.batching import collate, shard_evenly
from ds_loradrop.method.sparse_lora import SparseLoRAAdapter
from ds_loradrop.training.distributed import all_reduce_sum, get_world_size_and_rank
from ds_loradrop.training.loop import token_loss_sum


def scoring_indices(num_available: int, num_examples: int, seed: int) -> list[int]:
    """Indices of the examples SNIP scores on: a seeded random subset (all of them if there are fewer)."""
    return sorted(random.Random(seed).sample(range(num_available), min(num_examples, num_available)))


def measure_saliency(
    model,
    adapters: dict[str, SparseLoRAAdapter],
    examples: list[dict],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``|sum over examples of dL/dm|`` per entry, keyed ``{adapter}.mask_A`` / ``{adapter}.mask_B``,
    identical on every rank. ``L`` is the sum of the examples' target-token losses; dropout is off.

    Every rank runs the same number of forwards and backwards (a rank whose shard ran out uses a
    masked-out dummy batch) because ZeRO-3 gathers parameters collectively in both.
    """
    world_size, rank = get_world_size_and_rank()
    for adapter in adapters.values():
        adapter.saliency_gates = (
            torch.ones(adapter.mask_A.shape, device=adapter.mask_A.device, requires_grad=True),
            torch.ones(adapter.mask_B.shape, device=adapter.mask_B.device, requires_grad=True),
        )
    was_training = model.training
    model.eval()
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    try:
        for positions in shard_evenly(len(examples), rank, world_size, batch_size):
            indices = [by_length[p] for p in positions]
            batch = collate([examples[i] for i in (indices or [by_length[0]])], pad_token_id)
            output = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
            loss = token_loss_sum(output.logits, batch["labels"].to(device))
            (loss * (1.0 if indices else 0.0)).backward()
        names = sorted(adapters)
        grads = [
            g.grad if g.grad is not None else torch.zeros_like(g)
            for name in names
            for g in adapters[name].saliency_gates
        ]
        summed = all_reduce_sum(torch.cat([g.detach().double().flatten() for g in grads]).to(device)).cpu()
    finally:
        for adapter in adapters.values():
            adapter.saliency_gates = None
        model.train(was_training)
    scores, offset = {}, 0
    for name in names:
        adapter = adapters[name]
        for key, shape in (("mask_A", adapter.mask_A.shape), ("mask_B", adapter.mask_B.shape)):
            size = shape.numel()
            scores[f"{name}.{key}"] = summed[offset : offset + size].reshape(shape).abs()
            offset += size
    return scores
