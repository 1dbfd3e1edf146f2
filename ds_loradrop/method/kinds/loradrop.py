"""``--method loradrop``: the paper's method (its Figure 3). Stage 1 trains LoRA on a stratified sample and
measures every layer's importance ||B A x||^2 (all-reduced over ranks); rank 0 selects the layers to retain
and broadcasts the plan; the final training (stage 2) gives retained layers their own LoRA and the others
one shared LoRA per target. A plan can also be given (``--plan``) or come from a stage 1 finished before a
resume; stage 1 is never rerun, so the layout stays fixed."""

from __future__ import annotations

import contextlib
import os
import time

from ds_loradrop.config import RunConfig
from ds_loradrop.data.batching import stratified_sample
from ds_loradrop.method.adapter_files import copy_into_adapters, load_adapter_state, save_adapters
from ds_loradrop.method.importance import ImportanceRecorder
from ds_loradrop.method.kinds.lora import LoRA
from ds_loradrop.method.placement import attach_own_adapters, attach_planned_adapters
from ds_loradrop.method.plan import Plan, build_plan_for
from ds_loradrop.method.probe import measure_importance, reduce_recorded
from ds_loradrop.method.registry import Preparation, StageTools, register
from ds_loradrop.run_files import PLAN_NAME, STAGE1_ADAPTER_DIR
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import (
    barrier,
    broadcast_object,
    confirm_same_everywhere,
    get_logger,
    is_rank_zero,
)

logger = get_logger()


class LoRADrop(LoRA):
    name = "loradrop"
    summary = "LoRA-drop (two stages): important layers keep their own LoRA, the others share one per target"
    learns_layout = True

    def finished_preparation(self, output_dir: str) -> str | None:
        plan = os.path.join(output_dir, STAGE1_ADAPTER_DIR, PLAN_NAME)
        return plan if os.path.isfile(plan) else None

    def prepare(self, ctx, tools: StageTools) -> Preparation:
        if ctx.cfg.drop.plan is not None:
            return Preparation(plan=use_given_plan(ctx))
        if ctx.resume.finished_preparation is not None:
            plan = Plan.load(ctx.resume.finished_preparation)
            confirm_same_everywhere("layer mask", plan.mask_digest())
            logger.info(f"stage 1 finished before: using its plan ({ctx.resume.finished_preparation})")
            return Preparation(plan=plan)
        plan, stage1 = run_stage1(ctx, tools, self.adapter_settings(ctx.cfg.lora))
        return Preparation(plan=plan, stages=[stage1])

    def attach(self, cfg: RunConfig, preparation: Preparation, output_dir: str):
        lora, plan = cfg.lora, preparation.plan

        def attach_planned(layout) -> None:
            attach_planned_adapters(layout, plan, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
            if cfg.drop.stage2_init == "carry":
                stage1 = load_adapter_state(os.path.join(output_dir, STAGE1_ADAPTER_DIR))
                names = [f"{t}.layers.{i}" for t, target in plan.targets.items() for i in target.retained]
                copy_into_adapters(layout, stage1, names)

        return attach_planned


def run_stage1(ctx, tools: StageTools, settings: dict):
    """Train LoRA on a stratified sample, measure importance, select on rank 0, broadcast, save.
    Returns (plan, the stage's StageResult)."""
    cfg, drop, lora = ctx.cfg, ctx.cfg.drop, ctx.cfg.lora
    sample = stratified_sample(ctx.train_examples, drop.sample_ratio, cfg.train.seed)
    logger.info(
        f"stage1: stratified sample of {len(sample)}/{len(ctx.train_examples)} examples "
        f"(ratio {drop.sample_ratio})"
    )
    built = tools.build_model(
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
    # Evaluations and validation losses between steps run in eval mode: not recorded.
    recording = drop.importance_pass == "last_epoch"
    recorder = ImportanceRecorder(built.layout, training_forwards_only=True) if recording else None

    def record_last_epoch(step: int, micro_batch: dict) -> None:
        if step > record_after:
            recorder.set_token_mask(micro_batch["attention_mask"].to(ctx.device))
        else:
            recorder.pause()  # earlier epochs: no work in the training forwards

    with recorder.recording() if recorder is not None else contextlib.nullcontext():
        engine, result = tools.train_model(
            ctx,
            built,
            sample,
            name="stage1",
            num_steps=num_steps,
            seed=cfg.train.seed,
            evaluate_base=cfg.train.eval_base_model,
            before_forward=record_last_epoch if recorder else None,
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
        settings=settings,
        base_model=ctx.model_path,
        plan=plan,
    )
    if is_rank_zero():
        ctx.log.plan(plan, ctx.output_dir)
    ds_engine.destroy_engine(engine)
    return plan, result


def importance_sums(
    ctx, engine, built, recorder, sample: list[dict], *, recorded_steps: tuple[int, int] | None
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


def use_given_plan(ctx) -> Plan:
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


register(LoRADrop())
