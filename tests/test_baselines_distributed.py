"""VeRA, Tied-LoRA and SNIP-pruned LoRA through the real launchers: 2 ranks under ZeRO-3 equal one rank
under ZeRO-2, a resumed 2-rank run equals both, every export format gives the trained model's logits (or
refuses with the formats that work), and launch/compare.py puts every method in one table.

Per method two launches (~40 s of start-up each): one rank (python, ZeRO-2) and two ranks (deepspeed,
ZeRO-3, checkpoints every 4 steps). Sparse Adapter's 2-rank run is also resumed from its step-4 checkpoint:
it is the one baseline with state of its own beyond the engine's (SNIP's masks, never recomputed); the
others' trainable tensors are engine parameters like LoRA's, whose resume the other tests cover.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from conftest import REPO_ROOT, run_compare
from launching import one_rank
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

METHODS = {
    "vera": ["--vera_r", "32"],
    "tied_lora": ["--tied_lora_r", "16"],
    "sparse_lora": ["--snip_examples", "40"],
}
RESUMED = ("sparse_lora",)


@pytest.fixture(scope="session")
def baseline_runs(tmp_path_factory, e2e_dir):
    from launching import COMMON, TRAIN, direct, global_batch, job_env, launch, one_rank, write_ds_config

    root = tmp_path_factory.mktemp("baselines")
    env = job_env(root)
    zero3, zero2 = write_ds_config(root / "zero3.json", 3), write_ds_config(root / "zero2.json", 2)
    store = f"sqlite:///{root / 'mlflow.db'}"
    out, logs = {}, {}
    for method, settings in METHODS.items():
        common = [
            "--data_dir",
            e2e_dir,
            *COMMON,
            "--method",
            method,
            *settings,
            "--save_steps",
            "4",
            "--mlflow_tracking_uri",
            store,
            "--mlflow_experiment",
            "baselines",
        ]
        one, two = str(root / f"{method}_one_rank"), str(root / f"{method}_zero3_2ranks")
        logs[(method, "one_rank")] = launch(
            one_rank(
                TRAIN,
                "--ds_config",
                zero2,
                *global_batch(1, 4),
                "--output_dir",
                one,
                "--run_name",
                f"{method}-one-rank",
                *common,
                "--mlflow_log_model",  # each method's one-rank run logs its MLflow model
                "true",
            ),
            env,
        ).stdout
        two_ranks = direct(
            TRAIN,
            "--ds_config",
            zero3,
            *global_batch(2, 2),  # ZeRO-3 accumulating on 2 ranks: here (tests/launching.py)
            "--output_dir",
            two,
            "--run_name",
            f"{method}-2ranks",
            *common,
        )
        logs[(method, "zero3_2ranks")] = launch(two_ranks, env).stdout
        out[method] = {"one_rank": one, "zero3_2ranks": two}
        if method not in RESUMED:
            continue
        # Keep what a job killed after step 4 leaves (its step-4 checkpoint, and for sparse_lora the masks),
        # then continue it: the resumed run must end where the uninterrupted ones did.
        resumed = str(root / f"{method}_resumed")
        shutil.copytree(
            two, resumed, ignore=shutil.ignore_patterns("*step-000008", "adapter", "summary.json", "eval")
        )
        two_ranks[two_ranks.index(two)] = resumed
        two_ranks[two_ranks.index(f"{method}-2ranks")] = f"{method}-resumed"
        logs[(method, "resumed")] = launch(two_ranks + ["--resume", "auto"], env).stdout
        out[method]["resumed"] = resumed
    return out, logs, store


def _adapter(directory):
    return load_file(os.path.join(directory, "adapter", "adapter_model.safetensors"))


def _summary(directory):
    with open(os.path.join(directory, "summary.json")) as handle:
        return json.load(handle)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_zero3_and_the_resumed_run_equal_one_rank(baseline_runs, method):
    out, logs, _ = baseline_runs
    reference = _adapter(out[method]["one_rank"])
    for other in [name for name in out[method] if name != "one_rank"]:
        candidate = _adapter(out[method][other])
        assert sorted(candidate) == sorted(reference)
        for key, value in reference.items():
            # ZeRO-2 on one rank against ZeRO-3 on two: the ZeRO-2 tolerance of test_distributed.py
            torch.testing.assert_close(
                candidate[key], value, rtol=5e-5, atol=5e-5, msg=f"{method} {other} {key}"
            )
    if method in RESUMED:
        assert re.search(r"resumed from .*step-000004 at step 4/8", logs[(method, "resumed")])
    lines = re.findall(
        r"\[ds_loradrop rank(\d)\] train: \d+ trainable parameters; ZeRO stage 3: (\d+)/(\d+) tensors "
        r"partitioned",
        logs[(method, "zero3_2ranks")],
    )
    assert sorted(rank for rank, *_ in lines) == ["0", "1"]
    assert all(int(partitioned) == int(total) > 50 for _, partitioned, total in lines)
    trained = _summary(out[method]["one_rank"])
    assert (
        trained["eval_metrics"]["num_examples"] == 10 and trained["base_eval_metrics"]["num_examples"] == 10
    )
    assert trained["method"] == method and trained["lora_parameters"] == 16 * 8 * (128 + 128)


def test_each_method_learns_and_is_counted_as_its_paper_counts(baseline_runs):
    out, logs, _ = baseline_runs
    tensors = {method: _adapter(out[method]["one_rank"]) for method in METHODS}
    # VeRA: r + out per layer (16 layers of 128 -> 128), the frozen 32 x 128 pair stored once, not counted
    assert _summary(out["vera"]["one_rank"])["trainable_parameters"] == 16 * (32 + 128)
    assert tensors["vera"]["vera_projection.vera_A"].shape == (32, 128)
    assert len([k for k in tensors["vera"] if k.startswith("vera_projection.")]) == 2
    assert all(
        tensors["vera"][f"{t}.layers.{i}.vera_lambda_b"].abs().max() > 0
        for t in ("q_proj", "v_proj")
        for i in range(8)
    )
    # Tied-LoRA: one pair per target (16 x (128 + 128)), u and v per layer
    assert _summary(out["tied_lora"]["one_rank"])["trainable_parameters"] == 2 * 16 * 256 + 16 * (16 + 128)
    assert sorted(k for k in tensors["tied_lora"] if ".tied." in k) == [
        "q_proj.tied.lora_A",
        "q_proj.tied.lora_B",
        "v_proj.tied.lora_A",
        "v_proj.tied.lora_B",
    ]
    assert tensors["tied_lora"]["q_proj.tied.lora_B"].abs().max() > 0
    # SNIP: half of LoRA's entries, the same masks on every launcher, pruned entries stay zero
    sparse = out["sparse_lora"]
    assert _summary(sparse["one_rank"])["trainable_parameters"] == 16 * 8 * 256 // 2
    masks = {name: load_file(os.path.join(sparse[name], "sparse_masks.safetensors")) for name in sparse}
    for key, mask in masks["one_rank"].items():
        assert torch.equal(masks["zero3_2ranks"][key], mask) and torch.equal(masks["resumed"][key], mask)
    weights = tensors["sparse_lora"]
    for key in (k for k in weights if k.endswith(("lora_A", "lora_B"))):
        mask = weights[key.replace("lora_", "mask_")]
        assert torch.all(weights[key][~mask] == 0) and weights[key][mask].abs().max() > 0
    assert "SNIP finished before: using its masks" in logs[("sparse_lora", "resumed")]
    assert (
        "trainable parameters: LoRA 32768 | sparse_lora 16384 (50.0% of LoRA)"
        in logs[("sparse_lora", "one_rank")]
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_exports_give_the_trained_models_logits_or_name_the_formats_that_work(
    baseline_runs, method, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ds_loradrop.errors import UsageError
    from ds_loradrop.recipes.export import export_run, load_adapted_model

    out, _, _ = baseline_runs
    run = out[method]["one_rank"]
    trained, config = load_adapted_model(os.path.join(run, "adapter"))
    ids = torch.randint(4, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32)(
            ids
        ).logits
    assert (reference - base_logits).abs().max() > 1e-4
    formats = ("merged", "loradrop") + (() if method == "tied_lora" else ("peft",))
    models = {}
    for fmt in formats:
        exported = export_run(run, fmt, str(tmp_path / fmt))
        if fmt == "peft":
            base = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32)
            models[fmt] = PeftModel.from_pretrained(base, exported).eval()
        elif fmt == "merged":
            models[fmt] = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        else:
            models[fmt] = load_adapted_model(exported)[0]
    for fmt, model in models.items():
        with torch.no_grad():
            torch.testing.assert_close(
                model(ids).logits, reference, rtol=1e-5, atol=1e-5, msg=f"{method} {fmt}"
            )
    if method == "tied_lora":
        with pytest.raises(
            UsageError,
            match=re.escape(
                "--format peft cannot express a tied_lora adapter (PEFT has "
                "no such method); the formats that work for it are merged "
                "and loradrop"
            ),
        ):
            export_run(run, "peft", str(tmp_path / "peft"))
        assert not (tmp_path / "peft").exists()


def test_compare_puts_every_method_in_one_table(baseline_runs, tmp_path):
    out, _, store = baseline_runs
    result, rows = run_compare("baselines", store, tmp_path)
    assert result.returncode == 0, result.stderr
    for method in METHODS:
        row = rows[f"{method}-one-rank"]
        assert row[1:3] == ["FINISHED", method]
        assert int(row[7]) == _summary(out[method]["one_rank"])["trainable_parameters"]
    assert (tmp_path / "metric_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"


def _runs_by_name(store, experiment):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    found = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])}


def test_logged_mlflow_models_generate_what_each_runs_evaluation_generated(baseline_runs):
    """VeRA and the pruned LoRA are logged as PEFT models a fresh process loads with mlflow.pyfunc and
    generates the run's own evaluation predictions with; Tied-LoRA (no PEFT form) says why it has none."""
    from conftest import logged_model_predictions

    out, logs, store = baseline_runs
    runs = _runs_by_name(store, "baselines")
    tied = runs["tied_lora-one-rank"].data.tags["mlflow_model"]
    assert tied.startswith("not logged: --method tied_lora has no PEFT form"), tied
    assert "no MLflow model logged: --method tied_lora" in logs[("tied_lora", "one_rank")]
    assert "mlflow_model" not in runs["vera-2ranks"].data.tags  # --mlflow_log_model false (COMMON)
    for method in ("vera", "sparse_lora"):
        run = runs[f"{method}-one-rank"]
        uri = f"runs:/{run.info.run_id}/model"
        assert run.data.tags["mlflow_model"] == uri
        assert f"MLflow model logged: mlflow.pyfunc.load_model({uri!r})" in logs[(method, "one_rank")]
        predictions = os.path.join(out[method]["one_rank"], "eval", "predictions.jsonl")
        generated, own = logged_model_predictions(store, predictions, [uri])
        assert [text.strip() for text in generated[uri]["pyfunc"]] == own, method


