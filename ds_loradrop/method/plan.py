"""The LoRA-drop plan: importance per target and layer, and which layers are retained or shared.

Built on rank 0 from the all-reduced importance, broadcast to every rank, written as ``plan.json``
and applied to a fresh model for stage 2.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ds_loradrop.config import DropConfig
from ds_loradrop.method.importance import mean_importance, normalize_importance
from ds_loradrop.method.selection import select_layers


@dataclass
class TargetPlan:
    importance: list[float]
    normalized: list[float]
    retained: list[int]
    shared: list[int]
    dropped: list[int] = field(default_factory=list)


@dataclass
class Plan:
    targets: dict[str, TargetPlan]
    threshold: float
    sample_ratio: float
    num_sampled: int
    num_tokens: int
    world_size: int
    seed: int
    selection: str
    low_importance: str
    stage1_steps: int | None = None  # optimizer steps stage 1 ran (None: a plan from before this was kept)
    stage1_planned_steps: int | None = None  # what its epochs over the sample would take

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        targets = {name: TargetPlan(**target) for name, target in values["targets"].items()}
        return cls(**{**values, "targets": targets})

    def layer_mask(self) -> dict[str, list[int]]:
        """Retained layers per target: the decision all ranks must hold identically."""
        return {name: list(target.retained) for name, target in self.targets.items()}

    def mask_digest(self) -> str:
        masks = {name: [t.retained, t.shared, t.dropped] for name, t in self.targets.items()}
        return hashlib.sha256(json.dumps(masks, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str) -> None:
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)

    @classmethod
    def load(cls, path: str) -> Plan:
        with open(path) as handle:
            return cls.from_dict(json.load(handle))


def build_plan(
    sums: dict[str, list[float]],
    num_tokens: float,
    *,
    threshold: float,
    selection: str,
    low_importance: str,
    seed: int,
    sample_ratio: float,
    num_sampled: int,
    world_size: int,
    stage1_steps: int | None = None,
    stage1_planned_steps: int | None = None,
) -> Plan:
    """Turn all-reduced importance sums into a plan (pure; run on rank 0)."""
    targets = {}
    for index, (name, target_sums) in enumerate(sums.items()):
        importance = mean_importance(target_sums, num_tokens)
        normalized = normalize_importance(importance)
        # each target draws its own random layers (seed + target index)
        retained = select_layers(normalized, threshold, selection, seed + index)
        others = [layer for layer in range(len(normalized)) if layer not in retained]
        is_shared = low_importance == "share"
        targets[name] = TargetPlan(
            importance=importance,
            normalized=normalized,
            retained=retained,
            shared=others if is_shared else [],
            dropped=[] if is_shared else others,
        )
    return Plan(
        targets=targets,
        threshold=threshold,
        sample_ratio=sample_ratio,
        num_sampled=num_sampled,
        num_tokens=int(num_tokens),
        world_size=world_size,
        seed=seed,
        selection=selection,
        low_importance=low_importance,
        stage1_steps=stage1_steps,
        stage1_planned_steps=stage1_planned_steps,
    )


def build_plan_for(
    sums: dict[str, list[float]],
    num_tokens: float,
    drop: DropConfig,
    *,
    seed: int,
    num_sampled: int,
    world_size: int,
    stage1_steps: int | None = None,
    stage1_planned_steps: int | None = None,
) -> Plan:
    """:func:`build_plan` with the run's LoRA-drop settings (threshold, selection, low-importance layers)."""
    return build_plan(
        sums,
        num_tokens,
        threshold=drop.threshold,
        selection=drop.selection,
        low_importance=drop.low_importance,
        seed=seed,
        sample_ratio=drop.sample_ratio,
        num_sampled=num_sampled,
        world_size=world_size,
        stage1_steps=stage1_steps,
        stage1_planned_steps=stage1_planned_steps,
    )
