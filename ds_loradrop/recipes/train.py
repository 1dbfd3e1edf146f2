"""The training recipe, in the order of the paper's Figure 3: setup -> stage 1 -> stage 2 -> finish.

1. ``setup``: check every input before anything is written, then the process group, the tokenised data,
   the resume point and the MLflow run (recipes/setup.py).
2. Stage 1 (the method's ``prepare``, ``method/kinds/``): LoRA-drop trains LoRA on a stratified sample,
   measures each layer's importance (all-reduced over ranks), selects the layers to retain on rank 0 and
   broadcasts the plan; Sparse Adapter's SNIP pass fixes its masks; the other methods have no stage 1.
3. Stage 2 (``train_final``): a fresh model with the method's adapters (retained layers their own, the
   others one shared adapter per target), fine-tuned on the whole training set, evaluated, saved.
4. ``finish``: summary.json, the log's report, the MLflow run ended FINISHED (FAILED if anything raised,
   KILLED on SIGTERM / SIGINT).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ds_loradrop.config import RunConfig
from ds_loradrop.errors import Terminated, raise_terminated_on_signals
from ds_loradrop.method.adapter_files import save_adapters
from ds_loradrop.method.lora import AdapterLayout
from ds_loradrop.method.placement import count_full_lora_parameters, count_trainable_parameters
from ds_loradrop.method.registry import Preparation
from ds_loradrop.recipes import stages
from ds_loradrop.recipes.best_adapter import BestAdapter
from ds_loradrop.recipes.logged_model import log_run_model
from ds_loradrop.recipes.setup import RunContext, setup, write_json, write_resolved_configs
from ds_loradrop.recipes.stages import build_model, evaluate_run, read_base_evaluation, train_model
from ds_loradrop.recipes.summary import RunSummary, report
from ds_loradrop.run_files import (
    EVAL_DIR,
    FINAL_ADAPTER_DIR,
    FULL_MODEL_DIR,
    PLAN_NAME,
    STAGE1_ADAPTER_DIR,
    SUMMARY_NAME,
)
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import all_gather_object, barrier, get_logger, is_rank_zero
from ds_loradrop.training.loop import StageResult

logger = get_logger()


def run(cfg: RunConfig) -> RunSummary | None:
    """Train one run end to end; rank 0 writes and tracks, every rank returns the same summary (None when
    ``--stop_after_stage1`` ended it after stage 1)."""
    start = time.perf_counter()
    ctx = setup(cfg)
    raise_terminated_on_signals()
    try:
        write_resolved_configs(ctx)
        preparation = ctx.method.prepare(ctx, stages)
        if cfg.drop.stop_after_stage1:
            stop_after_stage1(ctx)
            summary = None
        else:
            summary = finish(ctx, preparation, train_final(ctx, preparation), start)
    except Terminated:
        ctx.log.end("KILLED")
        raise
    except BaseException:
        ctx.log.end("FAILED")
        raise
    barrier()
    ds_engine.shutdown_distributed()
    return summary


def stop_after_stage1(ctx: RunContext) -> None:
    """End a run whose stage 1 is done (its plan and adapter are on disk): the MLflow run is FINISHED
    with tag ``completed=stage1``; ``--resume auto`` continues it with stage 2."""
    plan_file = os.path.join(ctx.output_dir, STAGE1_ADAPTER_DIR, PLAN_NAME)
    logger.info(f"stopping after stage 1 (--stop_after_stage1): plan in {plan_file}")
    ctx.log.stopped_after_stage1(ctx.output_dir)  # a no-op off rank 0


@dataclass
class FinalStage:
    layout: AdapterLayout
    trainable_parameters: int
    result: StageResult


def train_final(ctx: RunContext, preparation: Preparation) -> FinalStage:
    """Stage 2 (or the only stage): the method's adapters on a fresh model, trained on the whole training
    set, evaluated by generation and saved."""
    cfg, plan, method = ctx.cfg, preparation.plan, ctx.method
    built = build_model(ctx, method.attach(cfg, preparation, ctx.output_dir), cfg.train.seed + 1)
    name = "stage2" if plan else "train"
    num_steps = ctx.batch.steps(
        len(ctx.train_examples), cfg.train.num_train_epochs, cfg.train.max_steps, what=f"{name} data"
    )
    # The first stage evaluates the base model: this one unless the method had a stage 1.
    evaluate_base = cfg.train.eval_base_model and method.evaluates_base_in_final_stage(cfg)
    save_settings = {
        "settings": method.adapter_settings(cfg.lora),
        "base_model": ctx.model_path,
        "plan": plan,
    }
    best = (
        BestAdapter(cfg.train.save_best_by, ctx.output_dir, built.layout, save_settings)
        if cfg.train.save_best_by
        else None
    )
    engine, result = train_model(
        ctx,
        built,
        ctx.train_examples,
        name=name,
        num_steps=num_steps,
        seed=cfg.train.seed + 1,
        evaluate_every=cfg.train.eval_steps if cfg.train.generate_at_eval_steps else None,
        evaluate_base=evaluate_base,
        on_evaluation=None if best is None else best.consider,
    )
    result.eval_metrics = evaluate_run(ctx, engine, os.path.join(ctx.output_dir, EVAL_DIR), result.num_steps)
    if best is not None:
        best.consider(result.num_steps, {**result.eval_metrics, "val_loss": result.val_loss})
    if not method.trains_adapters:
        save_full_model(ctx, engine, built.model, os.path.join(ctx.output_dir, FULL_MODEL_DIR))
    else:
        save_adapters(built.layout, os.path.join(ctx.output_dir, FINAL_ADAPTER_DIR), **save_settings)
    trainable = count_trainable_parameters(built.model)
    ds_engine.destroy_engine(engine)
    return FinalStage(built.layout, trainable, result)


def save_full_model(ctx: RunContext, engine, model, directory: str) -> None:
    state = ds_engine.consolidated_state_dict(engine)
    if is_rank_zero():
        model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        ctx.tokenizer.save_pretrained(directory)
    barrier()


def finish(ctx: RunContext, preparation: Preparation, final: FinalStage, start: float) -> RunSummary:
    """Summary on every rank (peak memory gathered from all), written and tracked by rank 0."""
    cfg, plan, layout = ctx.cfg, preparation.plan, final.layout
    peak_bytes, peak_kind = ds_engine.peak_memory(ctx.device)
    peak_per_rank = all_gather_object(peak_bytes)
    stages = [*preparation.stages, final.result]
    summary = RunSummary(
        method=cfg.finetuning.method,
        world_size=ctx.batch.world_size,
        lora_parameters=count_full_lora_parameters(layout, cfg.reference_lora_r) if layout else 0,
        trainable_parameters=final.trainable_parameters,
        retained=plan.layer_mask() if plan else {t: list(range(len(w))) for t, w in layout.items()},
        num_layers={t: len(w) for t, w in layout.items()},
        stages=[
            {
                "name": s.name,
                "num_steps": s.num_steps,
                "final_loss": s.final_loss,
                "val_loss": s.val_loss,
                "seconds": s.seconds,
                "num_target_tokens": s.num_target_tokens,
            }
            for s in stages
        ],
        eval_metrics=final.result.eval_metrics,
        base_eval_metrics=read_base_evaluation(ctx.output_dir) if cfg.train.eval_base_model else {},
        wall_seconds=time.perf_counter() - start,
        num_truncated=ctx.num_truncated,
        peak_memory_bytes=peak_per_rank,
        peak_memory_kind=peak_kind,
        precision=final.result.precision,
    )
    report(summary)
    if is_rank_zero():
        write_json(os.path.join(ctx.output_dir, SUMMARY_NAME), summary.__dict__)
        ctx.log.finish(summary, ctx.output_dir, model_logged=log_run_model(ctx))
    barrier()
    return summary
