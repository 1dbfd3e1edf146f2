"""Rank helpers that also work in a single process without a process group.

Collectives go through ``torch.distributed`` (DeepSpeed's ``deepspeed.comm`` sits on the same
process group). Nothing here knows LoRA-drop.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on the loopback interface now (for MASTER_PORT of a job started on this machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size_and_rank() -> tuple[int, int]:
    if is_distributed():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def get_local_world_size() -> int:
    """Ranks on this machine: torchrun sets LOCAL_WORLD_SIZE, the DeepSpeed launcher LOCAL_SIZE."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def get_num_nodes() -> int:
    world_size, _ = get_world_size_and_rank()
    return max(1, world_size // get_local_world_size())


def is_rank_zero() -> bool:
    return get_world_size_and_rank()[1] == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned. float64 tensors are reduced as float64."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place and returned."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or is_rank_zero()


def confirm_same_everywhere(what: str, digest: str) -> None:
    """Every rank reports the digest of what it holds; any disagreement stops the run."""
    _, rank = get_world_size_and_rank()
    get_logger().info(f"rank {rank} holds {what} {digest}", extra={"all_ranks": True})
    digests = all_gather_object(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the {what}: {digests}")


def exit_process(status: int) -> None:
    """End this rank with exit status ``status``.

    While a process group is alive, interpreter finalisation can abort the process instead: gloo's C++
    worker threads still hold work objects (certain after a failed or timed-out collective), destroying
    them during finalisation needs the GIL, and the process dies of SIGABRT ("terminate called without
    an active exception") rather than with ``status``; seen in about one run in three. So with a live
    process group the streams and logs are flushed and the process ends at once (``os._exit``);
    without one, ``sys.exit`` ends it normally.
    """
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def get_logger(name: str = "ds_loradrop") -> logging.Logger:
    """A logger that prints on rank 0 only, unless called with ``extra={"all_ranks": True}``."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.addFilter(_RankZeroFilter())
        handler.setFormatter(_RankFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class _RankFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        _, rank = get_world_size_and_rank()
        return f"[ds_loradrop rank{rank}] {record.getMessage()}"
