import pytest
import torch
from conftest import randomize_adapters, tiny_llama_model

from ds_loradrop.method.importance import (
    ImportanceRecorder,
    mean_importance,
    normalize_importance,
    squared_output_norm_per_token,
)
from ds_loradrop.method.placement import attach_own_adapters, freeze_all_but_adapters, inject_lora

pytestmark = pytest.mark.unit


def test_gram_form_equals_the_direct_norm():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, generator=generator)
    lora_B = torch.randn(7, 4, generator=generator)
    direct = (2.5 * z @ lora_B.T).square().sum(-1)
    torch.testing.assert_close(squared_output_norm_per_token(z, lora_B, 2.5), direct, rtol=1e-5, atol=1e-6)


def test_recorded_importance_equals_direct_computation_over_non_padding_tokens():
    model = tiny_llama_model(num_layers=3)
    layout = inject_lora(model, ["q_proj", "v_proj"])
    attach_own_adapters(layout, r=4, alpha=8, dropout=0.0)
    randomize_adapters(model)
    input_ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])

    # Direct: capture each projection's input x and compute ||s B A x||^2 over the unmasked tokens.
    inputs = {}
    hooks = [
        w.register_forward_hook(lambda m, args, out: inputs.__setitem__((m.target, m.layer), args[0]))
        for wrappers in layout.values()
        for w in wrappers
    ]
    recorder = ImportanceRecorder(layout)
    with torch.no_grad(), recorder.recording():
        recorder.set_token_mask(mask)
        model(input_ids=input_ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()

    assert recorder.num_tokens.item() == 9
    for t, target in enumerate(["q_proj", "v_proj"]):
        for layer, wrapper in enumerate(layout[target]):
            adapter = wrapper.adapter
            x = inputs[(target, layer)][mask.bool()]  # (9, hidden)
            delta = adapter.scaling * x @ adapter.lora_A.T @ adapter.lora_B.T
            expected = delta.square().sum(-1).mean()
            measured = mean_importance(recorder.sums[t].tolist(), 9)[layer]
            assert measured == pytest.approx(expected.item(), rel=1e-5)
            assert measured > 0


def test_recording_is_off_outside_the_block_and_needs_a_token_mask():
    model = tiny_llama_model(num_layers=2)
    layout = inject_lora(model, ["q_proj"])
    attach_own_adapters(layout, r=4, alpha=8, dropout=0.0)
    recorder = ImportanceRecorder(layout)
    with recorder.recording():
        pass
    assert all(w.rank_activation_sink is None for w in layout["q_proj"])
    with pytest.raises(RuntimeError, match="set_token_mask"), recorder.recording():
        model(torch.zeros(1, 3, dtype=torch.long))


def test_normalisation():
    assert normalize_importance([1.0, 3.0]) == [0.25, 0.75]
    assert normalize_importance([0.0, 0.0]) == [0.5, 0.5]
    assert mean_importance([4.0, 8.0], 4) == [1.0, 2.0]
    with pytest.raises(ValueError, match="zero tokens"):
        mean_importance([1.0], 0)


def test_the_importance_pass_runs_with_dropout_off():
    """With LoRA dropout 0.5, the pass is deterministic and equals the dropout-free computation."""
    from ds_loradrop.method.probe import measure_importance

    model = tiny_llama_model(num_layers=3)
    layout = inject_lora(model, ["q_proj", "v_proj"])
    attach_own_adapters(layout, r=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    model.train()
    rows = [
        {"input_ids": [1, 5, 9, 13, 2], "labels": [-100] * 5},
        {"input_ids": [1, 7, 2], "labels": [-100] * 3},
    ]
    first, tokens = measure_importance(
        model, layout, rows, batch_size=2, pad_token_id=0, device=torch.device("cpu")
    )
    second, _ = measure_importance(
        model, layout, rows, batch_size=1, pad_token_id=0, device=torch.device("cpu")
    )
    assert model.training  # restored
    assert tokens == 8
    for target in first:
        assert first[target] == pytest.approx(second[target], rel=1e-6)
    # the same sums with the dropout modules removed altogether
    for wrappers in layout.values():
        for wrapper in wrappers:
            wrapper.adapter.dropout = torch.nn.Identity()
    third, _ = measure_importance(
        model, layout, rows, batch_size=2, pad_token_id=0, device=torch.device("cpu")
    )
    for target in first:
        assert first[target] == pytest.approx(third[target], rel=1e-6)


class _PlainEngine:
    """The slice of a DeepSpeed engine that trainer.train_stage uses, over a plain model and SGD."""

    def __init__(self, model, learning_rate: float):
        self.module = model
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate)

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()

    def train(self):
        self.module.train()

    def get_lr(self):
        return [self.optimizer.param_groups[0]["lr"]]

    def get_global_grad_norm(self):
        return None


def test_importance_recorded_during_training_equals_the_separate_pass():
    """With the adapters held still (lr 0), recording the training forwards of one epoch gives the same
    sums and token count as the importance pass over the same rows."""
    import random

    from ds_loradrop.data.batching import IGNORE_INDEX
    from ds_loradrop.method.probe import measure_importance, reduce_recorded
    from ds_loradrop.training.ds_config import BatchSettings
    from ds_loradrop.training.loop import train_stage

    model = tiny_llama_model(num_layers=3)
    layout = inject_lora(model, ["q_proj", "v_proj"])
    attach_own_adapters(layout, r=4, alpha=8, dropout=0.0)
    freeze_all_but_adapters(model)
    randomize_adapters(model)
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        ids = [rng.randint(4, 63) for _ in range(rng.randint(4, 20))]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    expected, expected_tokens = measure_importance(
        model, layout, rows, batch_size=5, pad_token_id=0, device=torch.device("cpu")
    )
    recorder = ImportanceRecorder(layout)
    batch = BatchSettings(micro_batch_size=4, gradient_accumulation_steps=2, world_size=1, max_grad_norm=0.0)
    with recorder.recording():
        train_stage(
            _PlainEngine(model, learning_rate=0.0),
            rows,
            batch,
            name="probe",
            num_steps=3,
            seed=1,
            pad_token_id=0,
            logging_steps=10,
            device=torch.device("cpu"),
            before_forward=lambda step, micro_batch: recorder.set_token_mask(micro_batch["attention_mask"]),
        )
    recorded, recorded_tokens = reduce_recorded(recorder, layout, torch.device("cpu"))
    assert recorded_tokens == expected_tokens == sum(len(row["input_ids"]) for row in rows)
    for target in expected:
        assert recorded[target] == pytest.approx(expected[target], rel=1e-5)
        assert all(value > 0 for value in recorded[target])
