"""Validation loss (the math, and a run that logs its curve to MLflow), the best adapter kept by it, and
the tokenised-data cache that lets a second run on the same data skip tokenisation."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, tiny_llama_model
from launching import TRAIN, job_env, launch, one_rank
from safetensors.torch import load_file

from ds_loradrop.data.batching import IGNORE_INDEX
from ds_loradrop.training.validation import validation_loss


class PlainEngine(torch.nn.Module):
    """What validation_loss needs of a DeepSpeed engine: ``module``, train/eval and a forward."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **inputs):
        return self.module(**inputs)


@pytest.mark.unit
def test_validation_loss_is_the_mean_over_target_tokens_whatever_the_batch_size():
    model = tiny_llama_model()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (5, 9, 7, 12, 6):
        ids = torch.randint(1, 64, (length,), generator=generator).tolist()
        prompt = length // 2
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((labels != IGNORE_INDEX).sum())
    engine = PlainEngine(model).train()
    for batch_size in (1, 2, 5):
        loss = validation_loss(
            engine, rows, batch_size=batch_size, pad_token_id=0, device=torch.device("cpu")
        )
        assert loss == pytest.approx(total / tokens, rel=1e-5)
    assert engine.module.training  # put back as it was


@pytest.mark.integration
def test_a_run_logs_the_validation_curve_keeps_the_best_adapter_and_reuses_tokenised_data(tmp_path, e2e_dir):
    import mlflow

    env = job_env(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--model", "tiny-llama", "--data_dir", e2e_dir, "--method", "lora",
        "--max_train_samples", "96", "--per_device_train_batch_size", "8", "--max_steps", "6",
        "--eval_steps", "2", "--generate_at_eval_steps", "false", "--val_loss_samples", "24",
        "--save_best_by", "val_loss", "--max_eval_samples", "6", "--max_new_tokens", "8",
        "--no_eval_base_model", "--learning_rate", "2e-3",
        "--ds_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
        "--mlflow_tracking_uri", store,
    ]  # fmt: skip
    first = launch([*one_rank(TRAIN), *args, "--output_dir", str(tmp_path / "a")], env)
    assert "training data: 96 examples tokenised; cached in" in first.stdout + first.stderr
    out = tmp_path / "a"
    summary = json.loads((out / "summary.json").read_text())
    (stage,) = summary["stages"]
    assert stage["val_loss"] is not None

    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("ds-loradrop").experiment_id])
    curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/val_loss")}
    assert sorted(curve) == [2, 4, 6] and curve[6] == pytest.approx(stage["val_loss"])
    assert run.info.status == "FINISHED" and "eval/bleu" in run.data.metrics

    best = json.loads((out / "best_adapter" / "best.json").read_text())
    best_step = min(curve, key=curve.get)
    assert best == {"metric": "val_loss", "value": pytest.approx(curve[best_step]), "step": best_step}
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    kept = load_file(str(out / "best_adapter" / "adapter_model.safetensors"))
    same = all(torch.equal(final[k], kept[k]) for k in final)
    assert same == (best_step == 6)  # the final adapter exactly when the best is the last step

    second = launch([*one_rank(TRAIN), *args, "--output_dir", str(tmp_path / "b")], env)
    log = second.stdout + second.stderr
    assert "training data: 96 examples' tokens loaded from the cache" in log
    assert "no tokenisation" in log and "examples tokenised" not in log
    again = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert again["stages"][0]["val_loss"] == stage["val_loss"]  # same rows, same run

    # other validation rows (a different selection of the same split): tokenised again, not reused
    fewer = [*args, "--val_loss_samples", "12", "--output_dir", str(tmp_path / "c")]
    log = launch([*one_rank(TRAIN), *fewer], env).stdout
    assert "validation: 12 examples tokenised" in log and "training data: 96 examples' tokens loaded" in log
