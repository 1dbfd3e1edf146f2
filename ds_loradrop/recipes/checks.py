"""Before anything is trained or written: every check that needs no process group.

``check_inputs`` reads the data, the DeepSpeed JSON and the model's config, and raises UsageError naming
the first problem, so that bad input costs one ``error:`` line and leaves the output directory untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ds_loradrop.config import SMOLLM2_135M, TINY_LLAMA, TINY_LLAMA2, RunConfig
from ds_loradrop.config.files import with_moved_keys
from ds_loradrop.data.chat import require_chat_template
from ds_loradrop.data.tasks import EvalExample, Task
from ds_loradrop.errors import UsageError
from ds_loradrop.method.placement import inject_lora
from ds_loradrop.models.loading import build_on_meta, load_model_config, load_tokenizer
from ds_loradrop.run_files import RUN_CONFIG_NAME, RUN_FILES
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.checkpoint import check_resumable, newest_intact, read_state
from ds_loradrop.training.distributed import get_logger, get_world_size_and_rank
from ds_loradrop.training.ds_config import BatchSettings, load_ds_config, resolve_ds_config

logger = get_logger()


@dataclass
class CheckedInputs:
    """The run's inputs, read and checked before any process group, training or writing."""

    ds_config: dict
    batch: BatchSettings
    examples: object  # datasets.Dataset with prompt, target, stratum
    eval_split: str
    eval_examples: list[EvalExample]
    val_examples: object  # datasets.Dataset (prompt, target, stratum) scored for the validation loss, or None
    # --resume auto: the newest intact checkpoint (None: start) and the damaged newer ones it passed over,
    # decided here once (every file's checksum read once); setup takes rank 0's decision
    resume_checkpoint: str | None = None
    damaged_checkpoints: tuple[tuple[str, str], ...] = ()


def check_inputs(cfg: RunConfig) -> CheckedInputs:
    """Every check that needs no process group, before anything is trained or written.

    Raises:
        UsageError: naming the first problem found.
    """
    task = cfg.data.build_task()
    data_dir = cfg.data.resolved_data_dir()
    task.split_path(data_dir, cfg.data.train_split)
    raw_ds_config = load_ds_config(cfg.train.ds_config)
    model_config = load_model_config(cfg.model.model, cfg.model.trust_remote_code, cfg.model.model_cache_dir)
    world_size, _ = get_world_size_and_rank()
    ds_config, batch = resolve_ds_config(
        raw_ds_config,
        cfg.train,
        world_size=world_size,
        hidden_size=model_config.hidden_size,
        accelerator_has_native_bf16=ds_engine.accelerator_has_native_bf16(),
    )
    if cfg.finetuning.method != "full":
        layout = inject_lora(build_on_meta(model_config, cfg.model.trust_remote_code), cfg.lora.target_names)
        if cfg.drop.plan is not None:
            check_given_plan(cfg, layout)
    if (
        cfg.drop.importance_pass == "last_epoch"
        and cfg.train.gradient_checkpointing
        and cfg.finetuning.method == "loradrop"
    ):
        raise UsageError(
            "--importance_pass last_epoch records the training forwards, which --gradient_checkpointing "
            "runs twice (once more in backward); use --importance_pass after_training with it"
        )
    if cfg.drop.importance_pass == "last_epoch" and cfg.lora.lora_dropout > 0:
        raise UsageError(
            "--importance_pass last_epoch needs --lora_dropout 0: the training forwards it records "
            "see dropped-out adapter inputs"
        )
    output_dir = cfg.train.output_dir
    resume = cfg.train.resume
    if resume is not None:
        if cfg.train.overwrite_output_dir:
            raise UsageError(
                "--resume continues the run in --output_dir and --overwrite_output_dir deletes it: "
                "pass one of them"
            )
        check_resume_matches(cfg, os.path.join(output_dir, RUN_CONFIG_NAME))
        checkpoint, damaged = newest_intact(output_dir) if resume == "auto" else (resume, [])
        if checkpoint is not None:
            ds_config, batch = keep_global_batch(
                checkpoint, cfg, raw_ds_config, (ds_config, batch), model_config.hidden_size
            )
            check_resumable(checkpoint, output_dir, world_size, batch.global_batch_size)
            check_resume_matches(cfg, os.path.join(checkpoint, RUN_CONFIG_NAME))
    if os.path.isdir(output_dir) and not cfg.train.overwrite_output_dir and resume is None:
        existing = [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]
        if existing:
            raise UsageError(
                f"output directory {output_dir!r} already holds a run ({', '.join(existing)}); "
                f"choose another --output_dir, continue it with --resume auto, or pass --overwrite_output_dir"
            )
    eval_split, eval_examples = load_eval_examples(cfg, task)
    check_save_best_by(cfg, task)
    examples = load_training_examples(cfg, task, eval_examples)
    if "messages" in examples.column_names:
        check_chat_template(cfg)
    # Data smaller than one global batch is refused now, not after files are written.
    batch.steps(examples.num_rows, cfg.train.num_train_epochs, cfg.train.max_steps)
    if cfg.finetuning.method == "loradrop":
        sample_size = max(1, round(cfg.drop.sample_ratio * examples.num_rows))
        batch.steps(sample_size, cfg.drop.stage1_epochs, cfg.stage1_max_steps, what="stage-1 sample")
    return CheckedInputs(
        resume_checkpoint=checkpoint if resume is not None else None,
        damaged_checkpoints=tuple(damaged) if resume is not None else (),
        ds_config=ds_config,
        batch=batch,
        examples=examples,
        eval_split=eval_split,
        eval_examples=eval_examples,
        val_examples=load_validation_examples(cfg, task, eval_split, eval_examples),
    )


