"""bench/trainer_peers.py's ``ours`` (with ``ours_loradrop``) and ``peer_loop`` contenders, built from
bench/train_throughput.py's contender classes over a real model."""

from __future__ import annotations

import argparse
import contextlib
import gc

from train_throughput import OursContender, PeerContender, plan_from

from ds_loradrop.method.placement import attach_own_adapters, attach_planned_adapters
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import get_world_size_and_rank

# ours' contenders in the order they alternate (the names trainer_peers --alone takes)
OURS = ("ours", "ours_loradrop", "ours_padding_free")


class Totals:
    """What trainer_peers.main reads of a contender: this rank's seconds, useful and real tokens."""

    def __init__(self, seconds: float, useful: int, real: int):
        self.seconds, self.useful, self.real = seconds, useful, real


@contextlib.contextmanager
def profiled(enabled: bool):
    if not enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        yield profiler


def epoch_real_tokens(rows: list[dict]) -> int:
    """Real tokens of one epoch over ``rows``: what every contender's timed steps hold (trainer_peers
    times exactly one whole epoch)."""
    return sum(len(r["input_ids"]) for r in rows)


def run_ours(args, rows: list[dict], ds_config: dict, pad_token_id: int) -> dict:
    """LoRA, LoRA-drop (its plan from the importance of LoRA's adapters after the warm-up) and LoRA
    padding-free, alternating every ``--chunk_steps`` steps; with ``--alone NAME`` only that one, so that the
    process's peak memory is that of one run (LoRA-drop's still includes the warm-up of the LoRA run its plan
    comes from, whose engine is destroyed and freed before LoRA-drop is built)."""
    from trainer_peers import load_model

    warmup, total = args.warmup_steps, args.warmup_steps + args.steps
    alone = getattr(args, "alone", None)
    wanted = {alone} if alone else set(OURS)
    model, _ = load_model(args)
    # Interleaved, every contender starts from the same weights; alone, the one model load is the start.
    initial = {k: v.clone() for k, v in model.state_dict().items()} if not alone else None
    # OursContender sizes its learning-rate schedule from warm-up + steps: all of them here
    args = argparse.Namespace(**{**vars(args), "steps": total, "warmup_steps": 0})

    def fresh():
        fresh_model, _ = load_model(args)
        if initial is not None:
            fresh_model.load_state_dict(initial)
        return fresh_model

    def own(base, padding_free=False):
        return OursContender(
            args,
            base,
            lambda lay: attach_own_adapters(lay, args.lora_r, 2 * args.lora_r, 0.0),
            pad_token_id,
            ds_config=ds_config,
            padding_free=padding_free,
        )

    named = []
    if wanted & {"ours", "ours_loradrop"}:
        lora = own(model)
        lora.train(rows, 0, warmup, timed=False)
        if "ours" in wanted:
            named.append(("ours", lora))
        if "ours_loradrop" in wanted:
            plan = plan_from(lora, rows, pad_token_id, args.seed)
            if "ours" not in wanted:
                ds_engine.destroy_engine(lora.engine)  # as launch/train.py does between its stages
                del lora, model
                gc.collect()
            loradrop = OursContender(
                args,
                fresh(),
                lambda lay: attach_planned_adapters(lay, plan, args.lora_r, 2 * args.lora_r, 0.0),
                pad_token_id,
                ds_config=ds_config,
            )
            loradrop.train(rows, 0, warmup, timed=False)
            named.append(("ours_loradrop", loradrop))
    if "ours_padding_free" in wanted:
        packed = own(fresh() if named else model, padding_free=True)
        packed.train(rows, 0, warmup, timed=False)
        named.append(("ours_padding_free", packed))
    with profiled(args.profile) as profiler:
        for first in range(warmup, total, args.chunk_steps):
            for _, contender in named:
                contender.train(rows, first, min(first + args.chunk_steps, total))
    if profiler is not None and get_world_size_and_rank()[1] == 0:
        print(f"## top operators by self CPU time, rank 0, the timed steps of {[n for n, _ in named]}")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    real = epoch_real_tokens(rows)
    _, rank = get_world_size_and_rank()
    return {
        name: Totals(c.timings.seconds, c.timings.target_tokens if rank == 0 else 0, real if rank == 0 else 0)
        for name, c in named
    }


def run_peer_loop(args, rows: list[dict], ds_config: dict, pad_token_id: int) -> dict:
    from trainer_peers import load_model

    del ds_config  # the plain loop has no DeepSpeed (DDP on several ranks)
    warmup, total = args.warmup_steps, args.warmup_steps + args.steps
    model, _ = load_model(args)
    peer = PeerContender(args, model, pad_token_id)
    peer.train(rows, 0, warmup, timed=False)
    peer.train(rows, warmup, total)
    real = epoch_real_tokens(rows)
    _, rank = get_world_size_and_rank()
    return {
        "peer_loop": Totals(
            peer.timings.seconds, peer.timings.target_tokens if rank == 0 else 0, real if rank == 0 else 0
        )
    }
