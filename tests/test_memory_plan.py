"""The memory planner: parameter counts, ZeRO partitioning, activations, offload, DeepSpeed's estimator."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import subprocess

import pytest
import torch

from ds_loradrop.errors import UsageError
from ds_loradrop.training.memory_plan import (
    GIB,
    TrainingSetup,
    activation_bytes,
    full_lora_parameters,
    load_model_shape,
    lora_drop_model_states,
    plan_lora_drop,
    trainable_parameters,
)

pytestmark = pytest.mark.unit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "launch", "plan_memory.py")


@pytest.fixture(scope="module")
def llama_7b():
    return load_model_shape("llama-2-7b")


@pytest.fixture(scope="module")
def plan_memory():
    spec = importlib.util.spec_from_file_location("plan_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llama_2_7b_parameter_counts(llama_7b):
    assert llama_7b.total_params == 6_738_415_616
    assert llama_7b.largest_module_params == 32000 * 4096  # embed_tokens / lm_head
    assert full_lora_parameters(llama_7b, ("q_proj", "v_proj"), 8) == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    assert trainable_parameters(llama_7b, TrainingSetup()) == 2_097_152
    with pytest.raises(UsageError, match="match no nn.Linear"):
        full_lora_parameters(llama_7b, ("nope_proj",), 8)


def test_config_path_counts_match_a_real_model(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    config.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_config(config)
    expected_lora = 2 * sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj"))
    )
    for source in (str(tmp_path), str(tmp_path / "config.json")):
        shape = load_model_shape(source)
        assert shape.total_params == sum(p.numel() for p in model.parameters())
        assert full_lora_parameters(shape, ("q_proj", "v_proj"), 2) == expected_lora
    with pytest.raises(UsageError):
        load_model_shape(str(tmp_path / "missing"))
    (tmp_path / "bad" / "config.json").parent.mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(UsageError):
        load_model_shape(str(tmp_path / "bad"))


def test_full_finetuning_rows_are_deepspeeds_estimate(llama_7b, plan_memory):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = {
        (e.setup, e.gpus): e
        for gpus in (1, 16)
        for e in plan_memory.full_finetuning_estimates(llama_7b, TrainingSetup(), gpus, 8)
    }
    zero3 = rows[("full fine-tuning (DeepSpeed estimator) ZeRO-3", 1)]
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(6_738_415_616, 131_072_000, 1, 1, False, False, True)
    assert (zero3.gpu_model_states, zero3.cpu_per_node) == (gpu, cpu)
    assert 110 < zero3.gpu_model_states / GIB < 116  # ~113 GiB: 18 bytes/param + 4 bytes x largest layer
    cpu, gpu = estimate_zero2_model_states_mem_needs(6_738_415_616, 8, 2, cpu_offload=True)
    zero2 = rows[("full fine-tuning (DeepSpeed estimator) ZeRO-2 + offload_optimizer", 16)]
    assert (zero2.gpu_model_states, zero2.cpu_per_node) == (gpu, cpu)
    # The printing variant shows the same per-GPU number (it returns None).
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert estimate_zero3_model_states_mem_needs_all_cold(6_738_415_616, 131_072_000, 1, 1) is None
    line = next(
        x for x in printed.getvalue().splitlines() if "offload_optimizer=none" in x and "zero_init=1" in x
    )
    assert f"{zero3.gpu_model_states / GIB:6.2f}GB" in line


def test_zero3_partitions_and_lora_drop_is_far_below_full_finetuning(llama_7b, plan_memory):
    setup = TrainingSetup()
    # ZeRO-3 keeps up to stage3_max_live_parameters (1e9 by default) gathered on each of several ranks,
    # 2 bytes each in bf16; on one rank the partitions are the parameters, nothing more is gathered
    gathered = 2 * 10**9
    one, _ = lora_drop_model_states(llama_7b, setup, 3, 1, False, False)
    two, _ = lora_drop_model_states(llama_7b, setup, 3, 2, False, False)
    assert (two - gathered) == pytest.approx(one / 2, rel=1e-6)
    assert 12 < one / GIB < 13  # 2 bytes x 6.74e9 frozen + 16 bytes x 2.1e6 trainable
    zero2_one, _ = lora_drop_model_states(llama_7b, setup, 2, 1, False, False)
    zero2_two, _ = lora_drop_model_states(llama_7b, setup, 2, 2, False, False)
    assert zero2_two < zero2_one and zero2_one - zero2_two < 0.1 * GIB  # base replicated under ZeRO-2
    full = plan_memory.deepspeed_model_states(llama_7b, 3, 1, 8, False, False)[0]
    # full fine-tuning: 18 bytes x 6.74e9 = 121.8e9;
    # LoRA-drop: 2 x 6.74e9 + 16 x 2.1e6 = 13.5e9
    assert one < full / 8


def test_zero3_gathers_up_to_max_live_parameters_and_at_least_the_largest_module(llama_7b):
    from ds_loradrop.training.memory_plan import gathered_parameters

    assert gathered_parameters(llama_7b, TrainingSetup()) == 10**9  # DeepSpeed's default cap
    assert gathered_parameters(llama_7b, TrainingSetup(max_live_parameters=10**11)) == llama_7b.total_params
    # a small cap still gathers the largest module (the embedding, 32000 x 4096) whole
    assert gathered_parameters(llama_7b, TrainingSetup(max_live_parameters=10**6)) == 32000 * 4096
    low, _ = lora_drop_model_states(llama_7b, TrainingSetup(max_live_parameters=10**6), 3, 8, False, False)
    default, _ = lora_drop_model_states(llama_7b, TrainingSetup(), 3, 8, False, False)
    assert default - low == 2 * (10**9 - 32000 * 4096)


def test_checkpointing_reduces_activations(llama_7b):
    setup = TrainingSetup()
    plain, checkpointed = activation_bytes(llama_7b, setup, False), activation_bytes(llama_7b, setup, True)
    assert checkpointed < plain / 5
    logits = 4 * 4 * 512 * 32000
    assert checkpointed > 32 * 4 * 512 * 4096 * 2 + logits
    eager = activation_bytes(llama_7b, dataclasses.replace(setup, attention="eager"), False)
    assert eager > plain
    longer = activation_bytes(llama_7b, dataclasses.replace(setup, seq_length=1024), False)
    assert longer == pytest.approx(2 * plain)


def test_offload_moves_bytes_to_cpu(llama_7b):
    setup = TrainingSetup()
    for stage, gpus in ((2, 1), (3, 1), (3, 8)):
        gpu, cpu = lora_drop_model_states(llama_7b, setup, stage, gpus, False, False)
        offloaded_gpu, offloaded_cpu = lora_drop_model_states(llama_7b, setup, stage, gpus, True, False)
        assert cpu == 0 and offloaded_cpu > 0 and abs((gpu - offloaded_gpu) - offloaded_cpu) <= 1
    gpu, cpu = lora_drop_model_states(llama_7b, setup, 3, 8, True, False)
    param_gpu, param_cpu = lora_drop_model_states(llama_7b, setup, 3, 8, True, True)
    assert param_gpu == 2 * 10**9 and abs((gpu - param_gpu) - (param_cpu - cpu)) <= 1
    per_rank = {e.setup: e for e in plan_lora_drop(llama_7b, setup, 8, 8)}
    assert per_rank["LoRA-drop ZeRO-3 + offload_optimizer + offload_param"].cpu_per_node == pytest.approx(
        8 * param_cpu, abs=8
    )


def test_bad_values_are_usage_errors(llama_7b):
    for bad in ({"retained_fraction": 0}, {"lora_r": 0}, {"seq_length": -1}, {"dtype": "int8"}):
        with pytest.raises(UsageError):
            TrainingSetup(**bad)
    with pytest.raises(UsageError, match="do not fill nodes"):
        plan_lora_drop(llama_7b, TrainingSetup(), 12, 8)


def _run(*args: str) -> subprocess.CompletedProcess:
    """launch/plan_memory.py in this process (one process, no process group)."""
    from launching import run_in_process

    return run_in_process(SCRIPT, *args)


def test_entry_point_prints_a_row_per_gpu_count():
    result = _run("--model", "llama-2-7b", "--gpus", "1", "2", "8", "16")
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| LoRA-drop")]
    assert sorted({int(row[2]) for row in rows}) == [1, 2, 8, 16] and len(rows) == 4 * 5
    assert result.stdout.count("| full fine-tuning (DeepSpeed estimator) ZeRO-3 | 1 | 113.") == 1


def test_json_output(plan_memory, capsys):
    plan_memory.main(["--model", "llama-2-7b", "--gpus", "1", "8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 2_097_152 and len(report["estimates"]) == 2 * 10
    assert {"gpu_total", "gpu_total_checkpointed", "cpu_per_node"} <= set(report["estimates"][0])


@pytest.mark.parametrize(
    "args", [("--gpus", "0"), ("--gpus", "x"), ("--retained_fraction", "1.5"), ("--model", "/no/such/dir")]
)
def test_entry_point_bad_flag_exits_2_with_one_line(args):
    result = _run(*args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and result.stdout == ""


def test_grouped_query_attention_shapes_lora_and_activations():
    """Llama-3-8B: 32 query heads, 8 key/value heads, so v_proj is 4096 -> 1024 while q_proj is
    4096 -> 4096."""
    shape = load_model_shape("llama-3-8b")
    assert shape.total_params == 8_030_261_248  # the published size of Meta-Llama-3-8B
    assert shape.kv_width == 8 * 128
    q_lora, v_lora = 8 * (4096 + 4096), 8 * (4096 + 1024)
    assert full_lora_parameters(shape, ("q_proj", "v_proj"), 8) == 32 * (q_lora + v_lora) == 3_407_872
    setup = TrainingSetup(micro_batch_size=1, seq_length=512, dtype="bf16")
    # per token: 2 bytes x (4h + 2 h_kv + 4I) + 8h fp32 norm inputs; h_kv = 1024, not h = 4096.
    per_token = 2 * (4 * 4096 + 2 * 1024 + 4 * 14336) + 8 * 4096
    logits = 4 * 512 * 128256
    assert activation_bytes(shape, setup, False) == 32 * 512 * per_token + logits
    seventy = load_model_shape("llama-2-70b")
    assert seventy.kv_width == 1024 and seventy.num_layers == 80
    assert full_lora_parameters(seventy, ("v_proj",), 8) == 80 * 8 * (8192 + 1024)
