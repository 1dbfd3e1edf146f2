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
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from contenders import (
    DEFAULT_MAX_SEQ_LENGTH,
    OursContender,
    PeerContender,
    build_model,
    plan_from,
    prepare_rows,
)
from harness import (
    chunk_ratios,
    matmul_peak,
    median_and_range,
    non_embedding_matmul_parameters,
    peak_rss_gib,
    training_flops,
)

from ds_loradrop.method.placement import (
    attach_own_adapters,
    attach_planned_adapters,
)
from ds_loradrop.method.probe import measure_importance
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import all_gather_object, get_world_size_and_rank, is_rank_zero

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
