"""Everything that touches DeepSpeed, wrapped once. Knows nothing of LoRA-drop.

- :func:`init_distributed`: one process group for ``deepspeed``, ``torchrun`` and plain ``python``;
  on CPU ranks it also unlinks DeepSpeed's shared-memory all-reduce buffers once every rank has mapped them.
- :func:`zero3_weight_loading`: keeps an ``HfDeepSpeedConfig`` alive so that
  ``from_pretrained`` loads weights straight into ZeRO-3 partitions.
- :func:`build_engine`: ``deepspeed.initialize`` with our optimizer and LR schedule.
- :func:`gathered_parameters`: full parameters on every rank for a block (ZeRO-3), else a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass


def _import_deepspeed():
    """``import deepspeed`` with MLflow hidden: DeepSpeed's autotuner (unused here) imports MLflow when it
    is installed, 1.5-3 s of every rank's start-up on this machine. Only the global rank 0 tracks, and it
    imports MLflow itself when it does (tests/test_startup_imports.py keeps the other ranks free of it)."""
    if "mlflow" in sys.modules:  # a process that already tracks: nothing to save
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # meanwhile `import mlflow` raises ImportError, as if not installed
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


deepspeed = _import_deepspeed()

import torch
from deepspeed.accelerator import get_accelerator
from transformers.integrations import HfDeepSpeedConfig

from ds_loradrop.errors import UsageError
from ds_loradrop.training.distributed import (
    barrier,
    free_port,
    get_local_world_size,
    get_logger,
    get_world_size_and_rank,
)
from ds_loradrop.training.ds_config import zero_stage
from ds_loradrop.training.lr_schedule import warmup_schedule

# torch's gloo default is 30 minutes; a dead or stuck peer should fail the job sooner.
DEFAULT_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def init_distributed(timeout: datetime.timedelta = DEFAULT_COLLECTIVE_TIMEOUT) -> None:
    """Initialise the process group; a plain ``python`` start becomes a world of one rank.

    ``timeout`` bounds every collective: a peer that stops answering fails the job after it.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        deepspeed.init_distributed(timeout=timeout, verbose=False)
    except torch.distributed.DistNetworkError as error:  # rank 0 could not open the rendezvous store
        if "EADDRINUSE" not in str(error):
            raise
        address = f"{os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')}"
        raise UsageError(
            f"the rendezvous port {address} is in use (another job on this machine?): launch with another "
            "--master_port"
        ) from None
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return
    release_shm_allreduce_buffer()
    if "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores; torch's default of one thread per core in every
        # rank oversubscribes them (measured: ZeRO-2 on 2 ranks x 2 cores ran 4x slower).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // get_local_world_size()))


SHM_DIR = "/dev/shm"


def shm_allreduce_buffer_path(master_addr: str, master_port: str, rank: int | str) -> str:
    """Where DeepSpeed's CPU all-reduce puts ``rank``'s buffer for a job (csrc/cpu/comm/shm.cpp names it)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"
    return os.path.join(SHM_DIR, name)


def release_shm_allreduce_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer once every rank has mapped it.

    When all ranks of a job are on one machine, DeepSpeed's CPU communication backend has each rank
    create a 66 MB buffer in ``/dev/shm`` and map every peer's, and never unlinks them. ``/dev/shm`` is
    memory, so every finished (or killed) job left 66 MB per rank behind: a test suite's 2-rank launches
    filled a 24 GiB machine and the kernel killed a rank (seen in CI: a rank died with -9 mid-step). The
    buffers are all mapped by the end of ``deepspeed.init_distributed``; after a barrier the names are no
    longer needed, and the memory is freed when the last rank holding a mapping exits, however it exits.
    Call on every rank (a barrier); processes whose process group another library started (accelerate)
    call it themselves.
    """
    barrier()
    _, rank = get_world_size_and_rank()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    path = shm_allreduce_buffer_path(addr, port, rank)
    with contextlib.suppress(FileNotFoundError):  # not created: ranks on several machines, or one rank
        os.unlink(path)


def local_device() -> torch.device:
    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def model_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the DeepSpeed config trains in (bf16, fp16 or fp32)."""
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def accelerator_has_native_bf16() -> bool:
    """bf16 where the accelerator has bf16 matmul units. The CPU accelerator reports bf16 support,
    but on CPUs without AMX bf16 matmuls are emulated and slower than fp32, so "auto" means fp32 there."""
    accelerator = get_accelerator()
    return accelerator.device_name() != "cpu" and accelerator.is_bf16_supported()


def zero3_weight_loading(ds_config: dict) -> HfDeepSpeedConfig | None:
    """Under ZeRO-3, the object whose lifetime makes ``from_pretrained`` load partitioned.

    Keep the returned object referenced for as long as the model lives (transformers holds it only
    weakly). Returns None for ZeRO stages 0-2.
    """
    if zero_stage(ds_config) != 3:
        return None
    return HfDeepSpeedConfig(ds_config)


def _uses_cpu_offload(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") == "cpu"


def build_engine(
    model: torch.nn.Module,
    ds_config: dict,
    *,
    learning_rate: float,
    weight_decay: float,
    lr_scheduler: str,
    num_warmup_steps: int,
    num_training_steps: int,
):
    """``deepspeed.initialize`` over the model's trainable parameters.

    AdamW is ours (DeepSpeed's CPU Adam when the optimizer state is offloaded to the CPU), unless the
    JSON has an ``optimizer`` section; the LR schedule is always ours (transformers' schedules, in
    ``lr_schedule.py``).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]

    def make_optimizer(params):
        if _uses_cpu_offload(ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=learning_rate, weight_decay=weight_decay, adamw_mode=True)
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)

    def make_scheduler(optimizer):
        return warmup_schedule(optimizer, lr_scheduler, num_warmup_steps, num_training_steps)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=None if "optimizer" in ds_config else make_optimizer,
        lr_scheduler=make_scheduler,
        config=ds_config,
    )
    return engine


