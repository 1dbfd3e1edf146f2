"""Validation loss: the mean next-token loss over the target tokens of held-out examples, summed over ranks.

Every rank scores every ``world_size``-th example in batches and runs the same number of forwards (an empty
batch scores an example with no labels), because under ZeRO-3 every forward is a collective.
"""

from __future__ import annotations

import torch

from ds_loradrop.data.batching import IGNORE_INDEX, collate, shard_evenly
from ds_loradrop.training.distributed import all_reduce_sum, get_world_size_and_rank
from ds_loradrop.training.loop import accepts_logits_to_keep, num_positions_to_score, token_loss_sum


def validation_loss(
    engine, examples: list[dict], *, batch_size: int, pad_token_id: int, device: torch.device
) -> float:
    """Mean loss per target token over ``examples`` (``input_ids``, ``labels``), equal on every rank."""
    world_size, rank = get_world_size_and_rank()
    was_training = engine.module.training
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target tokens
    with torch.no_grad():
        for indices in shard_evenly(len(examples), rank, world_size, batch_size):
            batch = collate([examples[i] for i in indices or [0]], pad_token_id)
            labels = batch["labels"].to(device)
            if not indices:
                labels = torch.full_like(labels, IGNORE_INDEX)
            keep = (
                num_positions_to_score(labels) if accepts_logits_to_keep(engine.module) else labels.shape[1]
            )
            output = engine(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                **({"logits_to_keep": keep} if keep < labels.shape[1] else {}),
            )
            labels = labels[:, labels.shape[1] - keep :]
            totals[0] += token_loss_sum(output.logits, labels).double()
            totals[1] += int((labels[:, 1:] != IGNORE_INDEX).sum())
    totals = all_reduce_sum(totals)
    if was_training:
        engine.train()
    return float(totals[0] / totals[1])
