"""The learning-rate schedules equal transformers' ``get_scheduler`` step for step."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from ds_loradrop.training.lr_schedule import MULTIPLIERS, warmup_schedule

pytestmark = pytest.mark.unit


def _learning_rates(make, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = make(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("name", list(MULTIPLIERS))
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (1, 1), (5, 37), (10, 10)])
def test_every_schedule_equals_transformers(name, warmup, total):
    ours = _learning_rates(lambda o: warmup_schedule(o, name, warmup, total), total + 2)
    theirs = _learning_rates(lambda o: get_scheduler(name, o, warmup, total), total + 2)
    assert ours == theirs


def test_a_schedules_state_continues_in_transformers_schedule():
    """A checkpoint's scheduler state written before this module (transformers' LambdaLR) loads here."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    theirs = get_scheduler("linear", optimizer, 2, 10)
    for _ in range(4):
        optimizer.step()
        theirs.step()
    ours = warmup_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5), "linear", 2, 10)
    ours.load_state_dict(theirs.state_dict())
    assert ours.last_epoch == 4 and ours.get_last_lr() == theirs.get_last_lr()


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        warmup_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "step", 0, 1)
