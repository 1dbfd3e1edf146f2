"""What the benchmarks measure with, shared by the scripts in bench/: FLOP and matmul-peak arithmetic,
memory and page-fault counters, chunked timings and their ratios, the model files of a preset, a step
clock and a filled DeepSpeed JSON. No contender and no command line here."""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from ds_loradrop.data.batching import IGNORE_INDEX
from ds_loradrop.data.tasks import get_task
from ds_loradrop.models.loading import load_causal_lm, load_model_config, load_tokenizer, resolve_model_path
from ds_loradrop.training.distributed import all_gather_object

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def non_embedding_matmul_parameters(model: torch.nn.Module) -> int:
    """Weights of every nn.Linear (attention, MLP and the LM head): the parameters a token multiplies."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_flops(rows: list[dict], matmul_parameters: int, num_layers: int, hidden_size: int) -> float:
    """Forward + backward FLOPs of LoRA training over ``rows`` (real tokens only).

    Frozen weights need no weight gradients: 2 FLOPs per parameter forward and 2 backward (activation
    gradients), i.e. 4 x matmul parameters per token. Causal attention adds per sequence of n tokens
    and layer 2 x 2 x hidden x n(n+1)/2 forward (QK^T and AV), times 3 with the backward.
    """
    total = 0.0
    for row in rows:
        n = len(row["input_ids"])
        total += 4.0 * matmul_parameters * n + 3 * num_layers * 4.0 * hidden_size * n * (n + 1) / 2
    return total


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 10) -> float:
    """Best FLOP/s of square matmuls in ``dtype`` with this process's threads (the best of several sizes
    and repeats: the machine's attainable peak, not a typical value)."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
    return max(all_gather_object(best))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclasses.dataclass
class ChunkTimings:
    """What a contender's timed chunks measured; ``chunk_seconds`` holds the slowest rank's per chunk."""

    chunk_seconds: list[float] = dataclasses.field(default_factory=list)
    target_tokens: int = 0
    steps: int = 0
    page_faults: int = 0

    @property
    def seconds(self) -> float:
        return sum(self.chunk_seconds)

    def record(self, rank_seconds: float, target_tokens: int, steps: int, page_faults: int) -> None:
        self.chunk_seconds.append(max(all_gather_object(rank_seconds)))
        self.target_tokens += target_tokens
        self.steps += steps
        self.page_faults += page_faults


def chunk_ratios(numerator: ChunkTimings, denominator: ChunkTimings) -> list[float]:
    """Seconds of ``numerator`` over ``denominator`` in each chunk (the same steps, back to back)."""
    return [a / b for a, b in zip(numerator.chunk_seconds, denominator.chunk_seconds, strict=True)]


def median_and_range(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    return (
        f"median of {len(values)} chunks {statistics.median(values) * scale:{fmt}}, "
        f"range {min(values) * scale:{fmt}}-{max(values) * scale:{fmt}}"
    )


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def target_tokens(rows: list[dict]) -> int:
    return sum(sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX) for row in rows)


def random_epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The peer's order of the rows in ``epoch``: a seeded shuffle, a new one every epoch."""
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def model_path(model: str) -> str:
    """A hub id / path, or a preset as training builds it (tiny-llama's tokenizer from E2E text)."""
    e2e_dir = os.path.join(REPO_ROOT, "..", "shared", "data", "e2e")
    return resolve_model_path(
        model, None, lambda max_examples: get_task("e2e").training_text(e2e_dir, max_examples)
    )


def load_model(args):
    path = model_path(args.model)
    return load_causal_lm(path, torch.float32), load_tokenizer(path)


class StepClock:
    """Seconds, useful and real tokens of the steps after the warm-up (this rank's share)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps, self.seconds, self.useful, self.real = warmup_steps, 0.0, 0, 0
        self._start = 0.0

    def begin(self) -> None:
        self._start = time.perf_counter()

    def end(self, step: int) -> None:
        if step > self.warmup_steps:
            self.seconds += time.perf_counter() - self._start

    def count(self, step: int, labels: torch.Tensor, real_tokens: int) -> None:
        if step > self.warmup_steps:
            self.useful += int((labels[..., 1:] != IGNORE_INDEX).sum())
            self.real += int(real_tokens)


def filled_ds_config(raw: dict, micro_batch_size: int, world_size: int, hidden_size: int) -> dict:
    """The DeepSpeed JSON with its "auto" values filled as launch/train.py and the HF Trainer fill them
    (micro-batch, no accumulation, clipping 1.0, fp32, reduce bucket hidden^2)."""
    config = copy.deepcopy(raw)
    config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=micro_batch_size * world_size,
        gradient_clipping=1.0,
    )
    for precision in ("bf16", "fp16"):
        if isinstance(config.get(precision), dict):
            config[precision]["enabled"] = False
    zero = config.setdefault("zero_optimization", {})
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    return config


def matmul_peak_flops(threads: int) -> float:
    """Best fp32 square-matmul FLOP/s with ``threads`` threads (one rank's attainable peak)."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for size in (1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        for _ in range(8):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
    return best


def flops_per_real_token(model: str) -> float:
    """Forward + backward FLOPs of LoRA training per token (no attention term): 4 x every nn.Linear's
    weights, LM head included (frozen weights need activation gradients, not weight gradients)."""
    import torch

    from ds_loradrop.models.loading import build_on_meta

    with torch.device("meta"):
        module = build_on_meta(load_model_config(model))
    return 4.0 * sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
