"""The importance pass: every rank runs the same number of forwards over its shard of the sample."""

from __future__ import annotations

import torch

from ds_loradrop.data.batching import collate, shard_evenly
from ds_loradrop.method.importance import ImportanceRecorder
from ds_loradrop.method.lora import AdapterLayout
from ds_loradrop.training.distributed import all_reduce_sum, get_world_size_and_rank


@torch.no_grad()
def measure_importance(
    model,
    layout: AdapterLayout,
    examples: list[dict],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> tuple[dict[str, list[float]], float]:
    """Sums of ``||s B A x||^2`` over the non-padding tokens of ``examples``, all-reduced over ranks.

    Dropout is off (eval mode). A rank whose shard ran out still runs a forward (on a masked-out
    dummy batch) because ZeRO-3 gathers parameters collectively in every forward.

    Returns:
        (sums per target, one value per layer; number of tokens), identical on every rank.
    """
    world_size, rank = get_world_size_and_rank()
    recorder = ImportanceRecorder(layout)
    was_training = model.training
    model.eval()
    # Sums do not depend on the order: batch examples of similar length so that little compute is padding.
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    with recorder.recording():
        for positions in shard_evenly(len(examples), rank, world_size, batch_size):
            indices = [by_length[p] for p in positions]
            is_dummy = not indices
            batch = collate([examples[i] for i in (indices or [by_length[0]])], pad_token_id)
            token_mask = batch["attention_mask"] * (0 if is_dummy else 1)
            recorder.set_token_mask(token_mask.to(device))
            # Only the adapters' inputs matter here: skip the LM head for all but one position.
            model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=1,
            )
    model.train(was_training)
    return reduce_recorded(recorder, layout, device)


def reduce_recorded(
    recorder: ImportanceRecorder, layout: AdapterLayout, device: torch.device
) -> tuple[dict[str, list[float]], float]:
    """The recorder's sums per target and its token count, summed over ranks (call on every rank)."""
    totals = torch.cat([recorder.sums.flatten(), recorder.num_tokens.reshape(1)])
    totals = all_reduce_sum(totals.to(device)).cpu()
    num_tokens = float(totals[-1])
    sums = totals[:-1].reshape(recorder.sums.shape)
    return {
        target: sums[i, : len(layout[target])].tolist() for i, target in enumerate(recorder.targets)
    }, num_tokens
