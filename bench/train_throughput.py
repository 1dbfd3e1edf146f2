"""Training throughput: ds-loradrop's trainer against a PEFT LoRA peer on the same model, data and work.

    python bench/train_throughput.py --task e2e                        # one process
    torchrun --nproc_per_node 2 bench/train_throughput.py --task e2e   # two ranks

Both contenders train the same Llama shape (8 layers, hidden 512, MLP 1792: ~30M non-embedding
parameters; vocabulary of the tiny-llama preset's tokenizer) from the same initial weights, with LoRA
r=8 on q_proj and v_proj, fp32, AdamW, the same global batches' worth of real training examples of the
task, in the same process(es): each warms up untimed, then all are timed in alternating chunks of steps
over the same rows (drifts of a shared machine hit them alike):

- ``peer``: PEFT ``get_peft_model`` and a plain PyTorch loop (``DistributedDataParallel`` on two ranks),
  random batches padded to their longest sequence, the model's own loss;
- ``ours``: ds-loradrop's ``train_stage`` on a DeepSpeed engine (ZeRO-2 on two ranks, ZeRO-0 on one):
  length-grouped global batches, loss over target tokens only;
- ``ours_loradrop``: the same trainer after a LoRA-drop plan made from the importance measured on the
  ``ours`` adapters (threshold 0.9: retained layers keep their adapter, the others share one);
- ``ours_recording_importance``: ``ours`` with the importance recorder on (``--importance_pass last_epoch``).

Minor page faults per step are counted for each (the host memory a step touches afresh).

Printed: useful (non-padding target) tokens per second for each and the ratios, the achieved FLOP/s
against the matmul peak this script measures on the same machine and dtype, the importance pass as a
share of a 3-epoch stage 1 over the same rows, and the peak resident memory per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from ds_loradrop.data.batching import IGNORE_INDEX, collate, tokenize_examples
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
from ds_loradrop.training.distributed import all_gather_object, get_world_size_and_rank, is_rank_zero
from ds_loradrop.training.ds_config import BatchSettings
from ds_loradrop.training.loop import train_stage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MAX_SEQ_LENGTH = {"e2e": 128, "dart": 128, "dialogsum": 384, "gsm8k": 384}
TARGETS = ["q_proj", "v_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="e2e", choices=sorted(DEFAULT_MAX_SEQ_LENGTH))
    parser.add_argument("--data_dir", default=None, help="default: ../shared/data/<task>")
    parser.add_argument("--global_batch_size", type=int, default=16)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per contender")
    parser.add_argument(
        "--chunk_steps",
        type=int,
        default=2,
        help="contenders alternate every this many timed steps (small: drifts of a shared "
        "machine hit them alike)",
    )
    parser.add_argument("--max_seq_length", type=int, default=None)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--intermediate_size", type=int, default=1792)
    parser.add_argument("--num_layers", type=int, default=8)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file (rank 0)")
    args = parser.parse_args(argv)
    if args.chunk_steps < 1:
        parser.error(f"--chunk_steps must be >= 1, got {args.chunk_steps}")
    return args


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


def main(args) -> dict:
    ds_engine.init_distributed()
    world_size, _ = get_world_size_and_rank()
    tokenizer, warmup_rows, timed_rows = prepare_rows(args)
    pad_token_id = tokenizer.pad_token_id
    max_seq_length = args.max_seq_length or DEFAULT_MAX_SEQ_LENGTH[args.task]

    results = {
        "task": args.task,
        "world_size": world_size,
        "threads_per_rank": torch.get_num_threads(),
        "global_batch_size": args.global_batch_size,
        "steps": args.steps,
        "max_seq_length": max_seq_length,
    }
    peak_before = matmul_peak(torch.float32)

    model = build_model(args, len(tokenizer))
    matmul_params = non_embedding_matmul_parameters(model)
    results["non_embedding_parameters"] = sum(
        p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name
    )
    initial = {name: value.clone() for name, value in model.state_dict().items()}

    # Every contender starts from the same weights, warms up untimed, then all are timed in alternating
    # chunks of steps over the same rows, so that drifts of the machine hit them alike. ours_loradrop's
    # plan comes from the importance of ours' adapters after the warm-up.
    def fresh_model():
        model = build_model(args, len(tokenizer))
        model.load_state_dict(initial)
        return model

    peer = PeerContender(args, fresh_model(), pad_token_id)
    peer.train(warmup_rows, 0, args.warmup_steps, timed=False)
    lora = OursContender(
        args,
        fresh_model(),
        lambda lay: attach_own_adapters(lay, args.lora_r, 2 * args.lora_r, 0.0),
        pad_token_id,
    )
    lora.train(warmup_rows, 0, args.warmup_steps, timed=False)
    plan = plan_from(lora, warmup_rows, pad_token_id, args.seed)
    loradrop = OursContender(
        args,
        fresh_model(),
        lambda lay: attach_planned_adapters(lay, plan, args.lora_r, 2 * args.lora_r, 0.0),
        pad_token_id,
    )
    loradrop.train(warmup_rows, 0, args.warmup_steps, timed=False)
    recording = OursContender(
        args,
        fresh_model(),
        lambda lay: attach_own_adapters(lay, args.lora_r, 2 * args.lora_r, 0.0),
        pad_token_id,
        record_importance=True,
    )
    recording.train(warmup_rows, 0, args.warmup_steps, timed=False)
    named = {"peer": peer, "ours": lora, "ours_loradrop": loradrop, "ours_recording_importance": recording}
    for first in range(0, args.steps, args.chunk_steps):
        for contender in named.values():
            contender.train(timed_rows, first, min(first + args.chunk_steps, args.steps))
    timings = {name: contender.timings for name, contender in named.items()}

    # The importance pass over the timed rows against a 3-epoch stage 1 over them.
    start = time.perf_counter()
    measure_importance(
        lora.engine,
        lora.layout,
        timed_rows,
        batch_size=lora.batch.micro_batch_size,
        pad_token_id=pad_token_id,
        device=ds_engine.local_device(),
    )
    importance_seconds = max(all_gather_object(time.perf_counter() - start))
    results["importance_seconds"] = importance_seconds
    results["importance_share_of_stage1"] = importance_seconds / (
        3 * timings["ours"].seconds + importance_seconds
    )
    # last_epoch: the recorder runs during the last of 3 epochs; its cost is the extra time of that epoch
    ours_seconds = timings["ours"].seconds
    results["recording_share_of_stage1"] = (timings["ours_recording_importance"].seconds - ours_seconds) / (
        3 * ours_seconds
    )
    # Per-chunk ratios: the contenders ran the same steps back to back, so a burst of the shared machine
    # hits one chunk's ratio, and their median ignores it.
    results["chunk_ratios"] = {
        "ours_over_peer": chunk_ratios(timings["peer"], timings["ours"]),
        "loradrop_over_lora_step_time": chunk_ratios(timings["ours_loradrop"], timings["ours"]),
        "recording_share_of_stage1": [
            (r - 1) / 3 for r in chunk_ratios(timings["ours_recording_importance"], timings["ours"])
        ],
    }
    for contender in (lora, loradrop, recording):
        ds_engine.destroy_engine(contender.engine)
    results["retained"] = plan.layer_mask()
    results["peak_rss_gib"] = peak_rss_gib()

    # The peak is measured before and after the contenders; the higher one counts.
    peak = max(peak_before, matmul_peak(torch.float32))
    results["matmul_peak_gflops_per_rank"] = peak / 1e9
    # every contender trained the same timed rows
    flops = training_flops(timed_rows, matmul_params, args.num_layers, args.hidden_size)
    real_tokens = sum(len(row["input_ids"]) for row in timed_rows)
    for name, timing in timings.items():
        results[name] = {
            "seconds": timing.seconds,
            "step_seconds": timing.seconds / timing.steps,
            "target_tokens_per_second": timing.target_tokens / timing.seconds,
            "real_tokens_per_second": real_tokens / timing.seconds,
            "flop_utilization": flops / timing.seconds / (peak * world_size),
            "minor_page_faults_per_step": timing.page_faults / timing.steps,
        }
    results["ours_over_peer"] = (
        results["ours"]["target_tokens_per_second"] / results["peer"]["target_tokens_per_second"]
    )
    results["loradrop_over_lora_step_time"] = (
        results["ours_loradrop"]["step_seconds"] / results["ours"]["step_seconds"]
    )
    rss = all_gather_object(results["peak_rss_gib"])
    results["peak_rss_gib_per_rank"] = rss
    return results


def report(results: dict) -> str:
    chunks = results["chunk_ratios"]
    lines = [
        (
            f"task {results['task']}, {results['world_size']} rank(s) x {results['threads_per_rank']} "
            "thread(s), "
            f"global batch {results['global_batch_size']}, {results['steps']} timed steps, "
            f"{results['non_embedding_parameters'] / 1e6:.1f}M non-embedding parameters, fp32"
        ),
        "",
        (
            "| contender | step s | target tokens/s | real tokens/s | FLOP utilisation | minor page "
            "faults / step |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("peer", "ours", "ours_loradrop", "ours_recording_importance"):
        r = results[name]
        lines.append(
            f"| {name} | {r['step_seconds']:.3f} | {r['target_tokens_per_second']:.0f} | "
            f"{r['real_tokens_per_second']:.0f} | {100 * r['flop_utilization']:.1f}% | "
            f"{r['minor_page_faults_per_step']:,.0f} |"
        )
    lines += [
        "",
        (
            f"ours / peer (target tokens/s): {results['ours_over_peer']:.2f}x "
            f"({median_and_range(chunks['ours_over_peer'])})"
        ),
        (
            f"LoRA-drop / LoRA stage-2 step time: {results['loradrop_over_lora_step_time']:.3f} "
            f"({median_and_range(chunks['loradrop_over_lora_step_time'], fmt='.3f')}; retained "
            f"{results['retained']})"
        ),
        (
            f"importance pass: {results['importance_seconds']:.2f} s = "
            f"{100 * results['importance_share_of_stage1']:.1f}% "
            f"of a 3-epoch stage 1 over the same rows"
        ),
        (
            f"importance recorded during the last epoch (--importance_pass last_epoch): "
            f"{100 * results['recording_share_of_stage1']:+.1f}% of a 3-epoch stage 1 "
            f"({median_and_range(chunks['recording_share_of_stage1'], scale=100, fmt='+.1f')} %)"
        ),
        (
            f"matmul peak: {results['matmul_peak_gflops_per_rank']:.1f} GFLOP/s per rank (fp32, best "
            "square matmul before and after)"
        ),
        f"peak RSS per rank: {', '.join(f'{v:.2f}' for v in results['peak_rss_gib_per_rank'])} GiB",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = parse_args()
    outcome = main(arguments)
    if is_rank_zero():
        print(report(outcome), flush=True)
        if arguments.json:
            with open(arguments.json, "w") as handle:
                json.dump({k: v for k, v in outcome.items()}, handle, indent=2)
    # a gloo process group alive at interpreter exit can abort a finished rank (tests/test_clean_exit.py)
    ds_engine.shutdown_distributed()
