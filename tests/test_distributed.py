"""Through the real launchers: 2 ranks under ZeRO-3 (deepspeed) and ZeRO-2 (torchrun) against 1 rank,
plus launch/evaluate.py (synced generation), MLflow tracking (a real server and a local store) and
launch/compare.py on those runs.

The runs are the session fixture ``runs`` (tests/conftest.py, configuration in tests/launching.py):
four launches (each costs ~40 s of start-up here), many checks each.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import REPO_ROOT, run_compare
from mlflow import MlflowClient
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed


def _plan(directory):
    with open(os.path.join(directory, "plan.json")) as handle:
        return json.load(handle)


def test_plan_has_importance_for_every_layer_and_keeps_fewer_layers(runs):
    out, _ = runs
    plan = _plan(out["zero3_2ranks"])
    assert set(plan["targets"]) == {"q_proj", "v_proj"}
    assert plan["world_size"] == 2 and plan["num_sampled"] == 48 and plan["threshold"] == 0.6
    assert plan["selection"] == "output_norm" and plan["low_importance"] == "share" and plan["seed"] == 3
    assert plan["num_tokens"] > 48 * 10
    # 48 sampled rows / global batch 8 x 2 epochs = 12 planned steps, capped by --max_steps 8 (said, not
    # silent)
    assert plan["stage1_steps"] == 8 and plan["stage1_planned_steps"] == 12
    kept = 0
    for target in plan["targets"].values():
        assert len(target["importance"]) == len(target["normalized"]) == 8
        assert all(g > 0 for g in target["importance"])
        assert sum(target["normalized"]) == pytest.approx(1.0)
        assert sorted(target["retained"] + target["shared"]) == list(range(8)) and target["dropped"] == []
        kept_mass = sum(target["normalized"][i] for i in target["retained"])
        assert kept_mass >= 0.6 - 1e-9
        # minimal: dropping the least important retained layer falls below T
        assert kept_mass - min(target["normalized"][i] for i in target["retained"]) < 0.6
        kept += len(target["retained"])
    assert kept < 16


def test_importance_equals_the_one_rank_run(runs):
    out, _ = runs
    two, one = _plan(out["zero3_2ranks"]), _plan(out["one_rank"])
    assert two["num_tokens"] == one["num_tokens"]
    for name in ("q_proj", "v_proj"):
        assert two["targets"][name]["importance"] == pytest.approx(
            one["targets"][name]["importance"], rel=1e-5
        )
        assert two["targets"][name]["retained"] == one["targets"][name]["retained"]


def test_both_ranks_hold_the_same_mask_and_parameters_are_partitioned(runs):
    _, logs = runs
    assert (
        "stage1: capped at 8 of its 12 steps (2 epochs) by --max_steps: importance comes from adapters "
        "trained on 67% of stage 1" in logs["zero3_2ranks"]
    )
    masks = dict(re.findall(r"rank (\d) holds layer mask ([0-9a-f]{16})", logs["zero3_2ranks"]))
    assert set(masks) == {"0", "1"} and masks["0"] == masks["1"]
    assert re.findall(r"rank 0 holds layer mask ([0-9a-f]{16})", logs["one_rank"]) == [masks["0"]]
    for stage in ("stage1", "stage2"):
        lines = re.findall(
            rf"\[ds_loradrop rank(\d)\] {stage}: \d+ trainable parameters; ZeRO stage 3: "
            r"(\d+)/(\d+) tensors partitioned, (\d+)/(\d+) elements",
            logs["zero3_2ranks"],
        )
        assert sorted(rank for rank, *_ in lines) == ["0", "1"]
        for _, partitioned, tensors, local, total in lines:
            assert int(partitioned) == int(tensors) > 50 and int(local) * 2 <= int(total) + 1000


def _tensors(directory, sub):
    return load_file(os.path.join(directory, sub, "adapter_model.safetensors"))


# ZeRO-3 is held to the 1e-5. The extra ZeRO-2 run reduces gradients in other buckets; Adam
# normalises the near-zero first gradients of lora_A, which turns that summation-order noise (~1e-7)
# into ~2e-5 after a few steps; measured ZeRO-2 1 rank vs 2 ranks: 1.75e-5 max abs.
@pytest.mark.parametrize("other, tolerance", [("zero3_2ranks", 1e-5), ("zero2_torchrun", 5e-5)])
def test_adapters_equal_the_one_rank_run(runs, other, tolerance):
    out, _ = runs
    for sub in ("stage1_adapter", "adapter"):
        reference, candidate = _tensors(out["one_rank"], sub), _tensors(out[other], sub)
        assert sorted(reference) == sorted(candidate)
        for key, value in reference.items():
            torch.testing.assert_close(
                candidate[key], value, rtol=tolerance, atol=tolerance, msg=f"{other} {sub} {key}"
            )
    final = _tensors(out["one_rank"], "adapter")
    assert any(value.abs().max() > 1e-3 for key, value in final.items() if key.endswith("lora_B"))


def test_final_adapter_stores_the_shared_adapter_once_and_counts_it_once(runs):
    out, logs = runs
    plan = _plan(out["zero3_2ranks"])
    tensors = _tensors(out["zero3_2ranks"], "adapter")
    with open(os.path.join(out["zero3_2ranks"], "adapter", "adapter_config.json")) as handle:
        adapter_config = json.load(handle)
    per_adapter = 8 * (128 + 128)
    expected = 0
    for name, target in plan["targets"].items():
        own = {f"{name}.layers.{i}.lora_A" for i in target["retained"]}
        shared = {f"{name}.shared.lora_A"} if target["shared"] else set()
        assert {k for k in tensors if k.startswith(f"{name}.") and k.endswith("lora_A")} == own | shared
        layers = adapter_config["layers"][name]
        assert [layers[i] for i in target["shared"]] == [f"{name}.shared"] * len(target["shared"])
        expected += (len(target["retained"]) + (1 if target["shared"] else 0)) * per_adapter
    assert (
        len(load_file(os.path.join(out["zero3_2ranks"], "stage1_adapter", "adapter_model.safetensors"))) == 32
    )
    with open(os.path.join(out["zero3_2ranks"], "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["trainable_parameters"] == expected and summary["lora_parameters"] == 16 * per_adapter
    assert f"trainable parameters: LoRA {16 * per_adapter} | loradrop {expected}" in logs["zero3_2ranks"]
    assert re.search(r"kept layers q_proj: \d/8 \[", logs["zero3_2ranks"])
    with open(os.path.join(out["zero3_2ranks"], "run_config.json")) as handle:
        resolved = json.load(handle)["resolved"]
    assert (
        resolved["world_size"] == 2 and resolved["global_batch_size"] == 8 and resolved["dtype"] == "float32"
    )
    assert os.path.isfile(os.path.join(out["zero3_2ranks"], "ds_config.json"))


def _jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_gathered_and_synced_generation_give_the_same_predictions(runs):
    out, logs = runs
    gathered_dir, synced_dir = os.path.join(out["zero3_2ranks"], "eval"), out["synced_eval"]
    gathered, synced = (
        _jsonl(os.path.join(gathered_dir, "predictions.jsonl")),
        _jsonl(os.path.join(synced_dir, "predictions.jsonl")),
    )
    assert len(gathered) == len(synced) == 10
    assert [row["id"] for row in gathered] == [f"e2e-validation-{i}" for i in range(10)]  # original order
    assert [row["prediction"] for row in gathered] == [row["prediction"] for row in synced]
    assert all(row["prediction"] and len(row["references"]) >= 2 for row in gathered)
    for directory, mode in ((gathered_dir, "gathered"), (synced_dir, "synced")):
        with open(os.path.join(directory, "metrics.json")) as handle:
            metrics = json.load(handle)
        assert metrics["task"] == "e2e" and metrics["split"] == "validation" and metrics["num_examples"] == 10
        assert (
            metrics["generation_mode"] == mode
            and 0 <= metrics["bleu"] <= 100
            and 0 <= metrics["rouge_l"] <= 100
        )
        assert metrics["generated_tokens"] > 0
    assert re.search(r"eval e2e/validation \(10 inputs, synced\)", logs["synced_eval"])
    with open(os.path.join(out["zero3_2ranks"], "summary.json")) as handle:
        assert json.load(handle)["eval_metrics"]["generation_mode"] == "gathered"


# --- MLflow tracking of the runs above ---------------------------------------------------------


def _artifacts(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


@pytest.mark.parametrize(
    "store, experiment, run_name, output",
    [
        ("server", "server-exp", "zero3-2ranks", "zero3_2ranks"),
        ("local_store", "local-exp", "zero2-torchrun", "zero2_torchrun"),
        ("local_store", "local-exp", "one-rank", "one_rank"),
    ],
)
def test_one_run_with_params_metrics_and_artifacts(runs, store, experiment, run_name, output):
    out, _ = runs
    client = MlflowClient(tracking_uri=out[store])
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
    )
    assert len(found) == 1, "exactly one run per job, whatever the number of ranks"
    run = found[0]
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    with open(os.path.join(out[output], "run_config.json")) as handle:
        resolved = json.load(handle)
    world_size = resolved["resolved"]["world_size"]
    assert params["finetuning.method"] == "loradrop" and params["drop.threshold"] == "0.6"
    assert params["drop.sample_ratio"] == "0.25" and params["lora.lora_r"] == "8"
    assert params["lora.lora_targets"] == "q_proj,v_proj" and params["data.task"] == "e2e"
    assert params["model.model"] == "tiny-llama" and params["world_size"] == str(world_size)
    assert params["ds.zero_optimization.stage"] == ("2" if "zero2" in run_name else "3")
    assert params["ds.train_batch_size"] == "8"
    assert tags["num_nodes"] == "1" and len(tags["git_commit"]) in (40, len("unknown"))
    for stage in ("stage1", "stage2"):
        history = client.get_metric_history(run.info.run_id, f"{stage}/loss")
        assert [m.step for m in history] == [5, 8]  # --logging_steps 5, --max_steps 8
        for name in ("learning_rate", "grad_norm", "target_tokens_per_second"):
            assert f"{stage}/{name}" in metrics
    with open(os.path.join(out[output], "plan.json")) as handle:
        plan = json.load(handle)
    for target in ("q_proj", "v_proj"):
        history = sorted(
            client.get_metric_history(run.info.run_id, f"importance/{target}"), key=lambda m: m.step
        )
        assert [m.step for m in history] == list(range(8))
        assert [m.value for m in history] == pytest.approx(plan["targets"][target]["importance"], rel=1e-9)
        assert metrics[f"retained_layers/{target}"] == len(plan["targets"][target]["retained"])
    with open(os.path.join(out[output], "summary.json")) as handle:
        summary = json.load(handle)
    assert metrics["trainable_parameters"] == summary["trainable_parameters"]
    assert metrics["lora_parameters"] == summary["lora_parameters"] == 16 * 8 * 256
    assert metrics["eval/bleu"] == pytest.approx(summary["eval_metrics"]["bleu"])
    assert "eval/rouge_l" in metrics
    assert metrics["base_eval/bleu"] == pytest.approx(summary["base_eval_metrics"]["bleu"])
    assert summary["base_eval_metrics"]["num_examples"] == summary["eval_metrics"]["num_examples"] == 10
    assert len(summary["peak_memory_bytes"]) == world_size
    for rank, peak in enumerate(summary["peak_memory_bytes"]):
        assert metrics[f"memory/peak_bytes_rank{rank}"] == peak > 2**27
    assert tags["memory/peak_kind"] == "peak_rss"
    # what the MLflow UI shows besides metrics: source, description, data lineage, system metrics
    assert tags["mlflow.source.name"] == "launch/train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert "launch/train.py" in tags["command"] and "--threshold 0.6" in tags["command"]
    kept = len(plan["targets"]["q_proj"]["retained"])
    assert tags["mlflow.note.content"].startswith(
        f"loradrop on e2e with tiny-llama. layers with their own adapter: q_proj {kept}/8"
    )
    assert f"bleu {summary['eval_metrics']['bleu']:.2f} (base model " in tags["mlflow.note.content"]
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"e2e/training", "e2e/evaluation", "e2e/validation"}
    training = {t.key: t.value for t in inputs["e2e/training"].tags}
    assert training == {"mlflow.data.context": "training", "rows": "192", "stage1_sample_size": "48"}
    assert json.loads(inputs["e2e/training"].dataset.source)["uri"].endswith("e2e/trainset.csv")
    assert {t.key: t.value for t in inputs["e2e/evaluation"].tags}["rows"] == "10"
    assert (
        "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    )
    artifacts = set(_artifacts(client, run.info.run_id))
    assert {
        "plan.json",
        "run_config.json",
        "ds_config.json",
        "summary.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "plots/importance.png",
        "plots/loss.png",
        "eval/predictions_sample.jsonl",
        "eval/metrics.json",
        "eval/base/metrics.json",
    } <= artifacts
    png = client.download_artifacts(run.info.run_id, "plots/importance.png", str(out[output]) + "_dl")
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_builds_the_table_and_both_plots(runs, tmp_path):
    out, _ = runs
    result, rows = run_compare("local-exp", out["local_store"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "comparison.md").read_text().splitlines()
    assert result.stdout.startswith("\n".join(lines))
    assert lines[0].startswith(
        "| run | status | method | selection | threshold | kept q_proj | kept v_proj | "
        "trainable params | % of LoRA | bleu | rouge_l |"
    )
    assert set(rows) == {"one-rank", "zero2-torchrun"}
    for name, output in (("one-rank", "one_rank"), ("zero2-torchrun", "zero2_torchrun")):
        with open(os.path.join(out[output], "summary.json")) as handle:
            summary = json.load(handle)
        row = rows[name]
        assert row[1:5] == ["FINISHED", "loradrop", "output_norm", "0.6"]
        assert (
            row[5] == f"{len(summary['retained']['q_proj'])}/8"
            and row[6] == f"{len(summary['retained']['v_proj'])}/8"
        )
        assert int(row[7]) == summary["trainable_parameters"]
        assert float(row[8]) == pytest.approx(
            100 * summary["trainable_parameters"] / summary["lora_parameters"], abs=0.05
        )
        assert float(row[9]) == pytest.approx(summary["eval_metrics"]["bleu"], abs=0.005)
    assert (tmp_path / "comparison.md").read_text().startswith("| run |")
    assert (tmp_path / "comparison.csv").read_text().splitlines()[0].startswith("run,status,method")
    for png in ("metric_vs_parameters.png", "importance_profiles.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_export_format_gives_the_trained_models_logits(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ds_loradrop.recipes.export import export_run, load_adapted_model

    out, _ = runs
    trained, config = load_adapted_model(os.path.join(out["one_rank"], "adapter"))
    ids = torch.randint(4, 500, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32)(
            ids
        ).logits
    assert (reference - base_logits).abs().max() > 1e-3  # the adapters matter
    exported = {
        fmt: export_run(out["one_rank"], fmt, str(tmp_path / fmt)) for fmt in ("peft", "merged", "loradrop")
    }

    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    plan = _plan(out["one_rank"])
    adapted_layers = sum(8 - len(t["dropped"]) for t in plan["targets"].values())
    assert len(peft_config["target_modules"]) == adapted_layers == 16 and peft_config["r"] == 8
    peft_weights = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(peft_weights) == 2 * 16  # shared adapters copied into every layer that uses them
    base = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32)
    models = {
        "peft": PeftModel.from_pretrained(base, exported["peft"]).eval(),
        "merged": AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32).eval(),
        "loradrop": load_adapted_model(exported["loradrop"])[0],
    }
    for fmt, model in models.items():
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5, msg=fmt)
    assert sorted(os.listdir(exported["loradrop"])) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "export.json",
        "plan.json",
    ]
    assert not [name for name in os.listdir(exported["merged"]) if name.endswith((".bin", ".pt", ".pth"))]


def test_export_refuses_a_run_without_adapter_and_a_used_directory(tmp_path, runs):
    from launching import run_in_process  # export.py starts no process group: in this process

    out, _ = runs
    export = os.path.join(REPO_ROOT, "launch", "export.py")
    result = run_in_process(export, "--run", str(tmp_path), "--format", "peft")
    assert result.returncode == 2 and "has no final adapter" in result.stderr.strip().splitlines()[-1]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = run_in_process(
        export,
        "--run",
        out["one_rank"],
        "--format",
        "merged",
        "--output_dir",
        str(tmp_path / "taken"),
    )
    assert result.returncode == 2 and "is not empty" in result.stderr.strip().splitlines()[-1]
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    # an adapter whose target names the base model does not have: refused, nothing written
    import shutil

    foreign = tmp_path / "foreign_run"
    shutil.copytree(os.path.join(out["one_rank"], "adapter"), foreign / "adapter")
    config = json.loads((foreign / "adapter" / "adapter_config.json").read_text())
    config["layers"]["qkv_proj"] = config["layers"].pop("q_proj")
    (foreign / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    result = run_in_process(
        export,
        "--run",
        str(foreign),
        "--format",
        "peft",
        "--output_dir",
        str(tmp_path / "peft"),
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "LoRA target 'qkv_proj' matches no nn.Linear module" in last, (
        result.stderr
    )
    assert not (tmp_path / "peft").exists() and not [
        p for p in os.listdir(tmp_path) if p.startswith(".exporting")
    ]
