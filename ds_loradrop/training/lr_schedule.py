"""The learning-rate schedules of ``--lr_scheduler``: transformers' ``linear``, ``cosine`` and
``constant_with_warmup`` (and ``constant``, which the benchmarks use), the same multipliers step for step
(``tests/test_lr_schedule.py`` compares them with ``transformers.get_scheduler``), on torch's ``LambdaLR``.

Written here rather than taken from ``transformers.get_scheduler`` because importing that imports
``transformers.trainer_utils``, which imports all of PEFT: about 3 s in every rank of every launch.
"""

from __future__ import annotations

import functools
import math

import torch


def linear_multiplier(step: int, *, warmup: int, total: int) -> float:
    """0 -> 1 over ``warmup`` steps, then 1 -> 0 at ``total``."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine_multiplier(step: int, *, warmup: int, total: int) -> float:
    """0 -> 1 over ``warmup`` steps, then half a cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def constant_multiplier(step: int, *, warmup: int, total: int) -> float:
    """0 -> 1 over ``warmup`` steps, then 1."""
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def flat_multiplier(step: int, *, warmup: int, total: int) -> float:
    """1 from the first step (no warmup)."""
    return 1.0


MULTIPLIERS = {
    "constant": flat_multiplier,
    "linear": linear_multiplier,
    "cosine": cosine_multiplier,
    "constant_with_warmup": constant_multiplier,
}


def warmup_schedule(
    optimizer: torch.optim.Optimizer, name: str, num_warmup_steps: int, num_training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule ``name`` over ``optimizer`` (ValueError for an unknown name)."""
    if name not in MULTIPLIERS:
        raise ValueError(f"unknown learning-rate schedule {name!r}; expected one of {list(MULTIPLIERS)}")
    multiplier = functools.partial(MULTIPLIERS[name], warmup=num_warmup_steps, total=num_training_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
