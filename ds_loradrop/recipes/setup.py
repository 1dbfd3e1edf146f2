"""Setting a run up: the checks, then the process group, model files, tokenised data, the resume point and
tracking, gathered once into a :class:`RunContext` that nothing changes afterwards.

Resume is decided here and only here: :class:`ResumePoint` says which checkpoint the run continues from and
which finished phase (a LoRA-drop plan, SNIP's masks) it keeps.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from dataclasses import dataclass

import torch

from ds_loradrop.config import RunConfig
from ds_loradrop.data.batching import stage1_sample_size
from ds_loradrop.data.tasks import EvalExample, Task
from ds_loradrop.errors import UsageError
from ds_loradrop.eval.generation import prompt_token_budget
from ds_loradrop.method.registry import Method, get_method
from ds_loradrop.models.loading import (
    default_cache_dir,
    load_model_config,
    load_tokenizer,
    resolve_model_path,
)
from ds_loradrop.recipes.checks import CheckedInputs, check_inputs
from ds_loradrop.recipes.restart import restart_count
from ds_loradrop.recipes.tokenized_data import tokenize_with_cache
from ds_loradrop.run_files import (
    DS_CONFIG_NAME,
    RUN_CONFIG_NAME,
    RUN_FILES,
)
from ds_loradrop.tracking.experiment_log import ExperimentLog
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.checkpoint import TrainerState, read_state
from ds_loradrop.training.distributed import (
    barrier,
    broadcast_object,
    get_logger,
    get_num_nodes,
    get_world_size_and_rank,
    is_rank_zero,
)
from ds_loradrop.training.ds_config import BatchSettings
from ds_loradrop.training.output_lock import lock_output_dir

logger = get_logger()


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: a complete checkpoint (and its trainer state), and the phases finished before
    it that are never redone (their files keep the layout or the masks fixed across the resume)."""

    requested: bool = False
    checkpoint: str | None = None
    state: TrainerState | None = None
    # The file a finished preparation left (a LoRA-drop stage 1's plan.json, a SNIP pass's masks).
    finished_preparation: str | None = None

    def start_step(self, stage: str, num_steps: int, seed: int) -> int:
        """Steps of ``stage`` already done (0 unless the checkpoint is of this stage).

        Raises:
            UsageError: the checkpoint is of this stage but for another step count or seed.
        """
        if self.state is None or self.state.stage != stage:
            return 0
        if (self.state.num_steps, self.state.seed) != (num_steps, seed):
            raise UsageError(
                f"checkpoint {self.checkpoint} is for {self.state.num_steps} steps with seed "
                f"{self.state.seed}; this run has {num_steps} steps with seed {seed} (did the configuration "
                "change?)"
            )
        return self.state.step


def resolve_resume_point(cfg: RunConfig, inputs: CheckedInputs) -> ResumePoint:
    """Every rank takes rank 0's checkpoint from ``check_inputs`` (the newest intact one for ``--resume
    auto``, else the given one)."""
    resume, output_dir = cfg.train.resume, cfg.train.output_dir
    if resume is None:
        return ResumePoint()
    checkpoint, skipped = broadcast_object(
        (inputs.resume_checkpoint, inputs.damaged_checkpoints) if is_rank_zero() else None
    )
    for path, problem in skipped:
        logger.warning(f"skipping damaged checkpoint {path}: {problem}")
    logger.info(f"resuming from {checkpoint or 'the start (no complete checkpoint yet)'}")
    return ResumePoint(
        requested=True,
        checkpoint=checkpoint,
        state=read_state(checkpoint) if checkpoint is not None else None,
        finished_preparation=get_method(cfg.finetuning.method).finished_preparation(output_dir),
    )


@dataclass(frozen=True)
class RunContext:
    """What every phase of a run needs, built once by :func:`setup`."""

    cfg: RunConfig
    ds_config: dict
    batch: BatchSettings
    device: torch.device
    model_path: str
    tokenizer: object  # a transformers tokenizer with a pad token
    train_examples: list[dict]  # tokenised training examples: input_ids, attention_mask, labels, stratum
    val_examples: list[dict]  # tokenised held-out examples for the validation loss (empty: none)
    num_truncated: int
    task: Task
    eval_split: str
    eval_examples: list[EvalExample]
    max_prompt_tokens: int
    resume: ResumePoint
    log: ExperimentLog

    @property
    def dtype(self) -> torch.dtype:
        return ds_engine.model_dtype(self.ds_config)

    @property
    def output_dir(self) -> str:
        return self.cfg.train.output_dir

    @property
    def method(self) -> Method:
        return get_method(self.cfg.finetuning.method)


