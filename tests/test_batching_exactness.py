"""Length-grouped batches change which examples share a batch, never an example's loss: the summed token
loss of a set of examples is the same in random padded batches (the PEFT peer's way) and in the
trainer's length-grouped ones, and equals each example run alone without padding (fp32, <= 1e-5)."""

import random

import pytest
import torch
from conftest import tiny_llama_model

from ds_loradrop.data.batching import IGNORE_INDEX, collate, global_batches
from ds_loradrop.training.loop import token_loss_sum

pytestmark = pytest.mark.unit


def _rows(num_rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt, target = rng.randint(3, 30), rng.randint(1, 20)
        ids = [rng.randint(4, 63) for _ in range(prompt + target)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


@torch.no_grad()
def _summed_loss(model, rows: list[dict], batches: list[list[int]]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for indices in batches:
        batch = collate([rows[i] for i in indices], pad_token_id=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += token_loss_sum(logits, batch["labels"]).double()
    return total


def test_grouped_and_random_padded_batches_give_the_same_loss():
    model = tiny_llama_model(num_layers=2)
    rows = _rows(48)
    order = list(range(len(rows)))
    random.Random(1).shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    grouped = global_batches(
        [len(row["input_ids"]) for row in rows], 8, seed=3, epoch=0, group_by_length=True
    )
    assert sorted(i for batch in grouped for i in batch) == list(range(len(rows)))
    padding = {
        name: sum(max(len(rows[i]["input_ids"]) for i in b) * len(b) for b in batches)
        for name, batches in (("random", random_batches), ("grouped", grouped))
    }
    assert padding["grouped"] < padding["random"]  # the change does spend less compute

    alone = _summed_loss(model, rows, [[i] for i in range(len(rows))])
    for batches in (random_batches, grouped):
        torch.testing.assert_close(_summed_loss(model, rows, batches), alone, rtol=1e-5, atol=1e-5)


def test_logits_only_from_the_first_target_position_give_the_same_loss_and_gradients():
    """The trainer asks the model for logits of the trailing positions from the first labelled token on
    (``logits_to_keep``): the loss and the gradients equal those from logits at every position."""
    from ds_loradrop.training.loop import accepts_logits_to_keep, num_positions_to_score

    model = tiny_llama_model(num_layers=2)
    assert accepts_logits_to_keep(model)
    rows = _rows(8, seed=5)
    for row in rows[:4]:  # long prompts and short ones in one batch
        row["labels"][: len(row["labels"]) - 2] = [IGNORE_INDEX] * (len(row["labels"]) - 2)
    batch = collate(rows, pad_token_id=0)
    labels = batch["labels"]
    keep = num_positions_to_score(labels)
    first = min(row["labels"].index(next(t for t in row["labels"] if t != IGNORE_INDEX)) for row in rows)
    assert keep == labels.shape[1] - (first - 1) < labels.shape[1]
    losses, grads = [], []
    for kwargs, scored in (({}, labels), ({"logits_to_keep": keep}, labels[:, labels.shape[1] - keep :])):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
        loss = token_loss_sum(logits, scored)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert logits.shape[1] == keep
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for full, kept in zip(*grads):
        torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    no_labels = torch.full_like(labels, IGNORE_INDEX)
    assert num_positions_to_score(no_labels) == labels.shape[1]


class _Engine:
    """What micro_batch_loss_sum needs of a DeepSpeed engine: calling it, and ``module``."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kwargs):
        return self.module(**kwargs)


@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_a_packed_micro_batch_gives_the_padded_loss_and_gradients(num_key_value_heads):
    """Padding-free: the rows as one sequence with per-example position ids (attention kept inside each
    row, LM head only at target positions) give the summed loss and the gradients of the padded batch."""
    from ds_loradrop.data.batching import pack
    from ds_loradrop.training.loop import micro_batch_loss_sum

    model = tiny_llama_model(num_layers=2, num_key_value_heads=num_key_value_heads)
    rows = _rows(6, seed=7)
    padded, packed = collate(rows, pad_token_id=0), pack(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = micro_batch_loss_sum(_Engine(model), batch, torch.device("cpu"))
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for padded_grad, packed_grad in zip(*grads):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-5)


def test_packing_ignores_the_label_across_a_row_boundary():
    """A row whose first token is labelled (no prompt) must not be predicted from the previous row."""
    from ds_loradrop.data.batching import pack

    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    packed = pack(rows)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