def keep_global_batch(
    checkpoint: str, cfg: RunConfig, raw_ds_config: dict, resolved: tuple[dict, BatchSettings], hidden: int
) -> tuple[dict, BatchSettings]:
    """(ds_config, batch) that continue ``checkpoint`` on this job's ranks: its global batch size kept by
    another gradient accumulation when the number of ranks changed (a restart on fewer or more ranks),
    so that the steps and the data order go on where they were. Unchanged when it already matches.

    Raises:
        UsageError: the checkpoint's global batch is not a whole number of this job's micro batches.
    """
    batch = resolved[1]
    try:
        saved = read_state(checkpoint).global_batch_size
    except (OSError, ValueError, TypeError):
        saved = None  # check_resumable says what is wrong with it
    if saved is None or saved == batch.global_batch_size:
        return resolved
    per_step = batch.micro_batch_size * batch.world_size
    if saved % per_step:
        raise UsageError(
            f"--resume {checkpoint!r} was trained with a global batch of {saved}, which {batch.world_size} "
            f"rank(s) x micro batch {batch.micro_batch_size} cannot make up; pass a "
            "--per_device_train_batch_size that divides it"
        )
    train = dataclasses.replace(cfg.train, gradient_accumulation_steps=saved // per_step)
    logger.warning(
        f"resuming {checkpoint} on {batch.world_size} rank(s): gradient accumulation "
        f"{batch.gradient_accumulation_steps} -> {train.gradient_accumulation_steps} keeps its global batch "
        f"of {saved}"
    )
    return resolve_ds_config(
        raw_ds_config,
        train,
        world_size=batch.world_size,
        hidden_size=hidden,
        accelerator_has_native_bf16=ds_engine.accelerator_has_native_bf16(),
    )


def check_given_plan(cfg: RunConfig, layout) -> None:
    """``--plan``: a readable plan for these targets and this model's layer counts, used with LoRA-drop."""
    from ds_loradrop.method.plan import Plan

    path = cfg.drop.plan
    if cfg.finetuning.method != "loradrop":
        raise UsageError(f"--plan is a LoRA-drop layout; --method {cfg.finetuning.method} does not use one")
    if cfg.drop.stage2_init == "carry":
        raise UsageError("--stage2_init carry needs this run's stage-1 adapter, and --plan skips stage 1")
    try:
        plan = Plan.load(path)
    except OSError as error:
        raise UsageError(f"--plan {path!r} cannot be read ({error.strerror})") from error
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--plan {path!r} is not a plan.json ({type(error).__name__}: {error})") from error
    if sorted(plan.targets) != sorted(layout):
        raise UsageError(
            f"--plan {path!r} is for targets {sorted(plan.targets)}, this run trains {sorted(layout)}"
        )
    for name, target in plan.targets.items():
        if len(target.normalized) != len(layout[name]):
            raise UsageError(
                f"--plan {path!r} has {len(target.normalized)} layers of {name!r}, the model has "
                f"{len(layout[name])}"
            )


def load_eval_examples(cfg: RunConfig, task: Task) -> tuple[str, list[EvalExample]]:
    """(split, inputs) evaluated by generation; UsageError if evaluating the training split leaves no
    held-out slice."""
    eval_split = cfg.data.eval_split or task.default_eval_split
    if eval_split == cfg.data.train_split and cfg.eval.max_eval_samples is None:
        raise UsageError(
            f"--eval_split {eval_split} is also the training split: pass --max_eval_samples N to hold out "
            f"the first N inputs for evaluation"
        )
    return eval_split, task.load_eval(cfg.data.resolved_data_dir(), eval_split, cfg.eval.max_eval_samples)


def load_training_examples(cfg: RunConfig, task: Task, eval_examples: list[EvalExample] | None = None):
    """The training examples (``datasets.Dataset`` of prompt, target, stratum): the first
    ``--max_train_samples`` of the training split, without the evaluated inputs when both splits are the
    same (those are loaded here when not given)."""
    if eval_examples is None:
        _, eval_examples = load_eval_examples(cfg, task)
    eval_split = cfg.data.eval_split or task.default_eval_split
    held_out = {ex.prompt for ex in eval_examples} if eval_split == cfg.data.train_split else set()
    return task.load_train(
        cfg.data.resolved_data_dir(), cfg.data.max_train_samples, cfg.data.train_split, held_out
    )


def load_validation_examples(cfg: RunConfig, task: Task, eval_split: str, eval_examples: list[EvalExample]):
    """The first ``--val_loss_samples`` examples (input + reference) of the evaluated inputs, which are never
    trained on; None when the validation loss is off."""
    if cfg.eval.val_loss_samples == 0:
        return None
    evaluated = {example.prompt for example in eval_examples}
    held_out = task.load_train(cfg.data.resolved_data_dir(), None, eval_split)
    held_out = held_out.filter(lambda ex: ex["prompt"] in evaluated, keep_in_memory=True)
    return held_out.select(range(min(cfg.eval.val_loss_samples, len(held_out))))


def check_chat_template(cfg: RunConfig) -> None:
    """Chat data needs the model's tokenizer to have a chat template."""
    model = cfg.model.model
    if model in (TINY_LLAMA, TINY_LLAMA2):
        raise UsageError(
            f"chat 'messages' data needs a tokenizer with a chat template; --model {model} has none"
        )
    if model != SMOLLM2_135M:  # SmolLM2-135M-Instruct's GGUF file carries its chat template
        require_chat_template(load_tokenizer(model, cfg.model.trust_remote_code))


def check_save_best_by(cfg: RunConfig, task: Task) -> None:
    metric = cfg.train.save_best_by
    if metric is None:
        return
    if cfg.finetuning.method == "full":
        raise UsageError("--save_best_by keeps the best adapter; --method full trains no adapter")
    if metric == "val_loss":
        if cfg.eval.val_loss_samples == 0:
            raise UsageError("--save_best_by val_loss needs the validation loss: --val_loss_samples > 0")
    elif metric not in task.metrics:
        raise UsageError(
            f"--save_best_by {metric!r}: expected val_loss or one of task {task.name!r}'s metrics "
            f"{list(task.metrics)}"
        )
    elif cfg.train.eval_steps is not None and not cfg.train.generate_at_eval_steps:
        raise UsageError(
            f"--save_best_by {metric} is measured by generation, which --generate_at_eval_steps false "
            "turns off at --eval_steps"
        )


# What a resumed run may not change: the model, the data, the method, its adapters and the LoRA-drop
# decisions.
RESUME_FIXED_SECTIONS = ("model", "data", "finetuning", "lora", "drop")


# Keys of those sections that change nothing learned.
RESUME_FREE_KEYS = {("data", "cache_tokenized"), ("drop", "stop_after_stage1")}


def saved_value(saved: dict, section: str, key: str):
    """A saved run's setting; a key its version did not write yet has the default of now."""
    values = saved.get(section, {})
    if key in values:
        return values[key]
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}[section]
    return section_cls.__dataclass_fields__[key].default


def check_resume_matches(cfg: RunConfig, saved_config_path: str) -> None:
    """Raise UsageError if a resume changes what the checkpoint was trained for."""
    if not os.path.isfile(saved_config_path):
        return
    with open(saved_config_path) as handle:
        saved = with_moved_keys(json.load(handle), saved_config_path)
    current = cfg.to_dict()
    changed = [
        f"{section}.{key}"
        for section in RESUME_FIXED_SECTIONS
        for key in current[section]
        if (section, key) not in RESUME_FREE_KEYS
        and saved_value(saved, section, key) != current[section][key]
    ]
    if changed:
        raise UsageError(
            f"--resume with a changed configuration ({', '.join(changed)}); "
            f"{os.path.dirname(saved_config_path)!r} was trained with other values"
        )
