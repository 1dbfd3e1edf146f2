"""The optimisation loop of one stage over a DeepSpeed engine.

Loss normalisation: each optimizer step's loss is the mean over the target tokens of the *whole*
global batch (all micro-batches of all ranks). Per micro-batch we backpropagate
``token_loss_sum * world_size * accumulation / global_target_tokens``: DeepSpeed divides by the
accumulation steps and averages gradients over ranks, which leaves exactly
``sum of token losses / global_target_tokens``, the same gradient however the batch is split.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ds_loradrop.data.batching import IGNORE_INDEX, collate, global_batches, pack, rank_micro_batches
from ds_loradrop.errors import TrainingDiverged, pending_signal, stop_at_step_boundary
from ds_loradrop.training.distributed import (
    all_reduce_max,
    all_reduce_sum,
    get_logger,
    get_world_size_and_rank,
)
from ds_loradrop.training.ds_config import BatchSettings

logger = get_logger()


@dataclass
class StageResult:
    name: str
    num_steps: int = 0
    first_step: int = 0  # steps done before this call (a resumed stage)
    num_target_tokens: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)
    val_loss: float | None = None  # on held-out examples at the stage's end
    precision: dict = field(default_factory=dict)  # engine.describe_precision at the stage's end

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else math.nan


def num_positions_to_score(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: from the one before the first labelled token of any row
    to the end. The LM head (49,152 x 576 in SmolLM2, a fifth of its matmul FLOPs) then skips the prompt
    positions that precede every target; the loss is unchanged. labels (b, s)."""
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    if labelled.numel() == 0:
        return labels.shape[1]
    return labels.shape[1] - int(labelled[0])  # position p predicts label p + 1


