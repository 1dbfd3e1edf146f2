"""LoRA-drop at a parameter budget: the threshold T whose layout comes closest to a baseline's count.

A layout keeps ``k`` layers of a target with their own adapter and gives the others one shared adapter,
so a target costs ``(k + 1)`` layers' adapters (``k`` when every layer is kept). ``k`` is a step function of
T: constant between two consecutive cumulative sums of the target's importance in descending order. With
the same T for every target, the layouts change only at the union of those sums; each interval between
two of them is one layout. The chosen T is the middle of the best interval, so the plan that
``launch/importance.py`` recomputes from the same adapter (equal up to float rounding) keeps the same
layers.
"""

from __future__ import annotations

import itertools
import re

from ds_loradrop.method.selection import select_by_threshold

_KEY = re.compile(r"^(?P<target>[^.]+)\.layers\.(?P<layer>\d+)\.")


def layer_parameters(shapes: dict[str, list[int]], targets: list[str]) -> dict[str, int]:
    """Adapter parameters of one layer per target, from a saved adapter's tensor shapes
    (``<target>.layers.<i>.lora_A`` / ``lora_B``, as stage-1 adapters are saved)."""
    per_layer: dict[str, int] = {}
    for key, shape in shapes.items():
        match = _KEY.match(key)
        if match and match["layer"] == "0" and match["target"] in targets:
            numel = 1
            for size in shape:
                numel *= size
            per_layer[match["target"]] = per_layer.get(match["target"], 0) + numel
    missing = [t for t in targets if t not in per_layer]
    if missing:
        raise ValueError(f"no layer-0 adapter tensors for {missing} in the saved adapter")
    return per_layer


def layout_parameters(normalized: dict[str, list[float]], per_layer: dict[str, int], threshold: float) -> int:
    """Adapter parameters of the layout T gives (retained layers plus one shared adapter per target)."""
    total = 0
    for name, values in normalized.items():
        kept = len(select_by_threshold(values, threshold))
        total += (kept + (1 if kept < len(values) else 0)) * per_layer[name]
    return total


def threshold_for_budget(normalized: dict[str, list[float]], per_layer: dict[str, int], budget: int) -> float:
    """T in (0, 1] (the middle of its interval) whose layout's parameters are closest to ``budget``; of two
    equally close, the smaller layout."""
    cuts = {0.0, 1.0}
    for values in normalized.values():
        running = 0.0
        for value in sorted(values, reverse=True):
            running += value
            cuts.add(min(running, 1.0))
    cuts = sorted(cuts)
    candidates = [(low + high) / 2 for low, high in itertools.pairwise(cuts) if high - low > 1e-6]
    return min(
        candidates,
        key=lambda t: (
            abs(layout_parameters(normalized, per_layer, t) - budget),
            layout_parameters(normalized, per_layer, t),
        ),
    )
