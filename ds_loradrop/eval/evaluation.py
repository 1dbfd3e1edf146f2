"""Evaluation by generation: generate on every rank, score on rank 0, write predictions and metrics."""

from __future__ import annotations

import json
import os

from ds_loradrop.config import EvalConfig
from ds_loradrop.data.tasks import EvalExample, Task
from ds_loradrop.eval.generation import GenerationResult, generate_predictions
from ds_loradrop.eval.metrics import compute_metrics
from ds_loradrop.run_files import METRICS_NAME, PREDICTIONS_NAME
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import (
    barrier,
    broadcast_object,
    get_logger,
    get_world_size_and_rank,
    is_rank_zero,
)

logger = get_logger()


def resolve_generation_mode(requested: str, engine) -> str:
    """'gathered' or 'synced' ('gathered' also below ZeRO-3, where weights are whole anyway)."""
    if engine.zero_optimization_stage() != 3:
        return "gathered"
    if requested == "auto":
        # Decided on rank 0 for everyone: ranks that disagree would run mismatched collectives.
        fits = ds_engine.full_model_fits(engine.module) if is_rank_zero() else None
        return "gathered" if broadcast_object(fits) else "synced"
    return requested


def run_generation(
    engine,
    tokenizer,
    examples: list[EvalExample],
    cfg: EvalConfig,
    *,
    mode: str,
    max_new_tokens: int,
    device,
    max_prompt_tokens: int,
) -> GenerationResult:
    """Generate with the engine's model in ``mode`` (every rank must call this)."""
    options = {
        "batch_size": cfg.eval_batch_size,
        "max_new_tokens": max_new_tokens,
        "num_beams": cfg.num_beams,
        "device": device,
        "max_prompt_tokens": max_prompt_tokens,
    }
    if mode == "gathered":
        with ds_engine.full_weights_for_generation(engine) as model:
            return generate_predictions(model, tokenizer, examples, synced_gpus=False, **options)
    world_size, _ = get_world_size_and_rank()
    return generate_predictions(engine.module, tokenizer, examples, synced_gpus=world_size > 1, **options)


def evaluate(
    engine,
    tokenizer,
    task: Task,
    examples: list[EvalExample],
    split: str,
    cfg: EvalConfig,
    *,
    device,
    output_dir: str,
    max_prompt_tokens: int,
    label: str = "eval",
) -> dict:
    """Generate, score and write ``predictions.jsonl`` / ``metrics.json`` into ``output_dir`` (rank 0).

    Returns the metrics (on every rank).
    """
    mode = resolve_generation_mode(cfg.eval_generation, engine)
    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    result = run_generation(
        engine,
        tokenizer,
        examples,
        cfg,
        mode=mode,
        max_new_tokens=max_new_tokens,
        device=device,
        max_prompt_tokens=max_prompt_tokens,
    )
    references = [ex.references for ex in examples]
    metrics = {
        "task": task.name,
        "split": split,
        "num_examples": len(examples),
        **compute_metrics(task.metrics, result.predictions, references),
        "generation_mode": mode,
        "generated_tokens": result.num_generated_tokens,
        "generation_seconds": round(result.seconds, 3),
        "generated_tokens_per_second": round(result.tokens_per_second, 1),
    }
    if is_rank_zero():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, PREDICTIONS_NAME), "w", encoding="utf-8") as handle:
            handle.writelines(
                json.dumps(
                    {
                        "id": example.id,
                        "prompt": example.prompt,
                        "prediction": prediction,
                        "references": example.references,
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for example, prediction in zip(examples, result.predictions)
            )
        with open(os.path.join(output_dir, METRICS_NAME), "w") as handle:
            json.dump(metrics, handle, indent=2)
    barrier()
    scores = ", ".join(f"{name} {metrics[name]:.2f}" for name in task.metrics)
    logger.info(
        f"{label} {task.name}/{split} ({len(examples)} inputs, {mode}): {scores}; "
        f"{metrics['generated_tokens_per_second']:.0f} generated tokens/s"
    )
    return metrics
