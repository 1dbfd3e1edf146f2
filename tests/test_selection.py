import pytest

from ds_loradrop.method.plan import build_plan
from ds_loradrop.method.selection import order_by_importance, select_by_threshold, select_layers

pytestmark = pytest.mark.unit

PROFILE = [0.05, 0.30, 0.10, 0.25, 0.05, 0.25]  # sums to 1


def test_threshold_one_keeps_every_layer():
    assert select_by_threshold(PROFILE, 1.0) == list(range(6))
    assert select_by_threshold([1.0, 0.0, 0.0], 1.0) == [0, 1, 2]


def test_tiny_threshold_keeps_the_most_important_layer_only():
    assert select_by_threshold(PROFILE, 1e-6) == [1]


def test_threshold_walks_from_most_to_least_important():
    # 0.30 (L1) + 0.25 (L3) + 0.25 (L5) = 0.80 >= 0.8; ties L3/L5 broken by index
    assert select_by_threshold(PROFILE, 0.8) == [1, 3, 5]
    # 0.80 + 0.10 (L2) = 0.90
    assert select_by_threshold(PROFILE, 0.9) == [1, 2, 3, 5]
    # rounding: 0.1 + 0.2 + ... sums that land a hair under T still count as reaching it
    assert select_by_threshold([0.1, 0.2, 0.7], 0.3) == [2]


def test_ties_are_broken_by_layer_index_deterministically():
    assert order_by_importance([0.25, 0.25, 0.25, 0.25]) == [0, 1, 2, 3]
    assert select_by_threshold([0.25] * 4, 0.5) == [0, 1]
    assert order_by_importance([0.1, 0.4, 0.1, 0.4]) == [1, 3, 0, 2]


def test_inverse_retains_exactly_the_layers_output_norm_would_share():
    # the paper's "ΔWx inv": the important layers [1, 2, 3, 5] share one adapter, the others keep their own
    assert select_by_threshold(PROFILE, 0.9) == [1, 2, 3, 5]
    assert select_layers(PROFILE, 0.9, "inverse", seed=0) == [0, 4]
    assert select_layers(PROFILE, 0.8, "inverse", seed=0) == [0, 2, 4]
    assert select_layers(PROFILE, 1.0, "inverse", seed=0) == []  # T = 1: every layer shares
    plan = build_plan(
        {"q_proj": [5.0, 30.0, 10.0, 25.0, 5.0, 25.0]},
        100.0,
        threshold=0.9,
        selection="inverse",
        low_importance="share",
        seed=0,
        sample_ratio=0.1,
        num_sampled=3,
        world_size=1,
    )
    assert plan.targets["q_proj"].retained == [0, 4] and plan.targets["q_proj"].shared == [1, 2, 3, 5]


def test_random_and_last_k_keep_as_many_layers_as_output_norm():
    k = len(select_by_threshold(PROFILE, 0.9))
    assert select_layers(PROFILE, 0.9, "last_k", seed=0) == [2, 3, 4, 5]
    first = select_layers(PROFILE, 0.9, "random", seed=7)
    assert len(first) == k and first == select_layers(PROFILE, 0.9, "random", seed=7)
    assert any(select_layers(PROFILE, 0.9, "random", seed=s) != first for s in range(1, 10))
    with pytest.raises(ValueError, match="unknown selection"):
        select_layers(PROFILE, 0.9, "best", seed=0)


def test_plan_selects_each_target_independently():
    sums = {"q_proj": [4.0, 1.0, 1.0, 2.0], "v_proj": [1.0, 1.0, 1.0, 9.0]}
    plan = build_plan(
        sums,
        2.0,
        threshold=0.7,
        selection="output_norm",
        low_importance="share",
        seed=0,
        sample_ratio=0.1,
        num_sampled=3,
        world_size=1,
    )
    q, v = plan.targets["q_proj"], plan.targets["v_proj"]
    assert q.importance == [2.0, 0.5, 0.5, 1.0] and q.normalized == [0.5, 0.125, 0.125, 0.25]
    assert q.retained == [0, 3] and q.shared == [1, 2] and q.dropped == []
    assert v.retained == [3] and v.shared == [0, 1, 2]
    dropped = build_plan(
        sums,
        2.0,
        threshold=0.7,
        selection="output_norm",
        low_importance="drop",
        seed=0,
        sample_ratio=0.1,
        num_sampled=3,
        world_size=1,
    )
    assert dropped.targets["v_proj"].dropped == [0, 1, 2] and dropped.targets["v_proj"].shared == []
    assert plan.mask_digest() != dropped.mask_digest()
    assert plan.layer_mask() == {"q_proj": [0, 3], "v_proj": [3]}