def test_compare_registers_the_best_run_by_a_metric_under_an_alias(baseline_runs):
    _, _, store = baseline_runs
    runs = _runs_by_name(store, "baselines")
    logged = [run for run in runs.values() if "mlflow_model_id" in run.data.tags]
    assert sorted(run.info.run_name for run in logged) == ["sparse_lora-one-rank", "vera-one-rank"]
    command = [*one_rank(os.path.join(REPO_ROOT, "launch", "compare.py")), "--experiment", "baselines"]
    command += ["--tracking_uri", store, "--register_best", "baseline-best", "--alias", "champion"]

    def register(*flags):
        return subprocess.run(command + list(flags), capture_output=True, text=True, timeout=300, check=False)

    missing = register("--metric", "eval/loss")
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: no finished run of experiment 'baselines' has both the metric 'eval/loss' and a logged"
        )
    )
    for lower in (False, True):
        result = register("--metric", "eval/rouge_l", *(["--lower_is_better"] if lower else []))
        assert result.returncode == 0, result.stderr[-2000:]
        sign = 1 if lower else -1
        best = min(logged, key=lambda run: (sign * run.data.metrics["eval/rouge_l"], run.info.start_time))
        assert f"registered run {best.info.run_name} ({best.info.run_id}, eval/rouge_l" in result.stdout
        assert result.stdout.strip().endswith(
            f"as models:/baseline-best/{2 if lower else 1} (alias 'champion')"
        )
    from mlflow import MlflowClient

    version = MlflowClient(tracking_uri=store).get_model_version_by_alias("baseline-best", "champion")
    assert int(version.version) == 2 and version.run_id == best.info.run_id
    assert version.tags["eval/rouge_l"] == str(best.data.metrics["eval/rouge_l"])


