from collections import Counter

import pytest

from ds_loradrop.data.batching import (
    collate,
    global_batches,
    rank_micro_batches,
    shard_evenly,
    stage1_sample_size,
    stratified_sample_indices,
)

pytestmark = pytest.mark.unit

STRATA = ["a"] * 500 + ["b"] * 300 + ["c"] * 150 + ["d"] * 45 + ["e"] * 5


def test_each_stratum_keeps_its_share():
    indices = stratified_sample_indices(STRATA, 0.1, seed=0)
    assert len(indices) == 100 == len(set(indices))
    counts = Counter(STRATA[i] for i in indices)
    for stratum, total in Counter(STRATA).items():
        assert abs(counts[stratum] - 0.1 * total) <= 1, (stratum, counts[stratum], total)
    assert counts["a"] == 50 and counts["b"] == 30 and counts["c"] == 15
    # round(ratio * N), not its floor: 3.7 -> 4 (what check_inputs checks against the global batch)
    assert len(stratified_sample_indices(["x"] * 37, 0.1, seed=0)) == 4 == stage1_sample_size(37, 0.1)


def test_sampling_is_deterministic_by_seed():
    assert stratified_sample_indices(STRATA, 0.2, seed=3) == stratified_sample_indices(STRATA, 0.2, seed=3)
    assert stratified_sample_indices(STRATA, 0.2, seed=3) != stratified_sample_indices(STRATA, 0.2, seed=4)
    assert stratified_sample_indices(STRATA, 1.0, seed=3) == list(range(len(STRATA)))
    assert len(stratified_sample_indices(["x", "y"], 0.01, seed=0)) == 1


def test_global_batches_split_over_ranks_cover_the_same_examples():
    lengths = [(i * 7) % 13 + 1 for i in range(37)]
    batches = global_batches(lengths, 8, seed=1, epoch=0)
    assert len(batches) == 4 and all(len(b) == 8 for b in batches)
    assert len({i for b in batches for i in b}) == 32
    assert (
        batches == global_batches(lengths, 8, seed=1, epoch=0) != global_batches(lengths, 8, seed=1, epoch=1)
    )
    one_rank = rank_micro_batches(batches[0], rank=0, world_size=1, micro_batch_size=4)
    two_ranks = [mb for r in range(2) for mb in rank_micro_batches(batches[0], r, 2, micro_batch_size=2)]
    assert len(one_rank) == 2 and len(two_ranks) == 4
    assert sorted(i for mb in one_rank for i in mb) == sorted(i for mb in two_ranks for i in mb)


def test_even_shards_give_every_rank_the_same_number_of_batches():
    shards = [shard_evenly(7, rank, 2, batch_size=2) for rank in range(2)]
    assert shards[0] == [[0, 2], [4, 6]] and shards[1] == [[1, 3], [5]]
    shards = [shard_evenly(5, rank, 4, batch_size=1) for rank in range(4)]
    assert [len(s) for s in shards] == [2, 2, 2, 2] and shards[3] == [[3], []]


def test_collate_pads_right_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_grouping_reduces_padding_and_keeps_the_examples():
    import random

    lengths = [random.Random(i).randint(5, 100) for i in range(4000)]
    grouped = global_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    plain = global_batches(lengths, 16, seed=0, epoch=0, group_by_length=False)

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    useful = sum(lengths[i] for b in grouped for i in b)
    assert padded_tokens(grouped) < 1.1 * useful < padded_tokens(plain)
    # the batches are not ordered by length across the epoch
    first = [max(lengths[i] for i in b) for b in grouped[:50]]
    assert first != sorted(first, reverse=True)
