"""Which layers keep their own adapter: pure functions over importance numbers.

``output_norm`` is the paper's rule: per target, take layers from most to least important until the
sum of their normalised importance reaches the threshold T (ties broken by the lower layer index).
The ablations of the paper's Table 7:

- ``inverse`` ("ΔWx inv"): "replace high-importance layers of LoRA with shared LoRA and retain the other
  LoRA": the layers ``output_norm`` would retain share one adapter, every other layer keeps its own (so
  it keeps ``n - k`` layers, not k);
- ``random``: k layers at random (seeded); ``last_k``: the k last layers — the same *number* k of
  retained layers as ``output_norm``, chosen differently.
"""

from __future__ import annotations

import random

# Sums of floats that should reach T may fall short of it by rounding only.
_SUM_TOLERANCE = 1e-9

SELECTIONS = ("output_norm", "inverse", "random", "last_k")


def order_by_importance(normalized: list[float]) -> list[int]:
    """Layer indices from most to least important; equal values keep layer order."""
    return sorted(range(len(normalized)), key=lambda i: (-normalized[i], i))


def select_by_threshold(normalized: list[float], threshold: float) -> list[int]:
    """The paper's selection.

    Args:
        normalized: y per layer, summing to 1.
        threshold: T in (0, 1]; T = 1 keeps every layer.

    Returns:
        retained layer indices, ascending.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if threshold >= 1.0:
        return list(range(len(normalized)))
    retained, total = [], 0.0
    for layer in order_by_importance(normalized):
        retained.append(layer)
        total += normalized[layer]
        if total >= threshold - _SUM_TOLERANCE:
            break
    return sorted(retained)


def select_layers(normalized: list[float], threshold: float, selection: str, seed: int) -> list[int]:
    """Retained layers of one target for a selection rule (see the module docstring)."""
    num_retained = len(select_by_threshold(normalized, threshold))
    if selection == "output_norm":
        return select_by_threshold(normalized, threshold)
    if selection == "inverse":
        important = set(select_by_threshold(normalized, threshold))
        return [layer for layer in range(len(normalized)) if layer not in important]
    if selection == "random":
        return sorted(random.Random(seed).sample(range(len(normalized)), num_retained))
    if selection == "last_k":
        return list(range(len(normalized) - num_retained, len(normalized)))
    raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