@functools.cache
def _forward_parameters(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """transformers' causal LMs take ``logits_to_keep`` (trailing positions to compute logits for)."""
    return "logits_to_keep" in _forward_parameters(type(model))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled positions. logits (b, s, V), labels (b, s)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@dataclass(frozen=True)
class Step:
    """One finished optimizer step: its number (from 1), its loss, and what was logged for it (loss, learning
    rate, gradient norm, target tokens per second) when it is a ``logging_steps`` step, else None."""

    number: int
    loss: float
    logged: dict[str, float] | None = None


class StageSteps:
    """The optimizer steps of one stage, as an iterator the recipe drives::

        with StageSteps(engine, examples, batch, name="stage2", num_steps=100, ...) as steps:
            for step in steps:      # forward, backward and optimizer step happen here
                ...                 # the recipe's work after each step: log, evaluate, checkpoint, stop
        steps.result                # StageResult: steps, losses, target tokens, seconds

    Leaving the ``with`` block (also by an exception) closes the progress bar at once.

    Epochs of seeded global batches over ``examples``; ``start_step`` resumes after that many steps (their
    global batches are skipped, not recomputed). ``before_forward(step, micro_batch)`` runs before each
    micro-batch's forward (the one hook inside a step, e.g. to record importance). Every step's work happens
    with SIGTERM / SIGINT held to the step boundary (``stop_requested_on_any_rank`` tells the recipe). The
    engine is back in training mode at the start of every step, whatever the recipe did after the last.

    Raises:
        TrainingDiverged: the loss of a step is NaN or infinite (before that step is yielded, so it is never
            checkpointed).
    """

    def __init__(
        self,
        engine,
        examples: list[dict],
        batch: BatchSettings,
        *,
        name: str,
        num_steps: int,
        seed: int,
        pad_token_id: int,
        logging_steps: int,
        device: torch.device,
        group_by_length: bool = True,
        padding_free: bool = False,
        before_forward: Callable[[int, dict], None] | None = None,
        start_step: int = 0,
    ):
        self.engine, self.examples, self.batch = engine, examples, batch
        self.name, self.num_steps, self.seed, self.start_step = name, num_steps, seed, start_step
        self.pad_token_id, self.logging_steps, self.device = pad_token_id, logging_steps, device
        self.group_by_length, self.padding_free, self.before_forward = (
            group_by_length,
            padding_free,
            before_forward,
        )
        self.result = StageResult(name, num_steps=start_step, first_step=start_step)
        self._running: Iterator[Step] | None = None

    def __enter__(self) -> StageSteps:  # noqa: PYI034 - not subclassed
        return self

    def __exit__(self, *exc_info) -> None:
        if self._running is not None:
            self._running.close()

    def __iter__(self) -> Iterator[Step]:
        self._running = self._steps()
        return self._running

    def _steps(self) -> Iterator[Step]:
        world_size, rank = get_world_size_and_rank()
        result, num_steps = self.result, self.num_steps
        start = window_start = time.perf_counter()
        window_tokens = 0
        lengths = [len(example["input_ids"]) for example in self.examples]
        schedule = _global_batch_schedule(
            lengths, self.batch.global_batch_size, self.seed, self.group_by_length
        )
        # The bar is closed however the loop ends, so an error message starts on a line of its own.
        with (
            tqdm(
                total=num_steps,
                initial=self.start_step,
                desc=self.name,
                disable=rank != 0,
                dynamic_ncols=True,
                mininterval=2.0,
            ) as progress,
            stop_at_step_boundary(),
        ):
            for global_batch in itertools.islice(schedule, self.start_step, num_steps):
                self.engine.train()
                micro_batches = [
                    pack([self.examples[i] for i in indices])
                    if self.padding_free
                    else collate([self.examples[i] for i in indices], self.pad_token_id)
                    for indices in rank_micro_batches(
                        global_batch, rank, world_size, self.batch.micro_batch_size
                    )
                ]
                hook = self.before_forward
                loss, global_tokens = optimizer_step(
                    self.engine,
                    micro_batches,
                    self.batch,
                    self.device,
                    None if hook is None else functools.partial(hook, result.num_steps + 1),
                )
                result.num_steps += 1
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"{self.name} step {result.num_steps}/{num_steps}: the loss is {loss}; stopping "
                        "before this step is checkpointed (earlier checkpoints are kept; try a lower "
                        "--learning_rate)"
                    )
                result.num_target_tokens += int(global_tokens)
                window_tokens += int(global_tokens)
                result.losses.append((result.num_steps, loss))
                progress.update(1)
                logged = None
                if result.num_steps % self.logging_steps == 0 or result.num_steps == num_steps:
                    now = time.perf_counter()
                    logged = self._logged(loss, window_tokens / (now - window_start))
                    progress.set_postfix(
                        loss=f"{loss:.4f}", tok_s=f"{logged['target_tokens_per_second']:.0f}"
                    )
                    window_start, window_tokens = now, 0
                result.seconds = time.perf_counter() - start
                yield Step(result.num_steps, loss, logged)
        result.seconds = time.perf_counter() - start

    def _logged(self, loss: float, tokens_per_second: float) -> dict[str, float]:
        metrics = {
            "loss": loss,
            "learning_rate": self.engine.get_lr()[0],
            "target_tokens_per_second": tokens_per_second,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        logger.info(
            f"{self.name} step {self.result.num_steps}/{self.num_steps} loss {loss:.4f} "
            f"lr {metrics['learning_rate']:.2e} target tokens/s {tokens_per_second:.0f}"
        )
        return metrics


def train_stage(engine, examples: list[dict], batch: BatchSettings, **options) -> StageResult:
    """All the steps of :class:`StageSteps` with nothing done between them (benchmarks, tests)."""
    with StageSteps(engine, examples, batch, **options) as steps:
        for _ in steps:
            pass
    return steps.result


def _global_batch_schedule(lengths: list[int], global_batch_size: int, seed: int, group_by_length: bool):
    """Every optimizer step's global batch, epoch after epoch, without end."""
    for epoch in itertools.count():
        yield from global_batches(lengths, global_batch_size, seed, epoch, group_by_length)


def optimizer_step(
    engine,
    micro_batches: list[dict],
    batch: BatchSettings,
    device: torch.device,
    before_forward: Callable[[dict], None] | None = None,
) -> tuple[float, float]:
    """Forward and backward over this rank's micro-batches and one optimizer step.

    Returns:
        (mean loss over the target tokens of the whole global batch, those target tokens), equal on
        every rank.
    """
    world_size, _ = get_world_size_and_rank()
    local_tokens = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
    global_tokens = float(
        all_reduce_sum(torch.tensor([float(local_tokens)], dtype=torch.float64, device=device))
    )
    scale = world_size * batch.gradient_accumulation_steps / global_tokens
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for micro_batch in micro_batches:
        if before_forward is not None:
            before_forward(micro_batch)
        summed = micro_batch_loss_sum(engine, micro_batch, device)
        engine.backward(summed * scale)
        engine.step()
        loss_sum += summed.detach().double()
    return float(all_reduce_sum(loss_sum)) / global_tokens, global_tokens


def micro_batch_loss_sum(engine, micro_batch: dict, device: torch.device) -> torch.Tensor:
    """Summed next-token cross-entropy of one micro-batch, with LM-head logits only where they are needed.

    Padded rows (:func:`collate`): the trailing positions from the first labelled one of any row.
    A packed row (:func:`pack`, it has ``position_ids``): exactly the positions that predict a target
    token, so no prompt or padding position goes through the LM head at all.
    """
    labels = micro_batch["labels"].to(device)
    input_ids = micro_batch["input_ids"].to(device)
    trims = accepts_logits_to_keep(engine.module)
    if "position_ids" in micro_batch:
        position_ids = micro_batch["position_ids"].to(device)
        if not trims:
            output = engine(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            return token_loss_sum(output.logits, labels)
        scored = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
        # use_cache=False: with a cache transformers does not read packed position ids as boundaries
        output = engine(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=scored
        )
        return F.cross_entropy(output.logits[0].float(), labels[0, scored + 1], reduction="sum")
    keep = num_positions_to_score(labels) if trims else labels.shape[1]
    output = engine(
        input_ids=input_ids,
        attention_mask=micro_batch["attention_mask"].to(device),
        **({"logits_to_keep": keep} if keep < labels.shape[1] else {}),
    )
    return token_loss_sum(output.logits, labels[:, labels.shape[1] - keep :])


def stop_requested_on_any_rank(device: torch.device) -> int:
    """The largest signal number any rank has recorded (0: none), the same on every rank."""
    flag = torch.tensor([float(pending_signal() or 0)], dtype=torch.float64, device=device)
    return int(all_reduce_max(flag))
