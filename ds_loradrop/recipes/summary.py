"""What a finished run measured (``summary.json``), and how it is reported in the log."""

from __future__ import annotations

from dataclasses import dataclass, field

from ds_loradrop.eval.metrics import METRICS
from ds_loradrop.training.distributed import get_logger

logger = get_logger()


@dataclass
class RunSummary:
    method: str
    world_size: int
    lora_parameters: int
    trainable_parameters: int
    retained: dict[str, list[int]] = field(default_factory=dict)
    num_layers: dict[str, int] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)
    base_eval_metrics: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    num_truncated: int = 0
    peak_memory_bytes: list[int] = field(default_factory=list)  # per rank
    peak_memory_kind: str = ""
    precision: dict = field(default_factory=dict)  # the final stage's dtypes (engine.describe_precision)


def report(summary: RunSummary) -> None:
    for target, retained in summary.retained.items():
        logger.info(f"kept layers {target}: {len(retained)}/{summary.num_layers[target]} {retained}")
    if summary.lora_parameters:
        share = 100.0 * summary.trainable_parameters / summary.lora_parameters
        logger.info(
            f"trainable parameters: LoRA {summary.lora_parameters} | {summary.method} "
            f"{summary.trainable_parameters} ({share:.1f}% of LoRA)"
        )
    else:
        logger.info(f"trainable parameters: {summary.method} {summary.trainable_parameters}")
    logger.info(describe_evaluation(summary.eval_metrics, summary.base_eval_metrics))
    if summary.precision:
        logger.info("precision: " + ", ".join(f"{k} {v}" for k, v in summary.precision.items()))
    peaks = ", ".join(
        f"rank {rank} {value / 2**30:.2f} GiB" for rank, value in enumerate(summary.peak_memory_bytes)
    )
    logger.info(f"peak memory ({summary.peak_memory_kind}): {peaks}")
    logger.info(f"done in {summary.wall_seconds:.1f}s")


def describe_evaluation(trained: dict, base: dict) -> str:
    """``evaluation (e2e/validation, 200 inputs): bleu 57.91 (base model 5.20) | rouge_l ...``."""
    names = [name for name, value in trained.items() if name in METRICS and isinstance(value, (int, float))]
    scores = " | ".join(
        f"{name} {trained[name]:.2f}" + (f" (base model {base[name]:.2f})" if name in base else "")
        for name in names
    )
    where = f"{trained.get('task')}/{trained.get('split')}, {trained.get('num_examples')} inputs"
    return f"evaluation ({where}): {scores}"
