"""Memory per rank, measured while loading and while training, beside the memory plan's prediction for the
same setting (``ds_loradrop/training/memory_plan.py``, what ``launch/plan_memory.py`` prints).

    python bench/memory_vs_plan.py [--models llama2-1b-shape smollm2-135m] [--ranks 1 2 4] \
        [--stages 2 3] [--dtypes fp32 bf16] [--json bench/results/memory_vs_plan.json]

Each setting is its own launch of ``bench/memory_probe.py`` (1 rank: plain ``python``; more: the DeepSpeed
launcher) with the shipped ``ds_configs/zero{2,3}[_bf16].json``: LoRA r = 8 on q_proj and v_proj of every
layer, micro-batch 1 of ``--seq_length`` random tokens, ``--steps`` optimizer steps. The figure of a
setting is the largest over its ranks of what each holds (memory_probe.py: allocated memory plus the
checkpoint pages used in place as weights).
``llama2-1b-shape`` is a random Llama at Llama-2-7b's proportions
(hidden 2048, 16 heads of 128, multi-head attention, MLP 5504 = 2.6875x, 18 layers, untied 32,000-row
head: 1.04B parameters), written once (bf16 safetensors) into the preset cache.

Plan: loading = ``memory_plan.loading_bytes``; training = ``lora_drop_model_states`` (retained fraction
1.0: every layer has its LoRA) + ``activation_bytes`` (no checkpointing). Ratio = measured / plan. On the
CPU "measured" is the peak resident set above the process's own baseline (see memory_probe.py), with
glibc's mmap threshold fixed so that freed tensors leave the resident set (``measure``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from ds_loradrop.training.distributed import free_port

PROBE = os.path.join(REPO_ROOT, "bench", "memory_probe.py")
GIB = 2**30
# Llama-2-7b's proportions (memory_plan.LLAMA_2_7B) at about 1B parameters.
LLAMA2_1B_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 18,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}


def build_llama2_1b_shape(directory: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA2_1B_SHAPE)).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)


def model_directory(name: str, cache_dir: str) -> str:
    from ds_loradrop.models.loading import build_once, ensure_smollm2

    if name == "smollm2-135m":
        return ensure_smollm2(cache_dir)
    if name == "llama2-1b-shape":
        return build_once(os.path.join(cache_dir, "bench", name), build_llama2_1b_shape)
    if os.path.isfile(os.path.join(name, "config.json")):
        return name
    raise SystemExit(
        f"error: --models takes llama2-1b-shape, smollm2-135m or a checkpoint directory, not {name!r}"
    )


def ds_config_path(stage: int, dtype: str) -> str:
    suffix = "_bf16" if dtype == "bf16" else ""
    return os.path.join(REPO_ROOT, "ds_configs", f"zero{stage}{suffix}.json")


def plan(model_dir: str, stage: int, ranks: int, dtype: str, seq_length: int) -> dict:
    from ds_loradrop.training.ds_config import load_ds_config
    from ds_loradrop.training.memory_plan import (
        DEEPSPEED_MAX_LIVE_PARAMETERS,
        TrainingSetup,
        activation_bytes,
        load_model_shape,
        loading_bytes,
        lora_drop_model_states,
    )

    shape = load_model_shape(model_dir)
    zero = load_ds_config(ds_config_path(stage, dtype)).get("zero_optimization", {})
    setup = TrainingSetup(
        retained_fraction=1.0,
        micro_batch_size=1,
        seq_length=seq_length,
        dtype=dtype,
        max_live_parameters=int(zero.get("stage3_max_live_parameters", DEEPSPEED_MAX_LIVE_PARAMETERS)),
    )
    states, _ = lora_drop_model_states(shape, setup, stage, ranks, False, False)
    return {
        "loading_bytes": loading_bytes(shape, setup, stage, ranks),
        "model_states_bytes": states,
        "activation_bytes": activation_bytes(shape, setup, False),
        "training_bytes": states + activation_bytes(shape, setup, False),
        "total_params": shape.total_params,
    }


def measure(model_dir: str, stage: int, ranks: int, dtype: str, args) -> dict:
    out = tempfile.mkdtemp(prefix="memory_probe_")
    probe_args = [PROBE, "--model", model_dir, "--ds_config", ds_config_path(stage, dtype), "--out", out,
                  "--steps", str(args.steps), "--seq_length", str(args.seq_length)]  # fmt: skip
    if ranks == 1:
        command = [sys.executable, *probe_args]
    else:
        deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        command = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), *probe_args]
    # A fixed mmap threshold: glibc then returns every freed tensor of 128 KiB or more to the system at
    # once. With its default (a threshold that grows to 32 MiB as tensors are freed), freed layer-sized
    # tensors stay in the heap, and the resident memory measures the allocator's history, not what the
    # rank holds: the 1B model's ZeRO-3 loading read 1.9-2.4 GiB per rank that way, 1.22 GiB with it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    records = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(out, "rank*.json")))]  # noqa: SIM115
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0 or len(records) != ranks:
        tail = (result.stdout + result.stderr)[-3000:]
        return {"failed": f"exit status {result.returncode}", "log_tail": tail, "seconds": seconds}
    return {
        "loading_bytes": max(r["loading_held_bytes"] for r in records),
        "training_bytes": max(r["training_held_bytes"] for r in records),
        "loading_resident_bytes": max(r["loading_bytes"] for r in records),
        "training_resident_bytes": max(r["training_bytes"] for r in records),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in records),
        "held_fraction": max(r["local_elements"] / r["elements"] for r in records),
        "kind": records[0]["kind"],
        "device": records[0]["device"],
        "precision": records[0]["precision"],
        "per_rank": records,
        "seconds": seconds,
    }


def markdown(rows: list[dict]) -> str:
    header = (
        "| model | ZeRO | dtype | ranks | weights held / rank | loading: measured / plan (GiB) | ratio "
        "| training: measured / plan (GiB) | ratio |"
    )
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        m, p = row["measured"], row["plan"]
        head = f"| {row['model']} | {row['stage']} | {row['dtype']} | {row['ranks']} "
        if "failed" in m:
            lines.append(head + f"| - | {m['failed']} | - | - | - |")
            continue
        loading = m["loading_bytes"]
        lines.append(
            head + f"| {m['held_fraction']:.3f} "
            f"| {loading / GIB:.2f} / {p['loading_bytes'] / GIB:.2f} | {loading / p['loading_bytes']:.2f} "
            f"| {m['training_bytes'] / GIB:.2f} / {p['training_bytes'] / GIB:.2f} "
            f"| {m['training_bytes'] / p['training_bytes']:.2f} |"
        )
    return "\n".join(lines)


def merge(paths: list[str], cache_dir: str, output: str | None) -> list[dict]:
    """The rows of earlier runs, each with the current plan's prediction for its setting; a setting
    measured in several files keeps the last file's row."""
    rows, settings = {}, []
    for path in paths:
        with open(path) as handle:
            saved = json.load(handle)
        settings.append(saved["settings"])
        seq_length = saved["settings"]["seq_length"]
        for row in saved["rows"]:
            model_dir = model_directory(row["model"], cache_dir)
            row["plan"] = plan(model_dir, row["stage"], row["ranks"], row["dtype"], seq_length)
            rows[(row["model"], row["dtype"], row["stage"], row["ranks"])] = row
    merged = list(rows.values())
    print(markdown(merged))
    if output:
        with open(output, "w") as handle:
            json.dump({"settings": settings, "rows": merged}, handle, indent=2)
    return merged


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama2-1b-shape"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3], choices=(2, 3))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--cache_dir", default=None, help="Preset cache (default: the trainer's).")
    parser.add_argument("--json", default=None, help="Also write the rows here.")
    parser.add_argument(
        "--from_json",
        nargs="+",
        default=None,
        help="Measure nothing: merge these earlier --json files, with the plan computed again by the "
        "current code, into --json and the table.",
    )
    args = parser.parse_args(argv)
    from ds_loradrop.models.loading import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    if args.from_json:
        return merge(args.from_json, cache_dir, args.json)
    rows = []
    for name in args.models:
        model_dir = model_directory(name, cache_dir)
        for dtype in args.dtypes:
            for stage in args.stages:
                for ranks in args.ranks:
                    row = {"model": name, "stage": stage, "dtype": dtype, "ranks": ranks}
                    row["plan"] = plan(model_dir, stage, ranks, dtype, args.seq_length)
                    row["measured"] = measure(model_dir, stage, ranks, dtype, args)
                    rows.append(row)
                    print(markdown([row]).splitlines()[-1], flush=True)
                    if args.json:
                        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                        with open(args.json, "w") as handle:
                            json.dump({"settings": vars(args), "rows": rows}, handle, indent=2)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
