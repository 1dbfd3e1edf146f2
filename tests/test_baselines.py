"""The paper's other baselines as adapters (VeRA, Tied-LoRA, SNIP-pruned LoRA): their maths against their
references, their counts, and their flags (in process; the distributed runs are in
test_baselines_distributed.py)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_llama_model

from ds_loradrop.errors import UsageError
from ds_loradrop.method.placement import (
    count_trainable_parameters,
    freeze_all_but_adapters,
    inject_lora,
    merged_weight,
)
from ds_loradrop.method.snip import measure_saliency, scoring_indices
from ds_loradrop.method.sparse_lora import (
    apply_masks,
    attach_sparse_adapters,
    global_keep_masks,
    masks_digest,
    sparse_adapters,
)
from ds_loradrop.method.tied_lora import attach_tied_adapters
from ds_loradrop.method.vera import attach_vera_adapters
from ds_loradrop.recipes.cli import parse_run_config

pytestmark = pytest.mark.unit


def gqa_llama(num_layers: int = 3, seed: int = 0):
    """Like SmolLM2: v_proj (32 -> 16) narrower than q_proj (32 -> 32)."""
    return tiny_llama_model(num_layers, seed, num_key_value_heads=2)


IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(5))


# --- VeRA ----------------------------------------------------------------------------------------------


def test_vera_equals_peft_vera_with_the_same_vectors():
    from peft import VeraConfig, get_peft_model

    ours = gqa_llama()
    layout = inject_lora(ours, ["q_proj", "v_proj"])
    attach_vera_adapters(layout, r=16, d_initial=0.1, projection_seed=7)
    with torch.no_grad():
        base = ours(IDS).logits
        assert torch.equal(base, gqa_llama()(IDS).logits)  # b = 0: starts equal to the base model
    peft_model = get_peft_model(
        gqa_llama(),
        VeraConfig(r=16, target_modules=["q_proj", "v_proj"], projection_prng_key=7, d_initial=0.1),
    )
    peft_state = peft_model.state_dict()
    assert torch.equal(peft_state["base_model.vera_A.default"], layout["q_proj"][0].adapter.projection.vera_A)
    assert torch.equal(peft_state["base_model.vera_B.default"], layout["v_proj"][2].adapter.projection.vera_B)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for target, wrappers in layout.items():
            for wrapper in wrappers:
                wrapper.adapter.vera_lambda_b.copy_(torch.randn(wrapper.out_features, generator=generator))
                wrapper.adapter.vera_lambda_d.copy_(torch.randn(16, generator=generator))
                prefix = f"base_model.model.model.layers.{wrapper.layer}.self_attn.{target}"
                peft_model.get_parameter(f"{prefix}.vera_lambda_b.default").copy_(
                    wrapper.adapter.vera_lambda_b
                )
                peft_model.get_parameter(f"{prefix}.vera_lambda_d.default").copy_(
                    wrapper.adapter.vera_lambda_d
                )
        theirs, mine = peft_model(IDS).logits, ours(IDS).logits
    assert (mine - base).abs().max() > 1e-3
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_vera_counts_only_its_vectors_and_shares_one_frozen_pair():
    model = gqa_llama()
    layout = inject_lora(model, ["q_proj", "v_proj"])
    projection = attach_vera_adapters(layout, r=16, d_initial=0.1, projection_seed=0)
    freeze_all_but_adapters(model)
    # q: 32 -> 32, v: 32 -> 16 (GQA); r + out per layer, the pair (16 x 32 and 32 x 16) not counted
    assert count_trainable_parameters(model) == 3 * (16 + 32) + 3 * (16 + 16)
    assert {id(w.adapter.projection) for ws in layout.values() for w in ws} == {id(projection)}
    assert tuple(projection.vera_A.shape) == (16, 32) and tuple(projection.vera_B.shape) == (32, 16)
    assert not any(p.requires_grad for p in projection.parameters()) and "vera_A" not in str(
        model.state_dict().keys()
    )


# --- Tied-LoRA -------------------------------------------------------------------------------------------


def test_tied_lora_ties_one_trainable_pair_per_target_and_counts_it_once():
    model = gqa_llama()
    layout = inject_lora(model, ["q_proj", "v_proj"])
    pairs = attach_tied_adapters(layout, r=4, alpha=8.0)
    freeze_all_but_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, gqa_llama()(IDS).logits, rtol=0, atol=0)  # B = 0
    tied = 4 * (32 + 32) + 4 * (32 + 16)
    per_layer = 3 * (4 + 32) + 3 * (4 + 16)
    assert count_trainable_parameters(model) == tied + per_layer
    assert {id(w.adapter.pair) for w in layout["q_proj"]} == {id(pairs["q_proj"])}
    assert pairs["q_proj"] is not pairs["v_proj"]
    # one backward: the tied pair's gradient is the sum over its layers, u and v get their own
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pair in pairs.values():
            pair.lora_B.copy_(torch.randn(pair.lora_B.shape, generator=generator) * 0.1)
    model(IDS, labels=IDS).loss.backward()
    assert pairs["q_proj"].lora_A.grad.abs().sum() > 0
    assert all(w.adapter.tied_v.grad.abs().sum() > 0 for w in layout["v_proj"])


def test_tied_lora_delta_weight_is_what_forward_adds():
    model = gqa_llama()
    layout = inject_lora(model, ["q_proj", "v_proj"])
    attach_tied_adapters(layout, r=4, alpha=8.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in (p for ws in layout.values() for w in ws for p in w.adapter.parameters()):
            param.copy_(torch.randn(param.shape, generator=generator))
        wrapper = layout["v_proj"][1]
        x = torch.randn(5, 32, generator=generator)
        expected = x @ merged_weight(wrapper).T
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)


# --- SNIP-pruned LoRA --------------------------------------------------------------------------------------


def test_global_keep_masks_rank_all_entries_together():
    scores = {"b": torch.tensor([[0.5, 0.1], [0.9, 0.2]]), "a": torch.tensor([0.3, 0.3, 0.0, 0.8])}
    masks = global_keep_masks(scores, sparsity=0.5)
    # 8 entries, keep 4: 0.9, 0.8, 0.5 and the first 0.3 in name order ("a" before "b")
    assert masks["a"].tolist() == [True, False, False, True]
    assert masks["b"].tolist() == [[True, False], [True, False]]
    assert sum(int(m.sum()) for m in global_keep_masks(scores, sparsity=0.0).values()) == 8
    assert masks_digest(masks) != masks_digest(global_keep_masks(scores, sparsity=0.25))


def _sparse_model(seed=0):
    model = tiny_llama_model(num_layers=2, seed=seed)
    layout = inject_lora(model, ["q_proj", "v_proj"])
    torch.manual_seed(11)
    attach_sparse_adapters(layout, r=4, alpha=8.0)
    return model, layout


def _rows(num_rows=6):
    generator = torch.Generator().manual_seed(2)
    rows = []
    for i in range(num_rows):
        ids = torch.randint(3, 64, (7 + i,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 3 + ids[3:]})
    return rows


def test_snip_scores_are_weight_times_gradient_summed_over_examples():
    """|sum_examples dL/dm| for the gate m on each entry equals |w * dL/dw| computed directly."""
    model, layout = _sparse_model()
    rows = _rows()
    scores = measure_saliency(
        model, sparse_adapters(layout), rows, batch_size=4, pad_token_id=0, device=torch.device("cpu")
    )
    reference_model, reference_layout = _sparse_model()
    adapters = sparse_adapters(reference_layout)
    from ds_loradrop.data.batching import collate
    from ds_loradrop.training.loop import token_loss_sum

    for row in rows:  # one example at a time: the sum over examples does not depend on batching
        batch = collate([row], 0)
        token_loss_sum(reference_model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    for name, adapter in adapters.items():
        torch.testing.assert_close(
            scores[f"{name}.mask_A"],
            (adapter.lora_A * adapter.lora_A.grad).abs().double(),
            rtol=1e-4,
            atol=1e-7,
        )
        torch.testing.assert_close(
            scores[f"{name}.mask_B"],
            (adapter.lora_B * adapter.lora_B.grad).abs().double(),
            rtol=1e-4,
            atol=1e-7,
        )
    assert all(float(s.max()) > 0 for s in scores.values())
    assert all(adapter.saliency_gates is None for adapter in sparse_adapters(layout).values())


def test_pruned_lora_starts_at_the_base_model_keeps_its_zeros_and_counts_kept_entries():
    model, layout = _sparse_model()
    base = tiny_llama_model(num_layers=2)
    scores = measure_saliency(
        model, sparse_adapters(layout), _rows(), batch_size=4, pad_token_id=0, device=torch.device("cpu")
    )
    masks = global_keep_masks(scores, sparsity=0.5)
    fresh, fresh_layout = _sparse_model()
    scored_A = {name: a.lora_A.detach().clone() for name, a in sparse_adapters(fresh_layout).items()}
    apply_masks(fresh_layout, masks)
    freeze_all_but_adapters(fresh)
    lora_entries = 4 * 4 * (32 + 32)
    assert count_trainable_parameters(fresh) == lora_entries // 2
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(IDS[:, :8] % 64).logits, base(IDS[:, :8] % 64).logits, rtol=0, atol=0
        )
    for name, adapter in sparse_adapters(fresh_layout).items():  # training starts from the scored A
        torch.testing.assert_close(adapter.lora_A, scored_A[name] * masks[f"{name}.mask_A"])
    optimizer = torch.optim.AdamW(
        [p for p in fresh.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    fresh.train()
    for _ in range(3):
        fresh(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, adapter in sparse_adapters(fresh_layout).items():
        saved = adapter.saved_tensors()
        assert torch.all(saved["lora_A"][~masks[f"{name}.mask_A"]] == 0)
        assert torch.all(adapter.lora_B[~masks[f"{name}.mask_B"]] == 0)  # stays exactly zero
        assert adapter.lora_B[masks[f"{name}.mask_B"]].abs().max() > 0  # the kept entries learn
        assert torch.equal(saved["mask_B"], masks[f"{name}.mask_B"])


def test_scoring_indices_are_a_seeded_subset():
    assert scoring_indices(1000, 320, seed=3) == scoring_indices(1000, 320, seed=3)
    assert scoring_indices(1000, 320, seed=3) != scoring_indices(1000, 320, seed=4)
    assert len(set(scoring_indices(1000, 320, seed=3))) == 320 and scoring_indices(50, 320, seed=3) == list(
        range(50)
    )


# --- flags ---------------------------------------------------------------------------------------------


@pytest.fixture
def base_args(tiny_run_args):
    return tiny_run_args


def test_method_defaults_are_the_papers(base_args):
    vera = parse_run_config(base_args + ["--method", "vera"]).lora
    assert (vera.vera_r, vera.vera_d_initial, vera.vera_projection_seed) == (512, 0.1, 0)
    assert (vera.lora_r, vera.lora_alpha) == (None, None)  # not VeRA settings: a saved config reads back
    tied = parse_run_config(base_args + ["--method", "tied_lora"]).lora
    assert (tied.tied_lora_r, tied.lora_alpha) == (56, 112.0)
    sparse = parse_run_config(base_args + ["--method", "sparse_lora"]).lora
    assert (sparse.sparsity, sparse.snip_examples, sparse.lora_r) == (0.5, 320, 8)
    assert parse_run_config(base_args).lora.vera_r is None  # loradrop: no baseline setting filled in


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vera_r", "64"], "--vera_r is a setting of --method vera; this run is --method loradrop"),
        (
            ["--method", "lora", "--sparsity", "0.3"],
            "--sparsity is a setting of --method sparse_lora; this run is --method lora",
        ),
        (["--method", "vera", "--tied_lora_r", "8"], "--tied_lora_r is a setting of --method tied_lora"),
        (
            ["--method", "tied_lora", "--snip_examples", "10"],
            "--snip_examples is a setting of --method sparse_lora",
        ),
        (
            ["--method", "vera", "--lora_r", "16"],
            "--lora_r does not apply to --method vera (its rank is --vera_r",
        ),
        (["--method", "vera", "--lora_alpha", "16"], "--lora_alpha does not apply to --method vera"),
        (["--method", "tied_lora", "--lora_r", "16"], "--lora_r does not apply to --method tied_lora"),
        (["--method", "vera", "--vera_r", "0"], "--vera_r must be a positive integer, got 0"),
        (["--method", "vera", "--vera_d_initial", "0"], "--vera_d_initial must be > 0"),
        (["--method", "vera", "--vera_projection_seed", "-1"], "--vera_projection_seed must be >= 0, got -1"),
        (
            ["--method", "tied_lora", "--tied_lora_r", "-2"],
            "--tied_lora_r must be a positive integer, got -2",
        ),
        (["--method", "sparse_lora", "--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
        (["--method", "sparse_lora", "--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
        (["--method", "sparse_lora", "--snip_examples", "0"], "--snip_examples must be > 0, got 0"),
        (
            ["--method", "vera", "--plan", "plan.json"],
            "--plan is a LoRA-drop layout; --method vera does not use one",
        ),
    ],
)
def test_bad_baseline_flags(base_args, extra, message):
    from ds_loradrop.recipes.checks import check_inputs

    with pytest.raises(UsageError, match=re.escape(message)):
        check_inputs(parse_run_config(base_args + extra))


@pytest.mark.parametrize("method", ["vera", "tied_lora", "sparse_lora"])
def test_a_saved_run_configuration_reads_back(base_args, method):
    from ds_loradrop.config import RunConfig

    cfg = parse_run_config(base_args + ["--method", method])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.reference_lora_r == 8
