"""Run status and tracking faults, through the real entry point (one rank each)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT, free_port
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

TRAIN = os.path.join(REPO_ROOT, "launch", "train.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, e2e_dir):
    root = tmp_path_factory.mktemp("tracking")
    env = {**os.environ, "DS_LORADROP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    store = f"sqlite:///{root / 'mlflow.db'}"
    args = ["--data_dir", e2e_dir, "--ds_config", os.path.join(REPO_ROOT, "ds_configs", "zero3.json"),
            "--max_train_samples", "256", "--per_device_train_batch_size", "8", "--max_eval_samples", "4",
            "--max_new_tokens", "6", "--logging_steps", "2", "--mlflow_experiment", "faults"]
    return root, env, store, args


def _run(command, env, timeout=600):
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _status(store, run_name):
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                               filter_string=f"attributes.run_name = '{run_name}'")
    return run.info.status


def test_tracking_server_down_does_not_stop_training(setup):
    root, env, _, args = setup
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    result = _run([sys.executable, TRAIN, *args, "--method", "lora", "--max_steps", "4", "--eval_steps", "2",
                   "--output_dir", str(root / "down"), "--mlflow_tracking_uri", dead, "--run_name", "down"], env)
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
    result = _run([sys.executable, TRAIN, *args, "--method", "lora", "--max_steps", "4",
                   "--output_dir", str(root / "fallback"), "--mlflow_tracking_uri", dead, "--run_name", "fallback",
                   "--mlflow_fallback_local", "true"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "falling back to the local store" in result.stdout
    local = f"sqlite:///{root / 'fallback' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=local)
    [run] = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["drop.method"] == "lora"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]


def test_a_run_whose_training_raises_ends_failed(setup):
    root, env, store, args = setup
    # A checkpoint whose weights file is cut short: config and tokenizer load, the weights do not.
    from ds_loradrop.models import TinyLlamaSpec, ensure_tiny_llama
    from ds_loradrop.tasks import get_task

    spec = TinyLlamaSpec()
    text = get_task("e2e").training_text(args[1], spec.tokenizer_rows)
    good = ensure_tiny_llama(text, str(root / "cache"), spec)
    broken = root / "broken-model"
    shutil.copytree(good, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = _run([sys.executable, TRAIN, *args, "--model", str(broken), "--max_steps", "2",
                   "--output_dir", str(root / "failed"), "--mlflow_tracking_uri", store, "--run_name", "failed"], env)
    assert result.returncode != 0
    assert _status(store, "failed") == "FAILED"


def test_sigterm_ends_the_run_killed(setup):
    root, env, store, args = setup
    process = subprocess.Popen([sys.executable, TRAIN, *args, "--max_steps", "400", "--output_dir", str(root / "killed"),
                                "--mlflow_tracking_uri", store, "--run_name", "killed"],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if "stage1 step 2/" in line:
                break
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert _status(store, "killed") == "KILLED"
