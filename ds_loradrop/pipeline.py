"""The LoRA-drop story, in order: check, prepare, probe (stage 1), score, select, rewire, train, save.

1. Stage 1: plain LoRA on a stratified sample of the training set for a few epochs.
2. Importance: mean ``||s B A x||^2`` per layer over the sample's tokens, all-reduced over ranks.
3. Selection (rank 0, then broadcast): retained layers per target up to the threshold.
4. Stage 2: a fresh model where retained layers have their own adapter and the others share one
   adapter per target (or have none), fine-tuned on the whole training set.

``--method lora`` and ``--method full`` skip 1-3 and train every layer's adapter / every weight; the
paper's other baselines (``vera``, ``tied_lora``) skip them too, and ``sparse_lora`` replaces them with a
SNIP pass that fixes its masks.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ds_loradrop import engine as ds_engine
from ds_loradrop.adapter_io import PLAN_NAME, copy_into_adapters, load_adapter_state, save_adapters
from ds_loradrop.checkpoint import TrainerState, agreed_latest, load_checkpoint, read_state, save_checkpoint
from ds_loradrop.config import RunConfig
from ds_loradrop.data import stratified_sample
from ds_loradrop.distributed import (
    all_gather_object,
    barrier,
    broadcast_object,
    get_logger,
    get_num_nodes,
    get_world_size_and_rank,
    is_rank_zero,
)
from ds_loradrop.ds_config import zero_stage
from ds_loradrop.errors import Terminated, UsageError, raise_terminated_on_signals
from ds_loradrop.evaluation import METRICS_NAME, evaluate
from ds_loradrop.experiment_log import ExperimentLog
from ds_loradrop.importance import ImportanceRecorder
from ds_loradrop.lora import (
    AdapterLayout,
    attach_own_adapters,
    count_full_lora_parameters,
    count_trainable_parameters,
    freeze_all_but_adapters,
    inject_lora,
)
from ds_loradrop.metrics import METRICS
from ds_loradrop.models import enable_activation_checkpointing, load_causal_lm
from ds_loradrop.plan import Plan, attach_planned_adapters, build_plan
from ds_loradrop.probe import measure_importance, reduce_recorded
from ds_loradrop.run_setup import (
    BASE_EVAL_DIR,
    FINAL_ADAPTER_DIR,
    FULL_MODEL_DIR,
    STAGE1_ADAPTER_DIR,
    SUMMARY_NAME,
    RunContext,
    check_inputs,
    clear_previous_run,
    prepare,
    write_json,
    write_resolved_configs,
)
from ds_loradrop.snip import measure_saliency, scoring_rows
from ds_loradrop.sparse_lora import (
    MASKS_NAME,
    apply_masks,
    attach_sparse_adapters,
    global_keep_masks,
    load_masks,
    masks_digest,
    save_masks,
    sparse_adapters,
)
from ds_loradrop.tied_lora import attach_tied_adapters
from ds_loradrop.trainer import StageResult, count_steps, train_stage
from ds_loradrop.vera import attach_vera_adapters

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


class _LoadedModel:
    """A model, its adapter layout and the ZeRO-3 loading context kept alive with it."""

    def __init__(self, ctx: RunContext, attach: Callable[[AdapterLayout], None] | None, seed: int):
        self.zero3_loading = ds_engine.zero3_weight_loading(ctx.ds_config)
        self.model = load_causal_lm(ctx.model_path, ctx.dtype, ctx.cfg.model.trust_remote_code)
        self.model.config.use_cache = False
        if ctx.cfg.train.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.layout: AdapterLayout = {}
        if attach is not None:
            self.layout = inject_lora(self.model, ctx.cfg.lora.target_names)
            torch.manual_seed(seed)
            attach(self.layout)
            freeze_all_but_adapters(self.model)


def _train(ctx: RunContext, loaded: _LoadedModel, rows: list[dict], *, name: str, epochs: int, seed: int,
           evaluate_every: int | None = None, before_forward: Callable[[int, dict], None] | None = None,
           evaluate_base: bool = False, max_steps: int | None = None) -> tuple:
    train = ctx.cfg.train
    num_steps = count_steps(len(rows), ctx.batch, epochs, max_steps, what=f"{name} data")
    engine = ds_engine.build_engine(
        loaded.model,
        ctx.ds_config,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        lr_scheduler=train.lr_scheduler,
        num_warmup_steps=int(train.warmup_ratio * num_steps),
        num_training_steps=num_steps,
    )
    partitioned, total, local, full = ds_engine.describe_partitioning(loaded.model)
    logger.info(
        f"{name}: {count_trainable_parameters(loaded.model)} trainable parameters; ZeRO stage "
        f"{zero_stage(ctx.ds_config)}: {partitioned}/{total} tensors "
        f"partitioned, {local}/{full} elements held by this rank",
        extra={"all_ranks": True},
    )
    start_step = 0
    saved = read_state(ctx.resume_from) if ctx.resume_from is not None else None
    if saved is not None and saved.stage == name:
        if (saved.num_steps, saved.seed) != (num_steps, seed):
            raise UsageError(f"checkpoint {ctx.resume_from} is for {saved.num_steps} steps with seed {saved.seed}; "
                             f"this run has {num_steps} steps with seed {seed} (did the configuration change?)")
        start_step = load_checkpoint(engine, ctx.resume_from).step
        logger.info(f"{name}: resumed from {ctx.resume_from} at step {start_step}/{num_steps}")
    if evaluate_base:
        if start_step == 0:
            evaluate_base_model(ctx, engine)
        else:
            logger.info(f"{name}: resumed after step 0; the base model's evaluation is the one made before")

    saved_steps = set()

    def save(step: int) -> None:
        state = TrainerState(stage=name, step=step, num_steps=num_steps, seed=seed, world_size=ctx.batch.world_size)
        path = save_checkpoint(engine, train.output_dir, state, train.save_total_limit, ctx.cfg.to_dict())
        saved_steps.add(step)
        logger.info(f"{name}: checkpoint {path}")

    def after_step(step: int) -> None:
        if evaluate_every and step % evaluate_every == 0 and step < num_steps:
            evaluate_run(ctx, engine, os.path.join(train.output_dir, "eval", f"step-{step}"), step)
        if train.save_steps and (step % train.save_steps == 0 or step == num_steps):
            save(step)

    def on_stop(step: int) -> None:
        # Preemption: keep the work done so far, whether or not --save_steps asked for checkpoints.
        if step not in saved_steps:
            save(step)

    result = train_stage(
        engine,
        rows,
        ctx.batch,
        name=name,
        num_steps=num_steps,
        seed=seed,
        pad_token_id=ctx.tokenizer.pad_token_id,
        logging_steps=train.logging_steps,
        device=ctx.device,
        group_by_length=train.group_by_length,
        after_step=after_step,
        on_stop=on_stop,
        before_forward=before_forward,
        log_metrics=lambda metrics, step: ctx.log.stage_metrics(name, metrics, step),
        start_step=start_step,
    )
    return engine, result


def evaluate_run(ctx: RunContext, engine, output_dir: str, step: int) -> dict:
    metrics = evaluate(engine, ctx.tokenizer, ctx.task, ctx.eval_examples, ctx.eval_split, ctx.cfg.eval,
                       device=ctx.device, output_dir=output_dir, max_prompt_tokens=ctx.max_prompt_tokens)
    ctx.log.evaluation(metrics, step)
    return metrics


def evaluate_base_model(ctx: RunContext, engine) -> dict:
    """The model before its first step, which is the base model (every adapter's B is zero), evaluated
    on the same inputs as the trained model, so that the two scores can be read side by side."""
    metrics = evaluate(engine, ctx.tokenizer, ctx.task, ctx.eval_examples, ctx.eval_split, ctx.cfg.eval,
                       device=ctx.device, output_dir=os.path.join(ctx.cfg.train.output_dir, BASE_EVAL_DIR),
                       max_prompt_tokens=ctx.max_prompt_tokens, label="base model")
    ctx.log.base_evaluation(metrics)
    return metrics


def read_base_evaluation(output_dir: str) -> dict:
    path = os.path.join(output_dir, BASE_EVAL_DIR, METRICS_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def run_stage1(ctx: RunContext) -> tuple[Plan, StageResult]:
    """Train LoRA on a stratified sample, measure importance, select on rank 0, broadcast, save."""
    cfg, output_dir = ctx.cfg, ctx.cfg.train.output_dir
    lora = cfg.lora
    sample = stratified_sample(ctx.rows, cfg.drop.sample_ratio, cfg.train.seed)
    logger.info(f"stage1: stratified sample of {len(sample)}/{len(ctx.rows)} examples (ratio {cfg.drop.sample_ratio})")
    loaded = _LoadedModel(
        ctx, lambda layout: attach_own_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout), cfg.train.seed
    )
    recorder = ImportanceRecorder(loaded.layout) if cfg.drop.importance_pass == "last_epoch" else None
    if recorder is not None:
        recorder.pause()  # until the last epoch's first training forward (the base-model evaluation comes first)
    steps_per_epoch = len(sample) // ctx.batch.global_batch_size
    planned_steps = steps_per_epoch * cfg.drop.stage1_epochs
    num_steps = count_steps(len(sample), ctx.batch, cfg.drop.stage1_epochs, cfg.stage1_max_steps, what="stage1 data")
    if num_steps < planned_steps:
        logger.warning(f"stage1: capped at {num_steps} of its {planned_steps} steps ({cfg.drop.stage1_epochs} epochs) "
                       f"by {'--stage1_max_steps' if cfg.drop.stage1_max_steps is not None else '--max_steps'}: "
                       f"importance comes from adapters trained on {100 * num_steps / planned_steps:.0f}% of stage 1")
    record_after = max(0, num_steps - steps_per_epoch)  # the steps of the last epoch are recorded

    def record_last_epoch(step: int, micro_batch: dict) -> None:
        if step > record_after:
            recorder.set_token_mask(micro_batch["attention_mask"].to(ctx.device))
        else:
            recorder.pause()  # earlier epochs: no work in the training forwards

    with recorder.recording() if recorder is not None else contextlib.nullcontext():
        engine, result = _train(ctx, loaded, sample, name="stage1", epochs=cfg.drop.stage1_epochs,
                                seed=cfg.train.seed, before_forward=record_last_epoch if recorder else None,
                                evaluate_base=cfg.train.eval_base_model, max_steps=cfg.stage1_max_steps)

    probe_start = time.perf_counter()
    if recorder is not None and result.first_step <= record_after:
        sums, num_tokens = reduce_recorded(recorder, loaded.layout, ctx.device)
        logger.info(f"importance recorded during stage 1's last epoch (steps {record_after + 1}-{num_steps}) "
                    f"over {int(num_tokens)} tokens")
    else:
        if recorder is not None:
            logger.info("stage 1 resumed inside its last epoch: importance measured in a pass after it")
        sums, num_tokens = measure_importance(
            engine, loaded.layout, sample, batch_size=ctx.batch.micro_batch_size,
            pad_token_id=ctx.tokenizer.pad_token_id, device=ctx.device,
        )
        logger.info(f"importance measured over {int(num_tokens)} tokens in {time.perf_counter() - probe_start:.1f}s")
    plan = None
    if is_rank_zero():
        plan = build_plan(
            sums, num_tokens, threshold=cfg.drop.threshold, selection=cfg.drop.selection,
            low_importance=cfg.drop.low_importance, seed=cfg.train.seed, sample_ratio=cfg.drop.sample_ratio,
            num_sampled=len(sample), world_size=ctx.batch.world_size,
            stage1_steps=num_steps, stage1_planned_steps=planned_steps,
        )
    plan = broadcast_object(plan)
    confirm_same_plan_everywhere(plan)
    if is_rank_zero():
        plan.save(os.path.join(output_dir, "plan.json"))
    save_adapters(loaded.layout, os.path.join(output_dir, STAGE1_ADAPTER_DIR), settings=adapter_settings(cfg),
                  base_model=ctx.model_path, plan=plan)
    if is_rank_zero():
        ctx.log.plan(plan, output_dir)
    ds_engine.destroy_engine(engine)
    return plan, result


def use_given_plan(ctx: RunContext) -> Plan:
    """``--plan``: stage 1 is skipped; the given plan is this run's plan (copied to its output directory)."""
    plan = Plan.load(ctx.cfg.drop.plan)
    confirm_same_plan_everywhere(plan)
    logger.info(f"stage 1 skipped: training the plan {ctx.cfg.drop.plan} (threshold {plan.threshold}, selection "
                f"{plan.selection}, {plan.low_importance} low-importance layers)")
    if is_rank_zero():
        plan.save(os.path.join(ctx.cfg.train.output_dir, "plan.json"))
        ctx.log.plan(plan, ctx.cfg.train.output_dir)
    barrier()
    return plan


def confirm_same_plan_everywhere(plan: Plan) -> None:
    """Every rank reports the digest of its layer mask; any disagreement stops the run."""
    confirm_same_everywhere("layer mask", plan.mask_digest())


def confirm_same_everywhere(what: str, digest: str) -> None:
    _, rank = get_world_size_and_rank()
    logger.info(f"rank {rank} holds {what} {digest}", extra={"all_ranks": True})
    digests = all_gather_object(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the {what}: {digests}")


def adapter_settings(cfg: RunConfig) -> dict:
    """What the adapter files record besides tensors, to rebuild the adapters of this run's method."""
    lora, method = cfg.lora, cfg.drop.method
    if method == "vera":
        return {"method": method, "r": lora.vera_r, "d_initial": lora.vera_d_initial,
                "projection_seed": lora.vera_projection_seed}
    if method == "tied_lora":
        return {"method": method, "r": lora.tied_lora_r, "lora_alpha": lora.lora_alpha}
    if method == "sparse_lora":
        return {"method": method, "r": lora.lora_r, "lora_alpha": lora.lora_alpha, "sparsity": lora.sparsity}
    return {"method": method, "r": lora.lora_r, "lora_alpha": lora.lora_alpha}


def run_pruning(ctx: RunContext) -> tuple[dict[str, torch.Tensor], StageResult]:
    """``--method sparse_lora``: score LoRA's entries with SNIP on a seeded sample, keep the best
    ``1 - sparsity`` of them (rank 0 ranks, every rank checks it holds the same masks), save the masks."""
    cfg, start = ctx.cfg, time.perf_counter()
    indices = scoring_rows(len(ctx.rows), cfg.lora.snip_examples, cfg.train.seed)
    lora = cfg.lora
    # The same seed as the training model's adapters: training starts from the A that was scored.
    loaded = _LoadedModel(
        ctx, lambda layout: attach_sparse_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout),
        cfg.train.seed + 1)
    engine = ds_engine.build_inference_engine(loaded.model, ctx.ds_config)
    scores = measure_saliency(ds_engine.module_for_gradients_of_non_parameters(engine), sparse_adapters(loaded.layout), [ctx.rows[i] for i in indices],
                              batch_size=ctx.batch.micro_batch_size, pad_token_id=ctx.tokenizer.pad_token_id,
                              device=ctx.device)
    ds_engine.destroy_engine(engine)
    masks = broadcast_object(global_keep_masks(scores, lora.sparsity) if is_rank_zero() else None)
    confirm_same_everywhere("sparsity masks", masks_digest(masks))
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    logger.info(f"SNIP: scored on {len(indices)} examples; kept {kept}/{total} LoRA entries "
                f"({100 * kept / total:.1f}%) in {time.perf_counter() - start:.1f}s")
    if is_rank_zero():
        save_masks(masks, os.path.join(cfg.train.output_dir, MASKS_NAME))
    barrier()
    return masks, StageResult("snip", seconds=time.perf_counter() - start)


def _stage2_attach(ctx: RunContext, plan: Plan | None,
                   masks: dict[str, torch.Tensor] | None = None) -> Callable[[AdapterLayout], None] | None:
    lora, method = ctx.cfg.lora, ctx.cfg.drop.method
    if method == "full":
        return None
    if method == "lora":
        return lambda layout: attach_own_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
    if method == "vera":
        return lambda layout: attach_vera_adapters(layout, lora.vera_r, lora.vera_d_initial,
                                                   lora.vera_projection_seed, lora.lora_dropout)
    if method == "tied_lora":
        return lambda layout: attach_tied_adapters(layout, lora.tied_lora_r, lora.lora_alpha, lora.lora_dropout)
    if method == "sparse_lora":
        def attach_pruned(layout: AdapterLayout) -> None:
            attach_sparse_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
            apply_masks(layout, masks)

        return attach_pruned

    def attach(layout: AdapterLayout) -> None:
        attach_planned_adapters(layout, plan, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
        if ctx.cfg.drop.stage2_init == "carry":
            stage1 = load_adapter_state(os.path.join(ctx.cfg.train.output_dir, STAGE1_ADAPTER_DIR))
            names = [f"{t}.layers.{i}" for t, target in plan.targets.items() for i in target.retained]
            copy_into_adapters(layout, stage1, names)

    return attach


def run_stage2(ctx: RunContext, plan: Plan | None,
               masks: dict[str, torch.Tensor] | None = None) -> tuple[AdapterLayout, int, StageResult]:
    """The final fine-tuning on the whole training set; returns (layout, trainable parameters, result)."""
    cfg = ctx.cfg
    loaded = _LoadedModel(ctx, _stage2_attach(ctx, plan, masks), cfg.train.seed + 1)
    if cfg.drop.method == "full":
        for param in loaded.model.parameters():
            param.requires_grad_(True)
    engine, result = _train(ctx, loaded, ctx.rows, name="stage2" if plan else "train",
                            epochs=cfg.train.num_train_epochs, seed=cfg.train.seed + 1,
                            evaluate_every=cfg.train.eval_steps,
                            # the first stage evaluates the base model: stage 2 when there is no stage 1
                            evaluate_base=cfg.train.eval_base_model and (cfg.drop.method != "loradrop"
                                                                         or cfg.drop.plan is not None),
                            max_steps=cfg.train.max_steps)
    output_dir = cfg.train.output_dir
    result.eval_metrics = evaluate_run(ctx, engine, os.path.join(output_dir, "eval"), result.num_steps)
    if cfg.drop.method == "full":
        save_full_model(engine, loaded.model, ctx, os.path.join(output_dir, FULL_MODEL_DIR))
    else:
        save_adapters(loaded.layout, os.path.join(output_dir, FINAL_ADAPTER_DIR), settings=adapter_settings(cfg),
                      base_model=ctx.model_path, plan=plan)
    trainable = count_trainable_parameters(loaded.model)
    ds_engine.destroy_engine(engine)
    return loaded.layout, trainable, result


def save_full_model(engine, model, ctx: RunContext, directory: str) -> None:
    state = ds_engine.consolidated_state_dict(engine)
    if is_rank_zero():
        model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        ctx.tokenizer.save_pretrained(directory)
    barrier()


def run(cfg: RunConfig) -> RunSummary:
    """Train one run end to end; rank 0 writes and tracks, every rank returns the same summary.

    The MLflow run ends FINISHED, FAILED if training raises, KILLED on SIGTERM / SIGINT.
    """
    start = time.perf_counter()
    ctx = prepare(cfg, check_inputs(cfg))
    world_size = ctx.batch.world_size
    if cfg.train.overwrite_output_dir and cfg.train.resume is None:
        clear_previous_run(cfg.train.output_dir)
    if cfg.train.resume is not None:
        ctx.resume_from = agreed_latest(cfg.train.output_dir) if cfg.train.resume == "auto" else cfg.train.resume
        logger.info(f"resuming from {ctx.resume_from or 'the start (no complete checkpoint yet)'}")
    ctx.log = ExperimentLog.start(cfg, ctx.ds_config, world_size=world_size, num_nodes=get_num_nodes(),
                                  model_path=ctx.model_path, resume=cfg.train.resume is not None)
    raise_terminated_on_signals()
    try:
        summary = train_and_save(ctx, start)
        if is_rank_zero():
            ctx.log.finish(summary, cfg.train.output_dir)
    except Terminated:
        ctx.log.end("KILLED")
        raise
    except BaseException:
        ctx.log.end("FAILED")
        raise
    barrier()
    return summary


def train_and_save(ctx: RunContext, start: float) -> RunSummary:
    cfg = ctx.cfg
    write_resolved_configs(ctx)
    stages, plan = [], None
    finished_plan = os.path.join(cfg.train.output_dir, STAGE1_ADAPTER_DIR, PLAN_NAME)
    if cfg.drop.method == "loradrop" and cfg.drop.plan is not None:
        plan = use_given_plan(ctx)
    elif cfg.drop.method == "loradrop" and cfg.train.resume is not None and os.path.isfile(finished_plan):
        # Stage 1 is never rerun: the saved plan keeps the mask fixed across the resume.
        plan = Plan.load(finished_plan)
        confirm_same_plan_everywhere(plan)
        logger.info(f"stage 1 finished before: using its plan ({finished_plan})")
    elif cfg.drop.method == "loradrop":
        plan, stage1 = run_stage1(ctx)
        stages.append(stage1)
    masks = None
    saved_masks = os.path.join(cfg.train.output_dir, MASKS_NAME)
    if cfg.drop.method == "sparse_lora" and cfg.train.resume is not None and os.path.isfile(saved_masks):
        masks = load_masks(saved_masks)  # the SNIP pass is never rerun: the masks stay fixed across a resume
        confirm_same_everywhere("sparsity masks", masks_digest(masks))
        logger.info(f"SNIP finished before: using its masks ({saved_masks})")
    elif cfg.drop.method == "sparse_lora":
        masks, pruning = run_pruning(ctx)
        stages.append(pruning)
    layout, trainable, final = run_stage2(ctx, plan, masks)
    stages.append(final)
    peak_bytes, peak_kind = ds_engine.peak_memory(ctx.device)
    peak_per_rank = all_gather_object(peak_bytes)
    summary = RunSummary(
        method=cfg.drop.method,
        world_size=ctx.batch.world_size,
        lora_parameters=count_full_lora_parameters(layout, cfg.reference_lora_r) if layout else 0,
        trainable_parameters=trainable,
        retained=plan.layer_mask() if plan else {t: list(range(len(w))) for t, w in layout.items()},
        num_layers={t: len(w) for t, w in layout.items()},
        stages=[{"name": s.name, "num_steps": s.num_steps, "final_loss": s.final_loss, "seconds": s.seconds,
                 "num_target_tokens": s.num_target_tokens} for s in stages],
        eval_metrics=final.eval_metrics,
        base_eval_metrics=read_base_evaluation(cfg.train.output_dir) if cfg.train.eval_base_model else {},
        wall_seconds=time.perf_counter() - start,
        num_truncated=ctx.num_truncated,
        peak_memory_bytes=peak_per_rank,
        peak_memory_kind=peak_kind,
    )
    report(summary)
    if is_rank_zero():
        write_json(os.path.join(cfg.train.output_dir, SUMMARY_NAME), summary.__dict__)
    barrier()
    return summary


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
    peaks = ", ".join(f"rank {rank} {value / 2**30:.2f} GiB" for rank, value in enumerate(summary.peak_memory_bytes))
    logger.info(f"peak memory ({summary.peak_memory_kind}): {peaks}")
    logger.info(f"done in {summary.wall_seconds:.1f}s")


def describe_evaluation(trained: dict, base: dict) -> str:
    """``evaluation (e2e/validation, 200 inputs): bleu 57.91 (base model 5.20) | rouge_l ...``."""
    names = [name for name, value in trained.items() if name in METRICS and isinstance(value, (int, float))]
    scores = " | ".join(f"{name} {trained[name]:.2f}" + (f" (base model {base[name]:.2f})" if name in base else "")
                        for name in names)
    return f"evaluation ({trained.get('task')}/{trained.get('split')}, {trained.get('num_examples')} inputs): {scores}"
