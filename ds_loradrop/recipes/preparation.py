"""What a method decides before its final training, once, and keeps across a resume:

- LoRA-drop's stage 1 (the paper's Figure 3, left): LoRA on a stratified sample, importance of every layer
  all-reduced over ranks, selection on rank 0, the plan broadcast and checked on every rank; or a plan
  given with ``--plan``; or the plan of a stage 1 finished before a resume.
- Sparse Adapter's SNIP pass: the masks, or those of a pass finished before a resume.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

from ds_loradrop.data.batching import stratified_sample
from ds_loradrop.method.adapter_files import save_adapters
from ds_loradrop.method.importance import ImportanceRecorder
from ds_loradrop.method.methods import adapter_settings
from ds_loradrop.method.placement import attach_own_adapters
from ds_loradrop.method.plan import Plan, build_plan_for
from ds_loradrop.method.probe import measure_importance, reduce_recorded
from ds_loradrop.method.snip import measure_saliency, scoring_indices
from ds_loradrop.method.sparse_lora import (
    attach_sparse_adapters,
    global_keep_masks,
    load_masks,
    masks_digest,
    save_masks,
    sparse_adapters,
)
from ds_loradrop.recipes.setup import RunContext
from ds_loradrop.recipes.stages import build_model, train_model
from ds_loradrop.run_files import MASKS_NAME, PLAN_NAME, STAGE1_ADAPTER_DIR
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import (
    all_gather_object,
    barrier,
    broadcast_object,
    get_logger,
    get_world_size_and_rank,
    is_rank_zero,
)
from ds_loradrop.training.loop import StageResult

logger = get_logger()


@dataclass
class Preparation:
    """What the final training takes from before it: a LoRA-drop plan, SNIP's masks (or neither), and the
    stages that ran for them in this process."""

    plan: Plan | None = None
    masks: dict[str, torch.Tensor] | None = None
    stages: list[StageResult] = field(default_factory=list)


def prepare_method(ctx: RunContext) -> Preparation:
    method = ctx.cfg.finetuning.method
    if method == "loradrop" and ctx.cfg.drop.plan is not None:
        return Preparation(plan=use_given_plan(ctx))
    if method == "loradrop" and ctx.resume.finished_plan is not None:
        plan = Plan.load(ctx.resume.finished_plan)  # stage 1 is never rerun: the mask stays fixed
        confirm_same_everywhere("layer mask", plan.mask_digest())
        logger.info(f"stage 1 finished before: using its plan ({ctx.resume.finished_plan})")
        return Preparation(plan=plan)
    if method == "loradrop":
        plan, stage1 = run_stage1(ctx)
        return Preparation(plan=plan, stages=[stage1])
    if method == "sparse_lora" and ctx.resume.finished_masks is not None:
        masks = load_masks(ctx.resume.finished_masks)  # the SNIP pass is never rerun either
        confirm_same_everywhere("sparsity masks", masks_digest(masks))
        logger.info(f"SNIP finished before: using its masks ({ctx.resume.finished_masks})")
        return Preparation(masks=masks)
    if method == "sparse_lora":
        masks, pruning = run_pruning(ctx)
        return Preparation(masks=masks, stages=[pruning])
    return Preparation()


def run_stage1(ctx: RunContext) -> tuple[Plan, StageResult]:
    """Train LoRA on a stratified sample, measure importance, select on rank 0, broadcast, save."""
    cfg, drop, lora = ctx.cfg, ctx.cfg.drop, ctx.cfg.lora
    sample = stratified_sample(ctx.train_examples, drop.sample_ratio, cfg.train.seed)
    logger.info(
        f"stage1: stratified sample of {len(sample)}/{len(ctx.train_examples)} examples "
        f"(ratio {drop.sample_ratio})"
    )
    built = build_model(
        ctx,
        lambda layout: attach_own_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout),
        cfg.train.seed,
    )
    planned_steps = ctx.batch.steps_per_epoch(len(sample)) * drop.stage1_epochs
    num_steps = ctx.batch.steps(len(sample), drop.stage1_epochs, cfg.stage1_max_steps, what="stage1 data")
    if num_steps < planned_steps:
        cap = "--stage1_max_steps" if drop.stage1_max_steps is not None else "--max_steps"
        logger.warning(
            f"stage1: capped at {num_steps} of its {planned_steps} steps ({drop.stage1_epochs} epochs) by "
            f"{cap}: importance comes from adapters trained on {100 * num_steps / planned_steps:.0f}% of "
            "stage 1"
        )
    # The steps of the last epoch record importance (--importance_pass last_epoch).
    record_after = max(0, num_steps - ctx.batch.steps_per_epoch(len(sample)))
    recorder = ImportanceRecorder(built.layout) if drop.importance_pass == "last_epoch" else None
    if recorder is not None:
        recorder.pause()  # until the last epoch's first training forward (the base model's evaluation first)

    def record_last_epoch(step: int, micro_batch: dict) -> None:
        if step > record_after:
            recorder.set_token_mask(micro_batch["attention_mask"].to(ctx.device))
        else:
            recorder.pause()  # earlier epochs: no work in the training forwards

    with recorder.recording() if recorder is not None else contextlib.nullcontext():
        engine, result = train_model(
            ctx,
            built,
            sample,
            name="stage1",
            num_steps=num_steps,
            seed=cfg.train.seed,
            evaluate_base=cfg.train.eval_base_model,
            before_forward=record_last_epoch if recorder else None,
            before_evaluation=recorder.pause if recorder else None,  # validation forwards are not recorded
        )
    recorded = (record_after + 1, num_steps) if result.first_step <= record_after else None
    sums, num_tokens = importance_sums(ctx, engine, built, recorder, sample, recorded_steps=recorded)
    plan = None
    if is_rank_zero():
        plan = build_plan_for(
            sums,
            num_tokens,
            drop,
            seed=cfg.train.seed,
            num_sampled=len(sample),
            world_size=ctx.batch.world_size,
            stage1_steps=num_steps,
            stage1_planned_steps=planned_steps,
        )
    plan = broadcast_object(plan)
    confirm_same_everywhere("layer mask", plan.mask_digest())
    if is_rank_zero():
        plan.save(os.path.join(ctx.output_dir, PLAN_NAME))
    save_adapters(
        built.layout,
        os.path.join(ctx.output_dir, STAGE1_ADAPTER_DIR),
        settings=adapter_settings(cfg),
        base_model=ctx.model_path,
        plan=plan,
    )
    if is_rank_zero():
        ctx.log.plan(plan, ctx.output_dir)
    ds_engine.destroy_engine(engine)
    return plan, result


def importance_sums(
    ctx: RunContext, engine, built, recorder, sample: list[dict], *, recorded_steps: tuple[int, int] | None
):
    """All-reduced importance sums per target and the token count: from the recorder when stage 1's last
    epoch (``recorded_steps``: first, last) recorded them, else from a pass over the sample after training
    (the paper's)."""
    if recorder is not None and recorded_steps is not None:
        sums, num_tokens = reduce_recorded(recorder, built.layout, ctx.device)
        first, last = recorded_steps
        logger.info(
            f"importance recorded during stage 1's last epoch (steps {first}-{last}) "
            f"over {int(num_tokens)} tokens"
        )
        return sums, num_tokens
    if recorder is not None:
        logger.info("stage 1 resumed inside its last epoch: importance measured in a pass after it")
    start = time.perf_counter()
    sums, num_tokens = measure_importance(
        engine,
        built.layout,
        sample,
        batch_size=ctx.batch.micro_batch_size,
        pad_token_id=ctx.tokenizer.pad_token_id,
        device=ctx.device,
    )
    logger.info(f"importance measured over {int(num_tokens)} tokens in {time.perf_counter() - start:.1f}s")
    return sums, num_tokens


def use_given_plan(ctx: RunContext) -> Plan:
    """``--plan``: stage 1 is skipped; the given plan is this run's plan (copied to its output directory)."""
    plan = Plan.load(ctx.cfg.drop.plan)
    confirm_same_everywhere("layer mask", plan.mask_digest())
    logger.info(
        f"stage 1 skipped: training the plan {ctx.cfg.drop.plan} (threshold {plan.threshold}, selection "
        f"{plan.selection}, {plan.low_importance} low-importance layers)"
    )
    if is_rank_zero():
        plan.save(os.path.join(ctx.output_dir, PLAN_NAME))
        ctx.log.plan(plan, ctx.output_dir)
    barrier()
    return plan


def run_pruning(ctx: RunContext) -> tuple[dict[str, torch.Tensor], StageResult]:
    """``--method sparse_lora``: score LoRA's entries with SNIP on a seeded sample, keep the best
    ``1 - sparsity`` of them (rank 0 ranks, every rank checks it holds the same masks), save the masks."""
    cfg, lora, start = ctx.cfg, ctx.cfg.lora, time.perf_counter()
    indices = scoring_indices(len(ctx.train_examples), lora.snip_examples, cfg.train.seed)
    # The same seed as the final model's adapters: training starts from the A that was scored.
    built = build_model(
        ctx,
        lambda layout: attach_sparse_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout),
        cfg.train.seed + 1,
    )
    engine = ds_engine.build_inference_engine(built.model, ctx.ds_config)
    scores = measure_saliency(
        ds_engine.module_for_gradients_of_non_parameters(engine),
        sparse_adapters(built.layout),
        [ctx.train_examples[i] for i in indices],
        batch_size=ctx.batch.micro_batch_size,
        pad_token_id=ctx.tokenizer.pad_token_id,
        device=ctx.device,
    )
    ds_engine.destroy_engine(engine)
    masks = broadcast_object(global_keep_masks(scores, lora.sparsity) if is_rank_zero() else None)
    confirm_same_everywhere("sparsity masks", masks_digest(masks))
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    logger.info(
        f"SNIP: scored on {len(indices)} examples; kept {kept}/{total} LoRA entries "
        f"({100 * kept / total:.1f}%) in {time.perf_counter() - start:.1f}s"
    )
    if is_rank_zero():
        save_masks(masks, os.path.join(ctx.output_dir, MASKS_NAME))
    barrier()
    return masks, StageResult("snip", seconds=time.perf_counter() - start)


def confirm_same_everywhere(what: str, digest: str) -> None:
    """Every rank reports the digest of what it holds; any disagreement stops the run."""
    _, rank = get_world_size_and_rank()
    logger.info(f"rank {rank} holds {what} {digest}", extra={"all_ranks": True})
    digests = all_gather_object(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the {what}: {digests}")
