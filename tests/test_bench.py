"""The benchmarks in bench/ run end to end for a few steps (their numbers are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from launching import preloaded_python_program, torchrun

pytestmark = pytest.mark.bench


def test_generation_benchmark_runs(tmp_path, e2e_dir):
    out = tmp_path / "generation.json"
    command = [
        sys.executable,
        os.path.join(REPO_ROOT, "bench", "generation_throughput.py"),
        "--data_dir",
        e2e_dir,
        "--num_inputs",
        "6",
        "--batch_size",
        "3",
        "--max_new_tokens",
        "4",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"STDOUT\n{result.stdout[-4000:]}\nSTDERR\n{result.stderr[-4000:]}"
    assert "| mode | inputs | generated tokens | seconds | tokens/s |" in result.stdout
    assert "| batched | 6 |" in result.stdout and "| per_example | 6 |" in result.stdout
    assert "batched / per_example (tokens/s): " in result.stdout
    assert "| pipeline | 6 |" in result.stdout and "batched / pipeline (tokens/s): " in result.stdout
    assert "identical predictions: " in result.stdout
    numbers = json.loads(out.read_text())
    for key in (
        "batched",
        "per_example",
        "batched_over_per_example",
        "identical_predictions",
        "num_differing_predictions",
        "num_inputs",
        "batch_size",
        "max_new_tokens",
        "threads",
    ):
        assert key in numbers, key
    for mode in ("batched", "per_example"):
        assert set(numbers[mode]) == {"inputs", "generated_tokens", "seconds", "tokens_per_second"}
        assert numbers[mode]["inputs"] == 6
        # every input generates at least one token and at most max_new_tokens
        assert 6 <= numbers[mode]["generated_tokens"] <= 6 * 4
    assert numbers["num_differing_predictions"] == len(numbers["differing_indices"])


def test_training_benchmark_runs_on_two_ranks(tmp_path, e2e_dir):
    out = tmp_path / "train.json"
    command = torchrun(
        os.path.join(REPO_ROOT, "bench", "train_throughput.py"),
        "--data_dir",
        e2e_dir,
        "--steps",
        "2",
        "--chunk_steps",
        "1",
        "--warmup_steps",
        "1",
        "--global_batch_size",
        "4",
        "--hidden_size",
        "64",
        "--intermediate_size",
        "128",
        "--num_layers",
        "2",
        "--num_heads",
        "2",
        "--json",
        str(out),
        preloaded=True,  # its numbers are asserted nowhere here
    )
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"STDOUT\n{result.stdout[-4000:]}\nSTDERR\n{result.stderr[-4000:]}"
    assert (
        "| contender | step s | target tokens/s | real tokens/s | FLOP utilisation | minor page "
        "faults / step |" in result.stdout
    )
    assert "ours / peer (target tokens/s): " in result.stdout
    numbers = json.loads(out.read_text())
    assert numbers["world_size"] == 2 and len(numbers["peak_rss_gib_per_rank"]) == 2
    for name in ("peer", "ours", "ours_loradrop", "ours_recording_importance"):
        assert numbers[name]["target_tokens_per_second"] > 0 and 0 < numbers[name]["flop_utilization"]
        assert numbers[name]["minor_page_faults_per_step"] >= 0
    # 2 timed steps, alternating every step: 2 chunks
    assert len(numbers["chunk_ratios"]["recording_share_of_stage1"]) == 2
    assert (
        len(numbers["chunk_ratios"]["ours_over_peer"]) == 2
        and min(numbers["chunk_ratios"]["ours_over_peer"]) > 0
    )
    assert numbers["ours"]["target_tokens_per_second"] * numbers["ours"]["seconds"] == pytest.approx(
        numbers["peer"]["target_tokens_per_second"] * numbers["peer"]["seconds"]
    )  # the same useful tokens


def test_training_profile_runs(tmp_path, e2e_dir):
    command = [
        sys.executable,
        os.path.join(REPO_ROOT, "bench", "profile_train_step.py"),
        "--data_dir",
        e2e_dir,
        "--steps",
        "1",
        "--warmup_steps",
        "1",
        "--global_batch_size",
        "2",
        "--hidden_size",
        "64",
        "--intermediate_size",
        "128",
        "--num_layers",
        "2",
        "--num_heads",
        "2",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "## peer: top operators" in result.stdout and "## ours: top operators" in result.stdout
    assert "aten::mm" in result.stdout


def test_trainer_comparison_runs_every_contender_on_two_ranks(tmp_path, e2e_dir):
    """bench/compare_trainers.py: the plain PEFT loop, the HF Trainer (length-grouped, DeepSpeed), TRL's
    SFTTrainer (padding-free, DeepSpeed) and ours (LoRA, LoRA-drop, padding-free), one round each."""
    out = tmp_path / "trainers.json"
    command = [
        sys.executable,
        os.path.join(REPO_ROOT, "bench", "compare_trainers.py"),
        "--model",
        "tiny-llama",
        "--data_dir",
        e2e_dir,
        "--ranks",
        "2",
        "--rounds",
        "1",
        "--steps",
        "2",
        "--warmup_epochs",
        "1",
        "--global_batch_size",
        "4",
        "--launcher",  # the deepspeed launcher is tested where it is the subject (tests/conftest.py's runs)
        "torchrun",
        # the ranks forked from the preload server (7 launches of 2 ranks: ~7 s of imports less each rank);
        # the peak memory then counts the server's imports too: its numbers are asserted nowhere here
        "--python",
        preloaded_python_program(tmp_path / "bin"),
        "--json",
        str(out),
    ]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, f"STDOUT\n{result.stdout[-4000:]}\nSTDERR\n{result.stderr[-4000:]}"
    numbers = json.loads(out.read_text())
    contenders = numbers["contenders"]
    assert set(contenders) == {
        "peer_loop",
        "hf_trainer",
        "sft_trainer",
        "ours",
        "ours_loradrop",
        "ours_padding_free",
    }
    for name, value in contenders.items():
        assert value["useful_tokens_per_second"] > 0 and value["real_tokens_per_second"] > 0, name
        assert len(value["peak_rss_gib_per_rank"]) == 2, name
        # ours' memory comes from a run of its own, not from the shared process of the timed rounds
        assert value["peak_rss_measured"] == ("alone" if name.startswith("ours") else "in the rounds"), name
    assert "ours_loradrop alone (memory) done" in result.stderr
    assert "three runs in one process" not in result.stdout
    for peer in ("peer_loop", "hf_trainer", "sft_trainer"):
        assert f"ours/{peer} (useful tokens/s): " in result.stdout
    assert "| contender | useful tokens/s | real tokens/s | FLOP utilisation |" in result.stdout
    # every contender times one whole epoch of the same rows (its sampler picks the order), so all count
    # the same tokens: those of the 2 x 4 rows, whatever the contender's batching
    timed = numbers["timed_tokens"]
    assert timed["same"], timed
    useful, real = timed["per_contender"]["ours"][0]
    assert 0 < useful < real
    assert f"every contender timed the same rows: {useful} useful / {real} real tokens" in result.stdout


def test_memory_against_the_plan_runs_and_zero3_holds_half_the_weights_per_rank(tmp_path):
    """bench/memory_vs_plan.py on a random Llama-2-shaped checkpoint: one and two ranks under ZeRO-3 in bf16;
    each row has the plan's prediction beside the measurement, and two ranks hold half the weights each."""
    from ds_loradrop.models.loading import TINY_LLAMA2_SPEC

    model_dir = tmp_path / "model"
    _save_random_llama(TINY_LLAMA2_SPEC.llama_config(), model_dir)
    out = tmp_path / "memory.json"
    command = [
        sys.executable, os.path.join(REPO_ROOT, "bench", "memory_vs_plan.py"), "--models", str(model_dir),
        "--ranks", "1", "2", "--stages", "3", "--dtypes", "bf16", "--steps", "1", "--seq_length", "16",
        "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["ranks"], r["stage"], r["dtype"]) for r in rows] == [(1, 3, "bf16"), (2, 3, "bf16")]
    one, two = (row["measured"] for row in rows)
    assert one["held_fraction"] == 1.0 and two["held_fraction"] == pytest.approx(0.5, abs=0.01)
    assert one["precision"]["frozen"] == "bfloat16" and one["precision"]["master_weights"] == "float32"
    for row in rows:
        assert row["measured"]["loading_bytes"] > 0 and row["measured"]["training_bytes"] > 0
        # bf16: 2 bytes per parameter of the 14.5M, split over the ranks
        assert row["plan"]["loading_bytes"] >= 2 * row["plan"]["total_params"] / row["ranks"]
    assert "| ratio |" in result.stdout


def _save_random_llama(config, directory) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)


def test_the_gpu_check_refuses_without_a_gpu_in_one_line():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "bench", "gpu_check.py")],
        cwd=REPO_ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = (
        "error: no CUDA GPU is visible (torch.cuda.is_available() is False): this check runs only on an "
        "NVIDIA GPU host"
    )
    assert lines == [expected]
    assert not os.path.exists(os.path.join(REPO_ROOT, "outputs", "gpu_check", "gpu_check.json"))