def setup(cfg: RunConfig) -> RunContext:
    """Checks (before anything is written), process group, model files (a preset is built on rank 0),
    tokenised data, the resume point and the started MLflow run."""
    inputs = check_inputs(cfg)
    if is_rank_zero():  # one job per output directory (another job's rank 0 holds it: refused here)
        lock_output_dir(cfg.train.output_dir)
    ds_engine.init_distributed(datetime.timedelta(minutes=cfg.train.collective_timeout_minutes))
    world_size, _ = get_world_size_and_rank()
    if world_size != inputs.batch.world_size:
        raise RuntimeError(f"world size changed from {inputs.batch.world_size} to {world_size} at start-up")
    if cfg.train.overwrite_output_dir and cfg.train.resume is None:
        clear_previous_run(cfg.train.output_dir)
    task = inputs.task
    data = prepare_data(cfg, inputs, task)
    resume = resolve_resume_point(cfg, inputs)
    log = ExperimentLog.start(
        cfg,
        inputs.ds_config,
        world_size=world_size,
        num_nodes=get_num_nodes(),
        model_path=data.model_path,
        resume=resume.requested,
        restarts=restart_count(),
    )
    log_data_lineage(cfg, inputs, log)
    ctx = RunContext(
        cfg=cfg,
        ds_config=inputs.ds_config,
        batch=inputs.batch,
        device=ds_engine.local_device(),
        model_path=data.model_path,
        tokenizer=data.tokenizer,
        train_examples=data.train_examples,
        val_examples=data.val_examples,
        num_truncated=data.num_truncated,
        task=task,
        eval_split=inputs.eval_split,
        eval_examples=inputs.eval_examples,
        max_prompt_tokens=prompt_token_budget(
            load_model_config(data.model_path, cfg.model.trust_remote_code),
            cfg.eval.max_new_tokens or task.max_new_tokens,
        ),
        resume=resume,
        log=log,
    )
    return ctx


@dataclass(frozen=True)
class PreparedData:
    model_path: str
    tokenizer: object
    train_examples: list[dict]
    num_truncated: int
    val_examples: list[dict]


def prepare_data(cfg: RunConfig, inputs: CheckedInputs, task: Task) -> PreparedData:
    """The model files (a preset built), its tokenizer, and the tokenised training and validation examples."""
    data_dir = cfg.data.resolved_data_dir()
    model_path = resolve_model_path(
        cfg.model.model,
        cfg.model.model_cache_dir,
        lambda max_examples: task.training_text(data_dir, max_examples, cfg.data.train_split),
    )
    logger.info(f"model: {model_path}")
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    cache_root = (cfg.model.model_cache_dir or default_cache_dir()) if cfg.data.cache_tokenized else None
    train_examples, num_truncated = tokenize_with_cache(
        inputs.examples, tokenizer, cfg.data.max_seq_length, cache_root=cache_root, what="training data"
    )
    val_examples = []
    if inputs.val_examples is not None:
        val_examples, _ = tokenize_with_cache(
            inputs.val_examples, tokenizer, cfg.data.max_seq_length, cache_root=cache_root, what="validation"
        )
    if len(train_examples) == 0:
        raise UsageError("no training example has a target token left after tokenisation")
    if num_truncated:
        logger.info(
            f"{num_truncated} of {len(inputs.examples)} examples truncated to "
            f"{cfg.data.max_seq_length} tokens"
        )
    return PreparedData(model_path, tokenizer, train_examples, num_truncated, val_examples)


def log_data_lineage(cfg: RunConfig, inputs: CheckedInputs, log: ExperimentLog) -> None:
    """The rows the run trains, validates and evaluates on, and their files (or hub ids), as MLflow inputs."""
    data_dir = cfg.data.resolved_data_dir()

    def source(split: str) -> str:
        try:
            path = inputs.task.split_path(data_dir, split)
        except UsageError:
            path = data_dir
        return os.path.abspath(path) if os.path.exists(path) else path  # a hub id stays one

    method = get_method(cfg.finetuning.method)
    log.datasets(
        cfg,
        {"training": source(cfg.data.train_split), "evaluation": source(inputs.eval_split),
         "validation": source(inputs.eval_split)},
        {"training": inputs.examples, "evaluation": [dataclasses.asdict(e) for e in inputs.eval_examples],
         "validation": inputs.val_examples},
        stage1_sample_size=stage1_sample_size(inputs.examples.num_rows, cfg.drop.sample_ratio)
        if method.has_stage1(cfg)
        else None,
    )  # fmt: skip


def clear_previous_run(output_dir: str) -> None:
    """--overwrite_output_dir: remove the files of the run that was there (ours only), on rank 0."""
    if is_rank_zero():
        for name in RUN_FILES:
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    barrier()


def write_resolved_configs(ctx: RunContext) -> None:
    if is_rank_zero():
        os.makedirs(ctx.output_dir, exist_ok=True)
        resolved = {
            **ctx.cfg.to_dict(),
            "resolved": {
                "model_path": ctx.model_path,
                "world_size": ctx.batch.world_size,
                "micro_batch_size": ctx.batch.micro_batch_size,
                "gradient_accumulation_steps": ctx.batch.gradient_accumulation_steps,
                "global_batch_size": ctx.batch.global_batch_size,
                "max_grad_norm": ctx.batch.max_grad_norm,
                "dtype": str(ctx.dtype).removeprefix("torch."),
                "num_train_examples": len(ctx.train_examples),
            },
        }
        write_json(os.path.join(ctx.output_dir, RUN_CONFIG_NAME), resolved)
        write_json(os.path.join(ctx.output_dir, DS_CONFIG_NAME), ctx.ds_config)
    barrier()


def write_json(path: str, value) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2)
