import pytest
import torch
from conftest import randomize_adapters, tiny_llama_model

from ds_loradrop.errors import UsageError
from ds_loradrop.method.lora import LoRAAdapter
from ds_loradrop.method.placement import (
    attach_own_adapters,
    attach_planned_adapters,
    count_full_lora_parameters,
    count_trainable_parameters,
    freeze_all_but_adapters,
    inject_lora,
    merged_weight,
    named_adapters,
    unique_adapters,
)
from ds_loradrop.method.plan import Plan, TargetPlan
from ds_loradrop.models.loading import enable_activation_checkpointing

pytestmark = pytest.mark.unit
INPUT = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def test_adapter_init_is_kaiming_a_and_zero_b():
    adapter = LoRAAdapter(32, 48, r=8, alpha=16)
    assert adapter.lora_A.shape == (8, 32) and adapter.lora_B.shape == (48, 8)
    assert torch.count_nonzero(adapter.lora_B) == 0
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in=32 gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert adapter.lora_A.abs().max() <= bound and adapter.lora_A.std() > bound / 4
    assert adapter.scaling == 2.0


def test_output_equals_base_model_at_init():
    base = tiny_llama_model()
    expected = base(INPUT).logits
    model = tiny_llama_model()
    layout = inject_lora(model, ["q_proj", "v_proj"])
    attach_own_adapters(layout, r=8, alpha=16, dropout=0.0)
    assert len(layout["q_proj"]) == 4 and len(layout["v_proj"]) == 4
    torch.testing.assert_close(model(INPUT).logits, expected, rtol=0, atol=0)


