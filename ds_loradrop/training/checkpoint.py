"""Training checkpoints: complete or absent, newest first, with the position to resume from.

Layout under ``<output_dir>/checkpoints/``::

    stage2-step-000040/        a complete checkpoint (renamed into place only after every rank saved)
        ds/                    DeepSpeed: trainable parameters, optimizer, LR scheduler (no frozen base)
        trainer_state.json     stage, step, epoch layout, seed
        run_config.json        the run configuration it was trained with (a resume must not change it)
        rng_rank<R>.safetensors  torch's RNG state of every rank
        trainable_state.safetensors / .json   the same trainable state whole, for any number of ranks and
                               any ZeRO stage (training.engine.portable_state)
        manifest.json          size and SHA-256 of every file above, written last (checkpoint_integrity)
    .saving-stage2-step-000042/   an interrupted save: never "latest", removed on the next save

A checkpoint's position is (stage, optimizer step); the data position follows from the step, because
the global batches of every epoch are a pure function of the seed and the epoch, whatever the number of
ranks. A job on the ranks and ZeRO stage that wrote the checkpoint loads DeepSpeed's own files (bit-exact);
a job on another number of ranks or another ZeRO stage loads the portable trainable state, with the same
global batch size (which fixes the steps and the data order).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file

from ds_loradrop.errors import UsageError
from ds_loradrop.run_files import CHECKPOINT_DIR, RUN_CONFIG_NAME
from ds_loradrop.training.checkpoint_integrity import (
    MANIFEST_NAME,
    check_space,
    verify,
    write_manifest,
)
from ds_loradrop.training.distributed import (
    barrier,
    get_world_size_and_rank,
    is_rank_zero,
)
from ds_loradrop.training.engine.portable_state import (
    META_NAME as PORTABLE_META_NAME,
)
from ds_loradrop.training.engine.portable_state import (
    TENSORS_NAME as PORTABLE_TENSORS_NAME,
)
from ds_loradrop.training.engine.portable_state import load_portable_state, save_portable_state

STATE_NAME = "trainer_state.json"
STAGING_PREFIX = ".saving-"
_NAME = re.compile(r"^(stage1|stage2|train)-step-(\d+)$")
_STAGE_ORDER = {"stage1": 0, "stage2": 1, "train": 1}


@dataclass
class TrainerState:
    stage: str
    step: int
    num_steps: int
    seed: int
    world_size: int
    zero_stage: int | None = None  # None: written before checkpoints recorded it
    global_batch_size: int | None = None


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-step-{step:06d}"


def list_complete(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (stage, then step)."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_NAME)):
            found.append((_STAGE_ORDER[match.group(1)], int(match.group(2)), os.path.join(root, name)))
    return [path for *_, path in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    complete = list_complete(output_dir)
    return complete[-1] if complete else None


def read_state(path: str) -> TrainerState:
    with open(os.path.join(path, STATE_NAME)) as handle:
        return TrainerState(**json.load(handle))


def save_checkpoint(
    engine, output_dir: str, state: TrainerState, save_total_limit: int | None, run_config: dict | None = None
) -> str:
    """Save on every rank into a staging directory, then rank 0 renames it into place.

    The trainer state is written last, inside the staging directory, so a directory with that file
    is complete by construction; a crash before the rename leaves only a ``.saving-*`` directory.
    """
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    name = checkpoint_name(state.stage, state.step)
    staging, final = os.path.join(root, f"{STAGING_PREFIX}{name}"), os.path.join(root, name)
    if is_rank_zero():
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted save's leftovers free their space first
    check_space(engine, output_dir, name, latest_checkpoint(output_dir))
    if is_rank_zero():
        os.makedirs(root, exist_ok=True)
        os.makedirs(staging)
    barrier()
    engine.save_checkpoint(
        os.path.join(staging, "ds"),
        tag="state",
        client_state={},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    _, rank = get_world_size_and_rank()
    save_file({"rng": torch.get_rng_state()}, os.path.join(staging, f"rng_rank{rank}.safetensors"))
    save_portable_state(engine, staging, state.step)
    barrier()
    if is_rank_zero():
        if run_config is not None:
            with open(os.path.join(staging, RUN_CONFIG_NAME), "w") as handle:
                json.dump(run_config, handle, indent=2)
        with open(os.path.join(staging, STATE_NAME), "w") as handle:
            json.dump(asdict(state), handle, indent=2)
        write_manifest(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        if save_total_limit is not None:
            for old in list_complete(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def is_legacy(path: str) -> bool:
    """A checkpoint written before manifests and portable states: complete by its trainer state alone."""
    return not os.path.exists(os.path.join(path, MANIFEST_NAME)) and not os.path.exists(
        os.path.join(path, PORTABLE_TENSORS_NAME)
    )


def damage(path: str) -> str | None:
    """What is wrong with complete checkpoint ``path`` (None: nothing)."""
    return None if is_legacy(path) else verify(path)


def newest_intact(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint whose files match its manifest, and the newer ones skipped (each
    with what failed)."""
    skipped = []
    for path in reversed(list_complete(output_dir)):
        problem = damage(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def check_resumable(
    path: str, output_dir: str, world_size: int, global_batch_size: int | None = None
) -> TrainerState:
    """The state of checkpoint ``path`` if this run can continue from it.

    Raises:
        UsageError: ``path`` is missing, an interrupted save, not written by ds-loradrop, incomplete,
            from another run directory, written by another number of ranks without a portable state,
            or trained with another global batch size.
    """
    if not os.path.isdir(path):
        raise UsageError(f"--resume {path!r}: no such checkpoint directory")
    name = os.path.basename(os.path.normpath(path))
    if name.startswith(STAGING_PREFIX):
        raise UsageError(
            f"--resume {path!r} is an interrupted save (a partial checkpoint); use --resume auto "
            f"for the newest complete one"
        )
    if not os.path.isfile(os.path.join(path, STATE_NAME)):
        made_by = (
            " (a DeepSpeed checkpoint of another tool?)"
            if os.path.isfile(os.path.join(path, "latest"))
            else ""
        )
        raise UsageError(
            f"--resume {path!r} is not a complete ds-loradrop checkpoint: no {STATE_NAME}{made_by}"
        )
    own_root = os.path.realpath(os.path.join(output_dir, CHECKPOINT_DIR))
    if os.path.dirname(os.path.realpath(path)) != own_root:
        raise UsageError(
            f"--resume {path!r} belongs to another run: this run's checkpoints are in {own_root!r} "
            f"(its plan and stage-1 adapters live beside them)"
        )
    try:
        state = read_state(path)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--resume {path!r}: unreadable {STATE_NAME} ({error})") from error
    problem = damage(path)
    if problem is not None:
        raise UsageError(
            f"--resume {path!r} is damaged: {problem}; --resume auto takes the newest intact one"
        )
    expected = [
        os.path.join("ds", "state"),
        *(f"rng_rank{rank}.safetensors" for rank in range(state.world_size)),
    ]
    missing = [item for item in expected if not os.path.exists(os.path.join(path, item))]
    if missing:
        raise UsageError(f"--resume {path!r} is incomplete: {', '.join(missing)} missing")
    portable = all(os.path.isfile(os.path.join(path, n)) for n in (PORTABLE_TENSORS_NAME, PORTABLE_META_NAME))
    if state.world_size != world_size and not portable:
        raise UsageError(
            f"--resume {path!r} was written by {state.world_size} ranks, this job has {world_size}, and "
            f"it has no {PORTABLE_TENSORS_NAME} (written before checkpoints could change world size); "
            "resume with "
            f"{state.world_size} ranks"
        )
    if global_batch_size is not None and state.global_batch_size not in (None, global_batch_size):
        raise UsageError(
            f"--resume {path!r} was trained with a global batch of {state.global_batch_size}; this job's is "
            f"{global_batch_size}: keep it ({state.global_batch_size} = ranks x "
            "--per_device_train_batch_size x "
            f"--gradient_accumulation_steps), so that the steps and the data order continue"
        )
    return state


def load_checkpoint(engine, path: str) -> TrainerState:
    """Restore trainable parameters, optimizer, scheduler and this rank's RNG; return the position.

    DeepSpeed's own files when this job has the checkpoint's ranks and ZeRO stage, else the portable state;
    a rank the checkpoint did not have takes rank 0's RNG state."""
    state = read_state(path)
    world_size, rank = get_world_size_and_rank()
    same_shape = state.world_size == world_size and state.zero_stage in (
        None,
        engine.zero_optimization_stage(),
    )
    if same_shape:
        engine.load_checkpoint(
            os.path.join(path, "ds"),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    else:
        load_portable_state(engine, path)
    rng_file = os.path.join(path, f"rng_rank{rank}.safetensors")
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(path, "rng_rank0.safetensors")
    torch.set_rng_state(load_file(rng_file)["rng"])
    return state


def describe_reshape(state: TrainerState, world_size: int, stage: int) -> str | None:
    """``"2 ranks, ZeRO-2 -> 1 rank, ZeRO-3"`` when a checkpoint is loaded on another shape, else None."""
    if state.world_size == world_size and state.zero_stage in (None, stage):
        return None

    def shape(ranks, zero):
        return f"{ranks} rank{'s' if ranks != 1 else ''}, ZeRO-{zero if zero is not None else '?'}"

    return f"{shape(state.world_size, state.zero_stage)} -> {shape(world_size, stage)}"
