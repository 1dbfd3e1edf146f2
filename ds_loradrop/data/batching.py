"""Examples to tensors: stratified sampling, tokenisation with target-only labels, global batches.

Global batches are planned so that a run is the same whatever the number of ranks: an epoch is a
seeded permutation cut into global batches of ``micro * accumulation * world_size`` examples; each
rank takes every ``world_size``-th example of a global batch and cuts that into micro-batches. The loss
is normalised by the target-token count of the whole global batch (see ``trainer.py``), so the
gradient is the same however the global batch is split.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict

import datasets
import torch

from ds_loradrop.data import chat

IGNORE_INDEX = chat.IGNORE_INDEX


def stage1_sample_size(num_examples: int, ratio: float) -> int:
    """How many examples the stratified sample of ``num_examples`` holds: ``round(ratio * N)``, at least 1."""
    return max(1, round(ratio * num_examples))


def stratified_sample_indices(strata: list[str], ratio: float, seed: int) -> list[int]:
    """A stratified random sample of :func:`stage1_sample_size` examples.

    Each stratum gets ``floor(ratio * n_s)`` examples, and those left over go to the strata with the
    largest remainders (ties by stratum name), so every stratum's share is within one example of
    ``ratio * n_s``. Rows within a stratum are drawn with ``random.Random(seed)``.

    Returns:
        sampled indices, ascending.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        by_stratum[stratum].append(index)
    names = sorted(by_stratum)
    quotas = {name: ratio * len(by_stratum[name]) for name in names}
    counts = {name: math.floor(quotas[name]) for name in names}
    total = stage1_sample_size(len(strata), ratio)
    by_remainder = sorted(names, key=lambda name: (-(quotas[name] - counts[name]), name))
    for name in by_remainder[: max(0, total - sum(counts.values()))]:
        counts[name] += 1
    rng = random.Random(seed)
    sampled = []
    for name in names:
        sampled.extend(rng.sample(by_stratum[name], counts[name]))
    return sorted(sampled)


def stratified_sample(examples: list[dict], ratio: float, seed: int) -> list[dict]:
    """Stage 1's sample of tokenised ``examples`` (each with a ``stratum``), in their order."""
    return [examples[i] for i in stratified_sample_indices([ex["stratum"] for ex in examples], ratio, seed)]


def clip_prompt(prompt_ids: list[int], max_tokens: int, bos_token_id: int | None) -> list[int]:
    """Keep the *end* of an over-long prompt (it says what to produce), and its BOS token if it has one.
    Training and generation clip prompts the same way."""
    if len(prompt_ids) <= max_tokens:
        return prompt_ids
    if bos_token_id is not None and prompt_ids and prompt_ids[0] == bos_token_id and max_tokens > 1:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - (max_tokens - 1) :]
    return prompt_ids[len(prompt_ids) - max_tokens :]