def describe_precision(engine) -> dict[str, str]:
    """The dtypes a training engine holds, after its first optimizer step (Adam's moments exist from then):

    - ``frozen``: the module's frozen weights (the base model), what the forward computes in;
    - ``trainable``: the trainable parameters as the module holds them (cast with the module under bf16);
    - ``master_weights``: the copy the optimizer updates (ZeRO keeps an fp32 partition of it under bf16);
    - ``optimizer_state``: Adam's first and second moments.

    Several dtypes in one role are joined with ``+``; a role with no tensor is ``"none"``.
    """

    def names(tensors) -> str:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
        return "+".join(dtypes) or "none"

    params = list(engine.module.parameters())
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)  # ZeRO wraps the torch optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3 hands them to the optimizer only per step
        master = list(zero.fp32_partitioned_groups_flat)
    elif hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        master = list(zero.single_partition_of_fp32_groups)
    else:
        master = [p for group in inner.param_groups for p in group["params"]]
    moments = [
        value
        for state in inner.state.values()
        for key, value in state.items()
        if key in ("exp_avg", "exp_avg_sq") and torch.is_tensor(value)
    ]
    return {
        "frozen": names(p for p in params if not p.requires_grad),
        "trainable": names(p for p in params if p.requires_grad),
        "master_weights": names(master),
        "optimizer_state": names(moments),
    }


def destroy_engine(engine) -> None:
    """Remove the engine's hooks so the process can build another one (stage 2)."""
    engine.destroy()


def shutdown_distributed() -> None:
    """Destroy the process group (DeepSpeed's references to it included) while the interpreter is fully
    alive. Without it, gloo's C++ worker threads still hold work objects with tensors at interpreter
    exit; destroying them during finalisation needs the GIL and aborts the process ("terminate called
    without an active exception", SIGABRT), so a finished job could exit as failed. Call on every rank
    after the last collective, on the success path only: after a failure a peer may still be inside a
    collective, and tearing down then can hang (torchtitan does the same)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        get_logger().info("destroying the process group", extra={"all_ranks": True})
        deepspeed.comm.destroy_process_group()


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered_parameters(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None):
    """Full values of ZeRO-3 partitioned ``params`` on every rank inside the block.

    Must be entered on every rank. With ``modifier_rank`` set, that rank's in-block writes are
    partitioned back on exit. A no-op for parameters that are not partitioned.
    """
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@dataclass(frozen=True)
class Partitioning:
    """How much of a model this rank holds."""

    partitioned: int  # parameter tensors split across ranks
    tensors: int  # parameter tensors in all
    local_elements: int  # elements held by this rank
    elements: int  # elements in all


def describe_partitioning(model: torch.nn.Module) -> Partitioning:
    params = list(model.parameters())
    partitioned = [p for p in params if is_partitioned(p) and p.numel() < p.ds_numel]
    local = sum(int(getattr(p, "ds_tensor", p).numel()) for p in params)
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    return Partitioning(len(partitioned), len(params), local, total)


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's full state dict on rank 0 (ZeRO-3: gathered from partitions; call on every rank)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {name: tensor.detach().cpu() for name, tensor in engine.module.state_dict().items()}


@contextlib.contextmanager
def full_weights_for_generation(engine):
    """The engine's module with its full weights on every rank and ZeRO-3's hooks lifted for the block,
    so ``generate`` runs without per-token collectives; a no-op below ZeRO-3. Enter on every rank."""
    if engine.zero_optimization_stage() != 3:
        yield engine.module
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine) as unwrapped:
        yield unwrapped.module


def full_model_fits(model: torch.nn.Module, share: float = 0.5) -> bool:
    """Whether every rank on this machine can hold the full weights within ``share`` of free memory."""
    params = list(model.parameters())
    full_bytes = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in params)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        import psutil

        free = psutil.virtual_memory().available / get_local_world_size()
    else:
        free = accelerator.available_memory(int(os.environ.get("LOCAL_RANK", "0")))
    return full_bytes <= share * free


def build_inference_engine(model: torch.nn.Module, ds_config: dict):
    """A DeepSpeed engine without optimizer (ZeRO-3: partitioned weights and fetch hooks only).

    ZeRO stages 1 and 2 partition only optimizer state and gradients, which an engine without optimizer
    does not have (DeepSpeed refuses them without one): the weights are whole on every rank, as under stage 0.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if zero_stage(ds_config) in (1, 2):
        ds_config = {**ds_config, "zero_optimization": {**ds_config["zero_optimization"], "stage": 0}}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    return engine


def module_for_gradients_of_non_parameters(engine) -> torch.nn.Module:
    """The engine's module, to differentiate with respect to tensors that are not parameters (SNIP's gates)
    through a plain ``loss.backward()``: ZeRO-3's hooks on the module still gather the frozen weights for
    forward and backward; the engine's own forward would add output hooks that only ``engine.backward``
    (which needs an optimizer) may pass."""
    return engine.module


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured) of this process's peak memory so far: ``max_memory_allocated`` on a
    GPU, the peak resident set size (RSS) on the CPU accelerator."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak_rss"  # Linux reports KiB
