"""Run status and tracking faults, through the real entry point (one rank each)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT, run_compare
from launching import one_rank
from mlflow import MlflowClient

from ds_loradrop.training.distributed import free_port

pytestmark = pytest.mark.integration

TRAIN = os.path.join(REPO_ROOT, "launch", "train.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, e2e_dir):
    root = tmp_path_factory.mktemp("tracking")
    env = {**os.environ, "DS_LORADROP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    store = f"sqlite:///{root / 'mlflow.db'}"
    args = [
        "--data_dir",
        e2e_dir,
        "--model",
        "tiny-llama",
        "--ds_config",
        os.path.join(REPO_ROOT, "ds_configs", "zero3.json"),
        "--max_train_samples",
        "256",
        "--per_device_train_batch_size",
        "8",
        "--max_eval_samples",
        "4",
        "--val_loss_samples",
        "8",
        "--max_new_tokens",
        "6",
        "--logging_steps",
        "2",
        "--mlflow_experiment",
        "faults",
        "--mlflow_log_model",  # on only where it is the subject (full fine-tuning below)
        "false",
    ]
    return root, env, store, args


def _run(command, env, timeout=600):
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _status(store, run_name):
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
    )
    return run.info.status


def test_tracking_server_down_does_not_stop_training(setup):
    root, env, _, args = setup
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    result = _run(
        [
            *one_rank(TRAIN),
            *args,
            "--method",
            "lora",
            "--max_steps",
            "4",
            "--eval_steps",
            "2",
            "--output_dir",
            str(root / "down"),
            "--mlflow_tracking_uri",
            dead,
            "--run_name",
            "down",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if "MLflow tracking at" in line]
    assert len(warnings) == 1 and dead in warnings[0] and "training goes on without tracking" in warnings[0]
    assert os.path.isfile(root / "down" / "adapter" / "adapter_model.safetensors")
    # --eval_steps 2 over 4 steps: one evaluation during training, one at the end
    assert os.path.isfile(root / "down" / "eval" / "step-2" / "metrics.json")
    assert not os.path.exists(root / "down" / "eval" / "step-4")
    assert os.path.isfile(root / "down" / "eval" / "metrics.json")
    assert time.time() - started < 240

    # with --mlflow_fallback_local the run lands in <output_dir>/mlflow.db, complete
    result = _run(
        [
            *one_rank(TRAIN),
            *args,
            "--method",
            "lora",
            "--max_steps",
            "4",
            "--output_dir",
            str(root / "fallback"),
            "--mlflow_tracking_uri",
            dead,
            "--run_name",
            "fallback",
            "--mlflow_fallback_local",
            "true",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "falling back to the local store" in result.stdout
    local = f"sqlite:///{root / 'fallback' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=local)
    [run] = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["finetuning.method"] == "lora"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]


def test_a_run_whose_training_raises_ends_failed(setup):
    root, env, store, args = setup
    # A checkpoint whose weights file is cut short: config and tokenizer load, the weights do not.
    from ds_loradrop.data.tasks import get_task
    from ds_loradrop.models.loading import TinyLlamaSpec, ensure_tiny_llama

    spec = TinyLlamaSpec()
    text = get_task("e2e").training_text(args[1], spec.tokenizer_examples)
    good = ensure_tiny_llama(text, str(root / "cache"), spec)
    broken = root / "broken-model"
    shutil.copytree(good, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = _run(
        [
            *one_rank(TRAIN),
            *args,
            "--model",
            str(broken),
            "--max_steps",
            "2",
            "--output_dir",
            str(root / "failed"),
            "--mlflow_tracking_uri",
            store,
            "--run_name",
            "failed",
        ],
        env,
    )
    # the contract: a failure that is not a usage error exits 1 with its traceback, and the run is FAILED
    assert result.returncode == 1, result.stderr[-3000:]
    assert (
        "Traceback (most recent call last)" in result.stderr
        and "error:" not in result.stderr.splitlines()[-1]
    )
    assert "safetensor" in result.stderr.lower()  # the cut weights file is what raised
    assert _status(store, "failed") == "FAILED"


def test_sigterm_writes_a_checkpoint_and_the_resumed_run_finishes(setup):
    """SIGTERM in stage 1 (preemption): the step finishes, a checkpoint is written (no --save_steps
    needed), the run ends KILLED; --resume auto continues stage 1 from it and ends FINISHED in the same
    MLflow run. --max_seq_length 40 truncates examples: counted, logged and tracked."""
    import json

    root, env, store, args = setup
    out = root / "preempted"
    common = [
        *args,
        "--sample_ratio",
        "1.0",
        "--max_train_samples",  # 64 rows, global batch 8: stage 1 3 x 8 = 24 steps, stage 2 8
        "64",
        "--max_steps",
        "400",
        "--max_seq_length",
        "40",
        "--output_dir",
        str(out),
        "--mlflow_tracking_uri",
        store,
        "--run_name",
        "preempted",
    ]
    process = subprocess.Popen(
        [sys.executable, TRAIN, *common],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if "stage1 step 2/" in line:
                process.send_signal(signal.SIGTERM)
                break
        seen.extend(process.stdout)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    log = "".join(seen)
    assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert _status(store, "preempted") == "KILLED"
    [stopped] = re.findall(r"stage1: signal 15 received; stopping after step (\d+)", log)
    [checkpoint] = os.listdir(out / "checkpoints")
    assert checkpoint == f"stage1-step-{int(stopped):06d}" and 2 <= int(stopped) < 24
    assert "stopped: terminated by signal 15" in log and "Traceback" not in log
    truncated = re.findall(r"(\d+) of 64 examples truncated to 40 tokens", log)
    assert truncated and int(truncated[0]) > 0

    resumed = _run([*one_rank(TRAIN), *common, "--resume", "auto"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage1: resumed from {out / 'checkpoints' / checkpoint} at step {stopped}/24" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_truncated"] == int(truncated[0])
    assert [stage["num_steps"] for stage in summary["stages"]] == [24, 8]
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id],
        filter_string="attributes.run_name = 'preempted'",
    )
    assert run.info.status == "FINISHED" and run.data.metrics["data/num_truncated"] == int(truncated[0])


def test_a_diverged_loss_stops_naming_the_step_and_keeps_earlier_checkpoints(setup):
    """AdamW at lr 1e37 turns the adapters non-finite after the first step."""
    root, env, store, args = setup
    out = root / "diverged"
    result = _run(
        [
            *one_rank(TRAIN),
            *args,
            "--method",
            "lora",
            "--max_steps",
            "6",
            "--save_steps",
            "1",
            "--learning_rate",
            "1e37",
            "--output_dir",
            str(out),
            "--mlflow_tracking_uri",
            store,
            "--run_name",
            "diverged",
        ],
        env,
    )
    assert result.returncode == 3
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(
        "error: train step 2/6: the loss is nan; stopping before this step is checkpointed"
    )
    assert "Traceback" not in result.stderr
    assert os.listdir(out / "checkpoints") == ["train-step-000001"]
    assert not os.path.exists(out / "adapter")
    assert _status(store, "diverged") == "FAILED"


def test_importance_recorded_during_the_last_stage1_epoch(setup):
    """--importance_pass last_epoch: no separate pass; the plan covers the last epoch's tokens."""
    import json

    root, env, store, args = setup
    out = root / "last_epoch"
    result = _run(
        [
            *one_rank(TRAIN),
            *args,
            "--importance_pass",
            "last_epoch",
            "--sample_ratio",
            "0.25",
            "--stage1_max_steps",  # stage 1 whole (3 epochs of 8 steps); stage 2 is not the subject
            "24",
            "--max_steps",
            "2",
            "--output_dir",
            str(out),
            "--mlflow_tracking_uri",
            store,
            "--run_name",
            "last-epoch",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 64 sampled rows, global batch 8: 8 steps per epoch, 24 in 3 epochs; the last epoch is steps 17-24
    assert "importance recorded during stage 1's last epoch (steps 17-24)" in result.stdout
    assert "importance measured over" not in result.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert all(g > 0 for g in plan["targets"]["q_proj"]["importance"])
    # what was recorded: exactly one epoch over the stage-1 sample (every non-padding token of its 64
    # rows once), not the whole stage, not the first epoch's batches twice
    from ds_loradrop.models.loading import load_tokenizer
    from ds_loradrop.recipes.cli import parse_run_config
    from ds_loradrop.recipes.importance import stage1_sample

    cfg = parse_run_config(["--config", str(out / "run_config.json")])
    model_path = json.loads((out / "run_config.json").read_text())["resolved"]["model_path"]
    sample = stage1_sample(cfg, load_tokenizer(model_path))
    assert len(sample) == 64 and plan["num_sampled"] == 64
    assert plan["num_tokens"] == sum(len(row["input_ids"]) for row in sample)


def test_ablation_variants_and_carried_stage2_adapters(setup):
    """--selection random --low_importance drop --stage2_init carry through the real pipeline."""
    from safetensors.torch import load_file

    root, env, _, args = setup
    out = root / "variants"
    # a learning rate of 1e-9 leaves stage 2 where it started: the carried stage-1 weights
    result = _run(
        [
            *one_rank(TRAIN),
            *args,
            "--max_steps",
            "3",
            "--selection",
            "random",
            "--threshold",
            "0.5",
            "--low_importance",
            "drop",
            "--stage2_init",
            "carry",
            "--learning_rate",
            "1e-9",
            "--output_dir",
            str(out),
            "--report_to",
            "none",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    plan = json.loads((out / "plan.json").read_text())
    assert plan["selection"] == "random" and plan["low_importance"] == "drop"
    stage1 = load_file(str(out / "stage1_adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    for name, target in plan["targets"].items():
        assert target["shared"] == [] and sorted(target["retained"] + target["dropped"]) == list(range(8))
        assert 0 < len(target["retained"]) < 8
        assert [config["layers"][name][i] for i in target["dropped"]] == [None] * len(target["dropped"])
        for layer in target["retained"]:
            for part in ("lora_A", "lora_B"):
                key = f"{name}.layers.{layer}.{part}"
                torch_close = (final[key] - stage1[key]).abs().max().item()
                assert torch_close < 1e-6, key
        assert not [key for key in final if key.startswith(f"{name}.shared")]
    assert len(final) == 2 * sum(len(t["retained"]) for t in plan["targets"].values())


def test_full_fine_tuning_saves_a_loadable_checkpoint(setup):
    root, env, _, args = setup
    out = root / "full"
    result = _run(
        [
            *one_rank(TRAIN),
            *args,
            "--method",
            "full",
            "--max_steps",
            "2",
            "--output_dir",
            str(out),
            "--mlflow_tracking_uri",
            setup[2],
            "--run_name",
            "full",
            "--learning_rate",
            "1e-3",
            "--mlflow_log_model",
            "true",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    import torch
    from transformers import AutoModelForCausalLM

    summary = json.loads((out / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((out / "run_config.json").read_text())["resolved"]["model_path"]
    )
    changed = [n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert len(changed) > 50  # every weight trained, not only adapters
    assert "trainable parameters: full" in result.stdout

    # The MLflow model is the whole checkpoint (no PEFT adapter, no base-model reference), logged instead of
    # a second copy of it among the run's artifacts, and generates what the run's evaluation generated.
    from conftest import logged_model_predictions
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=setup[2])
    [run] = client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id], filter_string="attributes.run_name = 'full'"
    )
    uri = f"runs:/{run.info.run_id}/model"
    assert run.data.tags["mlflow_model"] == uri
    assert client.get_logged_model(run.data.tags["mlflow_model_id"]).source_run_id == run.info.run_id
    assert "model" not in {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    generated, own = logged_model_predictions(setup[2], out / "eval" / "predictions.jsonl", [uri])
    assert [text.strip() for text in generated[uri]["pyfunc"]] == own
    assert (
        "peft_adaptor" not in generated[uri]["flavor"]
        and "local_base_model_path" not in generated[uri]["flavor"]
    )


@pytest.fixture(scope="module")
def whole(setup):
    """An uninterrupted 8-step LoRA-drop run (checkpoints every 2 steps) and the flags it ran with."""
    root, env, store, args = setup
    common = [
        *args,
        "--max_steps",
        "8",
        "--save_steps",
        "2",
        "--save_total_limit",
        "2",
        "--logging_steps",
        "1",
        "--mlflow_tracking_uri",
        store,
    ]
    done = _run([*one_rank(TRAIN), *common, "--output_dir", str(root / "whole"), "--run_name", "whole"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "whole", common


def _max_adapter_difference(run_a, run_b) -> float:
    from safetensors.torch import load_file

    expected = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    actual = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    assert sorted(actual) == sorted(expected)
    return max((actual[k] - expected[k]).abs().max().item() for k in expected)


def test_killed_in_stage2_and_resumed_ends_like_an_uninterrupted_run(setup, whole):
    """Kill (SIGKILL) after the step-4 checkpoint of stage 2, resume with --resume auto: the same plan and
    adapters as a run that was never interrupted, stage 1 not rerun, one MLflow run continued."""
    import json

    root, env, store, _ = setup
    whole_dir, common = whole
    out = root / "resumed"
    process = subprocess.Popen(
        [sys.executable, TRAIN, *common, "--output_dir", str(out), "--run_name", "resumed"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in process.stdout:
            if "stage2 step 5/8" in line:
                process.kill()
                break
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(out / "adapter")
    checkpoints = sorted(os.listdir(out / "checkpoints"))
    assert checkpoints == ["stage2-step-000002", "stage2-step-000004"]  # --save_total_limit 2

    resumed = _run(
        [
            *one_rank(TRAIN),
            *common,
            "--output_dir",
            str(out),
            "--run_name",
            "resumed",
            "--resume",
            "auto",
        ],
        env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 1 finished before: using its plan" in resumed.stdout
    assert "stage2: resumed from" in resumed.stdout and "stage2-step-000004 at step 4/8" in resumed.stdout
    assert "stage1 step" not in resumed.stdout
    assert json.loads((out / "plan.json").read_text()) == json.loads((whole_dir / "plan.json").read_text())
    assert _max_adapter_difference(whole_dir, out) <= 1e-6
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id],
        filter_string="attributes.run_name = 'resumed'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "stage2/loss")]
    assert steps[-1] == 8 and {1, 2, 3, 4, 5, 6, 7, 8} <= set(steps)

    # a changed configuration is refused before anything is touched
    refused = _run(
        [*one_rank(TRAIN), *common, "--output_dir", str(out), "--resume", "auto", "--lora_r", "4"], env
    )
    assert (
        refused.returncode == 2
        and "--resume with a changed configuration (lora.lora_r, lora.lora_alpha)" in refused.stderr
    )  # alpha = 2 r


def test_stop_after_stage1_then_resume_trains_stage2_like_an_uninterrupted_run(setup, whole):
    """--stop_after_stage1 writes the plan and the stage-1 adapter and nothing of stage 2 (MLflow run
    FINISHED, completed=stage1); the same command without it and with --resume auto trains stage 2 from
    that plan (stage 1 not rerun) and ends like the uninterrupted run, in the same MLflow run."""
    import json

    root, env, store, _ = setup
    whole_dir, common = whole
    out = root / "stage1_first"
    command = [*one_rank(TRAIN), *common, "--output_dir", str(out), "--run_name", "stage1-first"]
    stopped = _run([*command, "--stop_after_stage1"], env)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopping after stage 1 (--stop_after_stage1)" in stopped.stdout
    assert (out / "stage1_adapter" / "plan.json").is_file() and (out / "plan.json").is_file()
    for stage2_file in ("adapter", "summary.json", "eval/metrics.json"):  # eval/base/: stage 1's
        assert not (out / stage2_file).exists(), stage2_file
    assert not any(name.startswith("stage2") for name in os.listdir(out / "checkpoints"))
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id],
        filter_string="attributes.run_name = 'stage1-first'",
    )
    assert run.info.status == "FINISHED" and run.data.tags["completed"] == "stage1"

    resumed = _run([*command, "--resume", "auto"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 1 finished before: using its plan" in resumed.stdout and "stage1 step" not in resumed.stdout
    assert json.loads((out / "plan.json").read_text()) == json.loads((whole_dir / "plan.json").read_text())
    assert _max_adapter_difference(whole_dir, out) <= 1e-6
    [run] = client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id],
        filter_string="attributes.run_name = 'stage1-first'",
    )
    assert run.info.status == "FINISHED" and run.data.tags["completed"] == "all"
    assert run.data.metrics["trainable_parameters"] > 0


def test_compare_lists_lora_loradrop_full_and_unfinished_runs(setup, whole, tmp_path):
    """launch/compare.py over the experiment the tests above filled (they run first, in file order), after
    one more run: plain LoRA."""
    import json

    root, env, store, args = setup
    lora = _run(
        [
            *one_rank(TRAIN),
            *args,
            "--method",
            "lora",
            "--max_steps",
            "3",
            "--output_dir",
            str(root / "lora"),
            "--mlflow_tracking_uri",
            store,
            "--run_name",
            "lora",
        ],
        env,
    )
    assert lora.returncode == 0, lora.stderr[-3000:]
    result, rows = run_compare("faults", store, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith((tmp_path / "comparison.md").read_text())
    assert rows["lora"][1:9] == ["FINISHED", "lora", "-", "-", "8/8", "8/8", str(16 * 8 * 256), "100.0"]
    assert rows["failed"][1] == rows["diverged"][1] == "FAILED" and rows["preempted"][1] == "FINISHED"
    whole = json.loads((root / "whole" / "summary.json").read_text())
    assert rows["whole"][1:5] == ["FINISHED", "loradrop", "output_norm", "0.9"]
    assert rows["whole"][5] == f"{len(whole['retained']['q_proj'])}/8"
    assert int(rows["whole"][7]) == whole["trainable_parameters"] < 16 * 8 * 256
    assert float(rows["whole"][9]) == pytest.approx(whole["eval_metrics"]["bleu"], abs=0.005)
    full = json.loads((root / "full" / "summary.json").read_text())
    assert rows["full"][2] == "full" and int(rows["full"][7]) == full["trainable_parameters"]
    csv_rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert len(csv_rows) == len(rows) + 1
    grouped = (tmp_path / "comparison_grouped.md").read_text().splitlines()
    assert grouped[0].startswith("| configuration | n | seeds | method |") and grouped[0] in result.stdout
    groups = [[c.strip() for c in line.split("|")[1:-1]] for line in grouped[2:]]
    assert sum(int(g[1]) for g in groups) == sum(1 for cells in rows.values() if cells[1] == "FINISHED")


def test_runs_that_differ_only_in_the_seed_form_one_group_with_mean_std_and_n():
    from ds_loradrop.tracking.compare import RunRow, group_by_configuration, grouped_table

    def row(name, seed, threshold, bleu, status="FINISHED", output_dir=None):
        params = {
            "finetuning.method": "loradrop",
            "drop.threshold": threshold,
            "train.seed": seed,
            "train.output_dir": output_dir or f"runs/{name}",
            "tracking.run_name": name,
        }
        return RunRow(
            run_name=name,
            run_id=name,
            status=status,
            method="loradrop",
            selection="output_norm",
            threshold=threshold,
            kept={"q_proj": "4/8"},
            trainable_parameters=1000,
            share_of_lora=50.0,
            metrics={"bleu": bleu},
            params=params,
            seed=seed,
        )

    rows = [
        row("a1", "1", "0.9", 50.0),
        row("b1", "1", "0.8", 40.0),
        row("a2", "2", "0.9", 52.0),
        row("a3", "3", "0.9", 54.0),
        row("a4", "4", "0.9", 99.0, status="FAILED"),
        row("b2", "2", "0.8", 41.0),
    ]
    groups = group_by_configuration(rows)
    assert [g.label for g in groups] == ["drop.threshold=0.9", "drop.threshold=0.8"]
    assert [[r.run_name for r in g.rows] for g in groups] == [["a1", "a2", "a3"], ["b1", "b2"]]
    header, body = grouped_table(groups)
    assert header[:3] == ["configuration", "n", "seeds"] and header[-1] == "bleu"
    # mean 52, sample std sqrt(((50-52)^2 + 0 + (54-52)^2) / 2) = 2; the FAILED run is left out
    assert body[0][1:3] == ["3", "1,2,3"] and body[0][-1] == "52.00 ± 2.00"
    assert body[1][1] == "2" and body[1][-1] == "40.50 ± 0.71"
    assert grouped_table(group_by_configuration([rows[0]]))[1][0][-1] == "50.00"  # n = 1: no spread