def tokenize_examples(
    examples: datasets.Dataset, tokenizer, max_seq_length: int
) -> tuple[datasets.Dataset, int]:
    """Prompt + target + EOS as ``input_ids``; ``labels`` are -100 on the prompt. Chat examples (a
    ``messages`` column) are whole conversations with labels on the assistant turns
    (:func:`chat.encode_conversation`), cut at ``max_seq_length``.

    An example longer than ``max_seq_length`` keeps the end of its prompt (at least half the budget,
    more where the target is short) and as much of its target as then fits. Examples left with no
    target token (an empty reference) are dropped.

    Returns:
        (dataset with ``input_ids``, ``labels`` and the input's other columns except ``prompt`` and
        ``target``, number of truncated examples).
    """
    bos_token_id = getattr(tokenizer, "bos_token_id", None)
    is_chat = "messages" in examples.column_names
    if is_chat:
        chat.require_chat_template(tokenizer)

    def encode_chat(batch: dict) -> dict:
        input_ids, labels, truncated = [], [], []
        for messages in batch["messages"]:
            ids, row_labels = chat.encode_conversation(tokenizer, json.loads(messages))
            truncated.append(len(ids) > max_seq_length)
            input_ids.append(ids[:max_seq_length])
            labels.append(row_labels[:max_seq_length])
        return {"input_ids": input_ids, "labels": labels, "truncated": truncated}

    def encode(batch: dict) -> dict:
        prompts = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
        targets = tokenizer(batch["target"], add_special_tokens=False)["input_ids"]
        input_ids, labels, truncated = [], [], []
        for prompt_ids, target_ids in zip(prompts, targets):
            target_ids = target_ids + [tokenizer.eos_token_id]
            is_long = len(prompt_ids) + len(target_ids) > max_seq_length
            if is_long:
                prompt_budget = min(
                    len(prompt_ids), max(max_seq_length - len(target_ids), max_seq_length // 2)
                )
                prompt_ids = clip_prompt(prompt_ids, prompt_budget, bos_token_id)
                target_ids = target_ids[: max_seq_length - len(prompt_ids)]
            input_ids.append(prompt_ids + target_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
            truncated.append(is_long)
        return {"input_ids": input_ids, "labels": labels, "truncated": truncated}

    # In memory: several ranks map the same data at once, and the result is small.
    tokenized = examples.map(
        encode_chat if is_chat else encode,
        batched=True,
        remove_columns=["prompt", "target", *(["messages"] if is_chat else [])],
        keep_in_memory=True,
        desc="tokenize",
    )
    num_truncated = int(sum(tokenized["truncated"]))
    tokenized = tokenized.filter(
        lambda ex: any(t != IGNORE_INDEX for t in ex["labels"]), keep_in_memory=True, desc="filter"
    )
    return tokenized.remove_columns("truncated"), num_truncated


LENGTH_GROUP_BATCHES = 50


def global_batches(
    lengths: list[int], global_batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """One epoch as global batches of example indices; the last incomplete batch is dropped.

    With ``group_by_length`` the seeded permutation is cut into chunks of ``LENGTH_GROUP_BATCHES``
    global batches, each chunk is ordered by length (longest first) and cut into global batches, and the
    batches are shuffled again: batches hold examples of similar length, so little compute goes to
    padding. The batches depend only on the lengths, the global batch size, the seed and the epoch,
    never on the number of ranks.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    num_batches = len(order) // global_batch_size
    order = order[: num_batches * global_batch_size]
    if group_by_length:
        chunk = LENGTH_GROUP_BATCHES * global_batch_size
        order = [
            i
            for start in range(0, len(order), chunk)
            for i in sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        ]
    batches = [order[i * global_batch_size : (i + 1) * global_batch_size] for i in range(num_batches)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def rank_micro_batches(
    global_batch: list[int], rank: int, world_size: int, micro_batch_size: int
) -> list[list[int]]:
    """This rank's share of a global batch, cut into micro-batches."""
    mine = global_batch[rank::world_size]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def shard_evenly(num_examples: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Every ``world_size``-th example for this rank, in batches; every rank gets the same number of
    batches (the last ones may be empty lists), because under ZeRO-3 every rank must run every forward."""
    mine = list(range(rank, num_examples, world_size))
    num_batches = math.ceil(math.ceil(num_examples / world_size) / batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One row per example: ``input_ids`` / ``labels`` right-padded to the longest; ``attention_mask``
    marks real tokens."""
    length = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The examples as ONE row without padding (padding-free): ``position_ids`` restart at 0 for each
    example, so the model's attention stays inside each example (transformers builds a block-diagonal
    causal mask from them for SDPA / eager, FlashAttention takes them as sequence boundaries) and RoPE
    sees each example's own positions. An example's first label is ignored: it would be predicted from
    the previous example. ``attention_mask`` (all ones) marks the real tokens for the importance
    recorder; the model is not given it. Shapes (1, total tokens)."""
    input_ids = torch.tensor([t for ex in examples for t in ex["input_ids"]], dtype=torch.long)
    labels = torch.tensor([t for ex in examples for t in ex["labels"]], dtype=torch.long)
    position_ids = torch.cat([torch.arange(len(ex["input_ids"])) for ex in examples])
    labels[position_ids == 0] = IGNORE_INDEX
    return {
        "input_ids": input_ids[None],
        "labels": labels[None],
        "position_ids": position_ids[None],
        "attention_mask": torch.ones_like(input_ids)[None],
    }
