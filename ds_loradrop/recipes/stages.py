"""What every stage of a run does: build a fresh model with its adapters, train it on an engine for a number
of steps (continuing from the resume point, checkpointing, evaluating), and evaluate by generation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers.integrations import HfDeepSpeedConfig

from ds_loradrop.errors import Terminated
from ds_loradrop.eval.evaluation import evaluate
from ds_loradrop.method.lora import AdapterLayout
from ds_loradrop.method.placement import (
    cast_adapters,
    count_trainable_parameters,
    freeze_all_but_adapters,
    inject_lora,
)
from ds_loradrop.models.loading import enable_activation_checkpointing, load_for_deepspeed, recomputed_layers
from ds_loradrop.recipes.setup import RunContext
from ds_loradrop.run_files import BASE_EVAL_DIR, METRICS_NAME, step_eval_dir
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.checkpoint import TrainerState, describe_reshape, load_checkpoint, save_checkpoint
from ds_loradrop.training.distributed import get_logger
from ds_loradrop.training.ds_config import zero_stage
from ds_loradrop.training.loop import StageSteps, stop_requested_on_any_rank
from ds_loradrop.training.validation import validation_loss

logger = get_logger()


@dataclass
class StageModel:
    """A freshly loaded model and its adapter layout (empty for full fine-tuning).

    ``zero3_loading`` keeps the object alive under which ``from_pretrained`` loaded the weights straight into
    ZeRO-3 partitions (transformers holds it only weakly); None below ZeRO-3.
    """

    model: torch.nn.Module
    layout: AdapterLayout = field(default_factory=dict)
    zero3_loading: HfDeepSpeedConfig | None = None


def build_model(ctx: RunContext, attach: Callable[[AdapterLayout], None] | None, seed: int) -> StageModel:
    """The base model with adapters attached by ``attach`` (seeded), every other weight frozen; with
    ``attach`` None (full fine-tuning) every weight trains."""
    model, zero3_loading = load_for_deepspeed(ctx.model_path, ctx.ds_config, ctx.cfg.model.trust_remote_code)
    model.config.use_cache = False
    if ctx.cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
        layers = recomputed_layers(model)
        logger.info("activation checkpointing: %d decoder layers recompute in backward", layers)
    if attach is None:
        for param in model.parameters():
            param.requires_grad_(True)
        return StageModel(model, {}, zero3_loading)
    layout = inject_lora(model, ctx.cfg.lora.target_names)
    torch.manual_seed(seed)
    attach(layout)
    freeze_all_but_adapters(model)
    cast_adapters(model, ctx.dtype)
    return StageModel(model, layout, zero3_loading)


def train_model(
    ctx: RunContext,
    built: StageModel,
    examples: list[dict],
    *,
    name: str,
    num_steps: int,
    seed: int,
    evaluate_every: int | None = None,
    evaluate_base: bool = False,
    before_forward: Callable[[int, dict], None] | None = None,
    on_evaluation: Callable[[int, dict], None] | None = None,
):
    """Train ``built`` for ``num_steps`` on a new engine, from the resume point when it is of this stage.

    After each step: its metrics are logged; the validation loss is measured every ``--eval_steps`` and
    the model evaluated by generation every ``evaluate_every`` steps, both passed to
    ``on_evaluation(step, metrics)``; a checkpoint is written every ``--save_steps`` and at the end; a
    SIGTERM / SIGINT on any rank writes one (if this step has none) and stops the run. The base model is
    evaluated before the first step when ``evaluate_base``. ``before_forward(step, micro_batch)`` runs
    before each micro-batch's forward. Returns (engine, StageResult).
    """
    train = ctx.cfg.train
    engine = ds_engine.build_engine(
        built.model,
        ctx.ds_config,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        lr_scheduler=train.lr_scheduler,
        num_warmup_steps=int(train.warmup_ratio * num_steps),
        num_training_steps=num_steps,
    )
    held = ds_engine.describe_partitioning(built.model)
    logger.info(
        f"{name}: {count_trainable_parameters(built.model)} trainable parameters; ZeRO stage "
        f"{zero_stage(ctx.ds_config)}: {held.partitioned}/{held.tensors} tensors "
        f"partitioned, {held.local_elements}/{held.elements} elements held by this rank",
        extra={"all_ranks": True},
    )
    start_step = ctx.resume.start_step(name, num_steps, seed)
    if start_step:
        state = load_checkpoint(engine, ctx.resume.checkpoint)
        reshaped = describe_reshape(state, ctx.batch.world_size, zero_stage(ctx.ds_config))
        how = f" (portable state: {reshaped})" if reshaped else ""
        logger.info(f"{name}: resumed from {ctx.resume.checkpoint} at step {start_step}/{num_steps}{how}")
    if evaluate_base and start_step == 0:
        evaluate_base_model(ctx, engine)
    elif evaluate_base:
        logger.info(f"{name}: resumed after step 0; the base model's evaluation is the one made before")
    checkpoint = TrainerState(
        stage=name,
        step=start_step,
        num_steps=num_steps,
        seed=seed,
        world_size=ctx.batch.world_size,
        zero_stage=zero_stage(ctx.ds_config),
        global_batch_size=ctx.batch.global_batch_size,
    )
    last_saved = None

    def save(step: int) -> None:
        nonlocal last_saved
        path = save_checkpoint(
            engine, ctx.output_dir, replace(checkpoint, step=step), train.save_total_limit, ctx.cfg.to_dict()
        )
        last_saved = step
        logger.info(f"{name}: checkpoint {path}")

    with StageSteps(
        engine,
        examples,
        ctx.batch,
        name=name,
        num_steps=num_steps,
        seed=seed,
        pad_token_id=ctx.tokenizer.pad_token_id,
        logging_steps=train.logging_steps,
        device=ctx.device,
        group_by_length=train.group_by_length,
        padding_free=train.padding_free,
        before_forward=before_forward,
        start_step=start_step,
    ) as steps:
        for step in steps:
            if step.logged:
                ctx.log.stage_metrics(name, step.logged, step.number)
            measured, within = {}, step.number < num_steps  # the last step is evaluated by the caller
            if train.eval_steps and step.number % train.eval_steps == 0 and within:
                measured["val_loss"] = measure_validation_loss(ctx, engine, name, step.number)
            if evaluate_every and step.number % evaluate_every == 0 and within:
                eval_dir = os.path.join(ctx.output_dir, step_eval_dir(step.number))
                measured.update(evaluate_run(ctx, engine, eval_dir, step.number))
            if measured and on_evaluation is not None:
                on_evaluation(step.number, measured)
            if train.save_steps and (step.number % train.save_steps == 0 or step.number == num_steps):
                save(step.number)
            signal_number = stop_requested_on_any_rank(ctx.device)
            if signal_number:  # preemption: keep the work done so far, whether or not --save_steps asked
                logger.info(f"{name}: signal {signal_number} received; stopping after step {step.number}")
                if last_saved != step.number:
                    save(step.number)
                raise Terminated(signal_number)
    result = steps.result
    result.precision = ds_engine.describe_precision(engine)
    logger.info(f"{name}: precision " + ", ".join(f"{k} {v}" for k, v in result.precision.items()))
    result.val_loss = measure_validation_loss(ctx, engine, name, result.num_steps)
    return engine, result


def measure_validation_loss(ctx: RunContext, engine, name: str, step: int) -> float | None:
    """The validation loss of the held-out examples (None without them), logged as ``<stage>/val_loss``."""
    if not ctx.val_examples:
        return None
    loss = validation_loss(
        engine,
        ctx.val_examples,
        batch_size=ctx.batch.micro_batch_size,
        pad_token_id=ctx.tokenizer.pad_token_id,
        device=ctx.device,
    )
    logger.info(f"{name} step {step}: validation loss {loss:.4f} ({len(ctx.val_examples)} held-out examples)")
    ctx.log.stage_metrics(name, {"val_loss": loss}, step)
    return loss


def evaluate_on(ctx: RunContext, engine, output_dir: str, label: str = "eval") -> dict:
    """Generate for the run's evaluation inputs, score, write predictions and metrics to ``output_dir``."""
    return evaluate(
        engine,
        ctx.tokenizer,
        ctx.task,
        ctx.eval_examples,
        ctx.eval_split,
        ctx.cfg.eval,
        device=ctx.device,
        output_dir=output_dir,
        max_prompt_tokens=ctx.max_prompt_tokens,
        label=label,
    )


def evaluate_run(ctx: RunContext, engine, output_dir: str, step: int) -> dict:
    metrics = evaluate_on(ctx, engine, output_dir)
    ctx.log.evaluation(metrics, step)
    return metrics


def evaluate_base_model(ctx: RunContext, engine) -> dict:
    """The model before its first step, which is the base model (every adapter starts as a zero update),
    evaluated on the same inputs as the trained model, so that the two scores can be read side by side."""
    metrics = evaluate_on(ctx, engine, os.path.join(ctx.output_dir, BASE_EVAL_DIR), label="base model")
    ctx.log.base_evaluation(metrics)
    return metrics


def read_base_evaluation(output_dir: str) -> dict:
    path = os.path.join(output_dir, BASE_EVAL_DIR, METRICS_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)