def test_importance_tool_refuses_adapters_without_lora_pairs(baseline_runs, tmp_path):
    out, _, _ = baseline_runs
    result = subprocess.run(
        [
            *one_rank(os.path.join(REPO_ROOT, "launch", "importance.py")),
            "--run",
            out["vera"]["one_rank"],
            "--adapter",
            os.path.join(out["vera"]["one_rank"], "adapter"),
            "--output_dir",
            str(tmp_path / "plan"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2 and not (tmp_path / "plan").exists()
    assert (
        "holds vera adapters; importance is measured on LoRA adapters"
        in result.stderr.strip().splitlines()[-1]
    )


def test_offline_evaluation_under_zero2_rebuilds_the_saved_adapters(baseline_runs, tmp_path, e2e_dir):
    """launch/evaluate.py over a Tied-LoRA adapter (tied pairs rebuilt once per target) with a ZeRO-2 config
    (an inference engine has no optimizer, which DeepSpeed's stage 2 requires): the same predictions as the
    run's own evaluation."""
    from launching import EVALUATE, job_env, launch

    out, _, _ = baseline_runs
    run = out["tied_lora"]["one_rank"]
    launch(
        [
            *one_rank(EVALUATE),
            "--ds_config",
            os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
            "--task",
            "e2e",
            "--split",
            "validation",
            "--data_dir",
            e2e_dir,
            "--adapter",
            os.path.join(run, "adapter"),
            "--output_dir",
            str(tmp_path / "eval"),
            "--max_eval_samples",
            "10",
            "--max_new_tokens",
            "12",
            "--eval_batch_size",
            "3",
        ],
        job_env(tmp_path),
    )

    def predictions(directory):
        with open(os.path.join(directory, "predictions.jsonl")) as handle:
            return [json.loads(line)["prediction"] for line in handle]

    assert predictions(tmp_path / "eval") == predictions(os.path.join(run, "eval"))
