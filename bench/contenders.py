"""The training loops the benchmarks time against each other, each behind the same small interface:
``peer`` (PEFT and a plain PyTorch loop) and ``ours`` (ds-loradrop's trainer on a DeepSpeed engine, also
after a LoRA-drop plan and padding-free), plus the runners bench/trainer_peers.py starts them with.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from harness import ChunkTimings, minor_page_faults, random_epoch_order, target_tokens

from ds_loradrop.data.batching import collate, tokenize_examples
from ds_loradrop.data.tasks import get_task
from ds_loradrop.method.importance import ImportanceRecorder
from ds_loradrop.method.placement import (
    attach_own_adapters,
    attach_planned_adapters,
    freeze_all_but_adapters,
    inject_lora,
)
from ds_loradrop.method.plan import build_plan
from ds_loradrop.method.probe import measure_importance
from ds_loradrop.models.loading import TINY_LLAMA, load_tokenizer, resolve_model_path
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import get_world_size_and_rank
from ds_loradrop.training.ds_config import BatchSettings
from ds_loradrop.training.loop import train_stage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DEFAULT_MAX_SEQ_LENGTH = {"e2e": 128, "dart": 128, "dialogsum": 384, "gsm8k": 384}


TARGETS = ["q_proj", "v_proj"]


def build_model(args, vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=1024,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


class PeerContender:
    """PEFT LoRA and a plain PyTorch loop (DDP on several ranks): random batches padded to their longest."""

    def __init__(self, args, model, pad_token_id: int):
        from peft import LoraConfig, get_peft_model

        world_size, self.rank = get_world_size_and_rank()
        self.model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_r,
                lora_alpha=2 * args.lora_r,
                lora_dropout=0.0,
                target_modules=TARGETS,
                task_type="CAUSAL_LM",
            ),
        )
        self.trained = torch.nn.parallel.DistributedDataParallel(self.model) if world_size > 1 else self.model
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=args.learning_rate
        )
        self.args, self.pad_token_id = args, pad_token_id
        self.per_rank = args.global_batch_size // world_size
        self.timings = ChunkTimings()

    def train(self, rows: list[dict], first_step: int, last_step: int, timed: bool = True) -> None:
        """Steps ``first_step + 1 .. last_step`` over ``rows``: epochs of the rows in a seeded random order
        (:func:`random_epoch_order`), each cut into global batches (an incomplete last one is dropped)."""
        size = self.args.global_batch_size
        steps_per_epoch = len(rows) // size
        self.trained.train()
        faults_before, num_target_tokens = minor_page_faults(), 0
        start = time.perf_counter()
        orders: dict[int, list[int]] = {}
        for step in range(first_step, last_step):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders[epoch] = random_epoch_order(len(rows), self.args.seed, epoch)
            global_batch = orders[epoch][index * size : (index + 1) * size]
            mine = global_batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
            batch = collate([rows[i] for i in mine], self.pad_token_id)
            loss = self.trained(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if timed:
                num_target_tokens += target_tokens([rows[i] for i in global_batch])
        if timed:
            self.timings.record(
                time.perf_counter() - start,
                num_target_tokens,
                last_step - first_step,
                minor_page_faults() - faults_before,
            )


def _batch_settings(args) -> BatchSettings:
    world_size, _ = get_world_size_and_rank()
    return BatchSettings(
        micro_batch_size=args.global_batch_size // world_size,
        gradient_accumulation_steps=1,
        world_size=world_size,
        max_grad_norm=1.0,
    )


def _ds_config(batch: BatchSettings) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch.global_batch_size,
        "gradient_clipping": batch.max_grad_norm,
        "zero_optimization": {"stage": 2 if batch.world_size > 1 else 0},
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


class OursContender:
    """ds-loradrop's trainer (``train_stage`` on a DeepSpeed engine) over a fresh copy of the model."""

    def __init__(
        self,
        args,
        model,
        attach,
        pad_token_id: int,
        record_importance: bool = False,
        ds_config: dict | None = None,
        padding_free: bool = False,
    ):
        self.layout = inject_lora(model, TARGETS)
        torch.manual_seed(args.seed)
        attach(self.layout)
        freeze_all_but_adapters(model)
        self.batch = _batch_settings(args)
        self.engine = ds_engine.build_engine(
            model,
            ds_config or _ds_config(self.batch),
            learning_rate=args.learning_rate,
            weight_decay=0.0,
            lr_scheduler="constant_with_warmup",
            num_warmup_steps=0,
            num_training_steps=args.warmup_steps + args.steps,
        )
        self.common = {
            "name": "bench",
            "seed": args.seed,
            "pad_token_id": pad_token_id,
            "logging_steps": 10**9,
            "device": ds_engine.local_device(),
            "padding_free": padding_free,
        }
        self.timings = ChunkTimings()
        # --importance_pass last_epoch: the importance recorder watches every training forward
        self.recorder = ImportanceRecorder(self.layout) if record_importance else None

    def train(self, rows: list[dict], first_step: int, last_step: int, timed: bool = True) -> None:
        """Steps ``first_step + 1 .. last_step`` of one epoch over ``rows``."""
        recorder = self.recorder
        faults_before = minor_page_faults()
        with recorder.recording() if recorder is not None else contextlib.nullcontext():
            result = train_stage(
                self.engine,
                rows,
                self.batch,
                num_steps=last_step,
                start_step=first_step,
                **self.common,
                before_forward=None
                if recorder is None
                else lambda _, mb: recorder.set_token_mask(mb["attention_mask"]),
            )
        if timed:
            self.timings.record(
                result.seconds,
                result.num_target_tokens,
                last_step - first_step,
                minor_page_faults() - faults_before,
            )


def plan_from(contender: OursContender, rows: list[dict], pad_token_id: int, seed: int):
    """A LoRA-drop plan (T = 0.9, output norm, shared) from the importance of ``contender``'s adapters
    over ``rows``."""
    sums, num_tokens = measure_importance(
        contender.engine,
        contender.layout,
        rows,
        batch_size=contender.batch.micro_batch_size,
        pad_token_id=pad_token_id,
        device=ds_engine.local_device(),
    )
    return build_plan(
        sums,
        num_tokens,
        threshold=0.9,
        selection="output_norm",
        low_importance="share",
        seed=seed,
        sample_ratio=1.0,
        num_sampled=len(rows),
        world_size=get_world_size_and_rank()[0],
    )


def prepare_rows(args) -> tuple[object, list[dict], list[dict]]:
    """(tokenizer, warm-up rows, timed rows): real training examples of the task, tokenised with the
    tiny-llama preset's tokenizer. The same examples go to every contender."""
    task = get_task(args.task)
    data_dir = args.data_dir or os.path.join(REPO_ROOT, "..", "shared", "data", args.task)
    e2e_dir = os.path.join(REPO_ROOT, "..", "shared", "data", "e2e")
    # The preset as training builds it (on rank 0, shared with every rank): only its tokenizer is used.
    preset = resolve_model_path(
        TINY_LLAMA, None, lambda max_examples: get_task("e2e").training_text(e2e_dir, max_examples)
    )
    tokenizer = load_tokenizer(preset)
    num_timed, num_warmup = args.steps * args.global_batch_size, args.warmup_steps * args.global_batch_size
    examples = task.load_train(data_dir, num_timed + num_warmup)
    tokenized, _ = tokenize_examples(
        examples, tokenizer, args.max_seq_length or DEFAULT_MAX_SEQ_LENGTH[args.task]
    )
    rows = tokenized.to_list()
    return tokenizer, rows[num_timed:], rows[:num_timed]


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
    from harness import load_model

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
    from harness import load_model

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