def test_merged_weights_give_the_same_output():
    model = tiny_llama_model()
    layout = inject_lora(model, ["q_proj", "v_proj"])
    attach_own_adapters(layout, r=4, alpha=8, dropout=0.0)
    randomize_adapters(model)
    adapted = model(INPUT).logits
    assert not torch.allclose(adapted, tiny_llama_model()(INPUT).logits, atol=1e-4)

    merged = tiny_llama_model()
    merged_layout = inject_lora(merged, ["q_proj", "v_proj"])
    with torch.no_grad():
        for target, wrappers in layout.items():
            for wrapper, plain in zip(wrappers, merged_layout[target]):
                plain.base.weight.copy_(merged_weight(wrapper))
    torch.testing.assert_close(merged(INPUT).logits, adapted, rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_a_missing_target_is_an_error():
    model = tiny_llama_model()
    layout = inject_lora(model, ["q_proj"])
    attach_own_adapters(layout, r=8, alpha=16, dropout=0.0)
    freeze_all_but_adapters(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter.lora_" in name for name in trainable)
    # 4 layers x r * (in + out) = 4 * 8 * (32 + 32)
    assert count_trainable_parameters(model) == 4 * 8 * 64 == count_full_lora_parameters(layout, 8)
    with pytest.raises(UsageError, match="'k_proj_typo' matches no nn.Linear"):
        inject_lora(tiny_llama_model(), ["k_proj_typo"])


def _shared_plan(num_layers: int, retained: list[int]) -> Plan:
    others = [i for i in range(num_layers) if i not in retained]
    target = TargetPlan(
        importance=[1.0] * num_layers,
        normalized=[1 / num_layers] * num_layers,
        retained=retained,
        shared=others,
    )
    return Plan(
        targets={"q_proj": target},
        threshold=0.9,
        sample_ratio=0.1,
        num_sampled=1,
        num_tokens=1,
        world_size=1,
        seed=0,
        selection="output_norm",
        low_importance="share",
    )


def test_shared_adapter_is_one_set_of_parameters_counted_once():
    model = tiny_llama_model()
    layout = inject_lora(model, ["q_proj"])
    attach_planned_adapters(layout, _shared_plan(4, retained=[2]), r=8, alpha=16, dropout=0.0)
    freeze_all_but_adapters(model)
    wrappers = layout["q_proj"]
    assert wrappers[0].adapter is wrappers[1].adapter is wrappers[3].adapter
    assert wrappers[2].adapter is not wrappers[0].adapter
    assert len(unique_adapters(model)) == 2
    assert sorted(named_adapters(layout)) == ["q_proj.layers.2", "q_proj.shared"]
    per_adapter = 8 * (32 + 32)
    assert count_trainable_parameters(model) == 2 * per_adapter
    # state_dict() lists the shared module once per owner: that is why we count by identity.
    assert sum(1 for key in model.state_dict() if key.endswith("adapter.lora_A")) == 4


def test_shared_adapter_gradient_is_the_sum_over_the_layers_that_use_it():
    model = tiny_llama_model()
    layout = inject_lora(model, ["q_proj"])
    attach_planned_adapters(layout, _shared_plan(4, retained=[2]), r=4, alpha=8, dropout=0.0)
    randomize_adapters(model)
    freeze_all_but_adapters(model)
    shared = layout["q_proj"][0].adapter
    model(INPUT).logits.square().mean().backward()
    shared_grad_a, shared_grad_b = shared.lora_A.grad.clone(), shared.lora_B.grad.clone()

    # Explicit computation: give each sharing layer its own copy of the shared weights; the shared
    # gradient must equal the sum of the copies' gradients.
    untied = tiny_llama_model()
    untied_layout = inject_lora(untied, ["q_proj"])
    copies = []
    for layer, wrapper in enumerate(layout["q_proj"]):
        adapter = LoRAAdapter(32, 32, r=4, alpha=8)
        with torch.no_grad():
            adapter.lora_A.copy_(wrapper.adapter.lora_A)
            adapter.lora_B.copy_(wrapper.adapter.lora_B)
        untied_layout["q_proj"][layer].adapter = adapter
        if layer != 2:
            copies.append(adapter)
    freeze_all_but_adapters(untied)
    untied(INPUT).logits.square().mean().backward()
    torch.testing.assert_close(shared_grad_a, sum(c.lora_A.grad for c in copies), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shared_grad_b, sum(c.lora_B.grad for c in copies), rtol=1e-5, atol=1e-7)
    assert all(c.lora_B.grad.abs().sum() > 0 for c in copies)


def test_drop_leaves_unretained_layers_without_adapter():
    model = tiny_llama_model()
    layout = inject_lora(model, ["q_proj"])
    plan = _shared_plan(4, retained=[0, 3])
    plan.targets["q_proj"].dropped, plan.targets["q_proj"].shared = [1, 2], []
    attach_planned_adapters(layout, plan, r=8, alpha=16, dropout=0.0)
    assert [w.adapter is None for w in layout["q_proj"]] == [False, True, True, False]
    assert sorted(named_adapters(layout)) == ["q_proj.layers.0", "q_proj.layers.3"]


def test_non_reentrant_activation_checkpointing_gives_the_same_loss_and_gradients_with_a_shared_adapter():
    """--gradient_checkpointing recomputes each decoder layer in backward; with one adapter called from
    several layers (the shared LoRA) loss and gradients must not change."""
    results = []
    for checkpointing in (False, True):
        model = tiny_llama_model()
        model.config.use_cache = False
        if checkpointing:
            enable_activation_checkpointing(model)
        layout = inject_lora(model, ["q_proj"])
        torch.manual_seed(0)
        attach_planned_adapters(layout, _shared_plan(4, retained=[2]), r=8, alpha=16, dropout=0.0)
        freeze_all_but_adapters(model)
        randomize_adapters(model)
        model.train()
        assert model.model.gradient_checkpointing is checkpointing
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-7)
    assert len(grads_plain) == len(grads_ckpt) == 4  # own adapter of layer 2 + the shared one, A and B each
    for plain, ckpt in zip(grads_plain, grads_ckpt):
        assert plain.abs().max() > 0
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)
