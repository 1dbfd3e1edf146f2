"""Shared fixtures: paths, a tiny Llama with fixed non-trivial weights, the real data directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from xdist_groups import pytest_itemcollected  # noqa: F401 - the hook (test groups), registered by this import

# No hub access here: fail fast on hub ids instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DeepSpeed JIT-builds CPU ops; keep the tests' builds apart from other environments' (see DEEPSPEED_NOTES).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO_ROOT, ".cache", "torch_extensions"))
# Every job builds them with the environment's ninja (pip's), as an activated environment would: a job that
# found another ninja on PATH (the system's 1.11 hashes a command unlike pip's 1.13) took the other's build
# for a changed one and rebuilt DeepSpeed's shared-memory op, ~45 s of CPU, each time the two alternated.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
sys.path.insert(0, REPO_ROOT)

SHARED_DATA = os.environ.get("DS_LORADROP_DATA_ROOT", os.path.join(REPO_ROOT, "..", "shared", "data"))


@pytest.fixture(scope="session")
def e2e_dir() -> str:
    path = os.path.join(SHARED_DATA, "e2e")
    if not os.path.isfile(os.path.join(path, "trainset.csv")):
        pytest.fail(f"the shared E2E data is missing at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """(cache directory, converted checkpoint) of the smollm2-135m preset, converted once per session: under
    pytest-xdist in the workers' common temporary directory, by the first worker to ask (30-50 s of CPU that
    the SmolLM2 and bf16 modules' workers would each spend)."""
    from filelock import FileLock

    from ds_loradrop.models.loading import ensure_smollm2

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this session's workers
    cache = root / "smollm2_cache"
    with FileLock(str(root / "smollm2_cache.lock")):
        return str(cache), ensure_smollm2(str(cache))


def tiny_llama_model(num_layers: int = 4, seed: int = 0, num_key_value_heads: int = 4):
    """A small Llama from a config with fixed random (non-trivial) weights; fewer key/value heads than 4
    make v_proj narrower than q_proj (grouped-query attention, like SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_run_args(e2e_dir, tmp_path):
    """Flags of a small tiny-llama run on the shared E2E files (for checks that stop before training)."""
    return [
        "--model",
        "tiny-llama",
        "--data_dir",
        e2e_dir,
        "--output_dir",
        str(tmp_path / "out"),
        "--ds_config",
        os.path.join(REPO_ROOT, "ds_configs", "zero3.json"),
        "--max_train_samples",
        "64",
    ]


def randomize_adapters(model, seed: int = 1, scale: float = 0.1) -> None:
    """Non-zero B so adapters change the output (B is zero at init)."""
    from ds_loradrop.method.placement import unique_adapters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in unique_adapters(model):
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * scale)


def run_compare(experiment: str, tracking_uri: str, output_dir, env=None):
    """``launch/compare.py`` over one experiment; returns the process and the rows of ``comparison.md``,
    each row's cells (the run name first) keyed by run name. The caller asserts on the exit status."""
    import subprocess

    from launching import one_rank

    result = subprocess.run(
        [
            *one_rank(os.path.join(REPO_ROOT, "launch", "compare.py")),
            "--experiment",
            experiment,
            "--tracking_uri",
            tracking_uri,
            "--output_dir",
            str(output_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    table = Path(output_dir) / "comparison.md"
    lines = table.read_text().splitlines() if table.is_file() else []
    cells = ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:])
    return result, {row[0]: row for row in cells}


def logged_model_predictions(tracking_uri: str, predictions_file, uris: list[str], pipeline: bool = False):
    """What each logged MLflow model in ``uris`` generates for the prompts of a run's ``predictions.jsonl``,
    loaded by a user in a fresh process (``tests/model_client.py``); with it, the run's own predictions."""
    import json
    import subprocess

    from launching import one_rank

    # forked from the preload server, which has imported modules and trained nothing
    command = [*one_rank(os.path.join(REPO_ROOT, "tests", "model_client.py")), tracking_uri]
    command += [str(predictions_file), *uris, *(["--pipeline"] if pipeline else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(predictions_file, encoding="utf-8") as handle:
        own = [json.loads(line)["prediction"] for line in handle]
    return json.loads(result.stdout.strip().splitlines()[-1]), own


@pytest.fixture(scope="session", autouse=True)
def preload_server(request, tmp_path_factory):
    """When the session runs integration or benchmark tests: one server (per pytest process) that forks the
    tests' jobs with torch, DeepSpeed and transformers imported (tests/preload_server.py); jobs started by
    ``launching.one_rank`` / ``direct`` / ``torchrun(preloaded=True)`` find it through
    ``$DS_LORADROP_TEST_PRELOAD``, ~7 s of CPU less per job process. Without it they start a plain
    interpreter."""
    import subprocess
    import tempfile

    from preloaded_python import SOCKET_VARIABLE

    if not any(
        item.get_closest_marker(m) for item in request.session.items for m in ("integration", "bench")
    ):
        yield None
        return
    root = tmp_path_factory.mktemp("preload")
    path = str(root / "socket")
    if len(path) > 100:  # a Unix socket's path has at most 107 bytes
        path = tempfile.mkdtemp(prefix="preload-") + "/socket"
    open(path + ".starting", "w").close()  # jobs wait for the server while it imports
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, os.path.join(REPO_ROOT, "tests", "preload_server.py"), path],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    os.environ[SOCKET_VARIABLE] = path
    try:
        yield path
    finally:
        os.environ.pop(SOCKET_VARIABLE, None)
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port, stopped after the session."""
    import subprocess
    import time
    import urllib.request

    from ds_loradrop.training.distributed import free_port

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                    )
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def runs(tmp_path_factory, e2e_dir, mlflow_server):
    """The distributed reference runs (tests/launching.py's configuration), made once per session.

    zero3_2ranks (deepspeed, 2 ranks, ZeRO-3, fresh interpreters: users' launch) tracks to a real MLflow
    server; one_rank (python) and zero2_torchrun (torchrun, 2 ranks, ZeRO-2, ranks forked from the preload
    server) to a local store; synced_eval is launch/evaluate.py over
    zero3_2ranks' adapter with synced generation. Returns (output directories, stdout of each).
    """
    from launching import (
        COMMON,
        EVALUATE,
        TRAIN,
        deepspeed,
        direct,
        global_batch,
        job_env,
        launch,
        one_rank,
        torchrun,
        write_ds_config,
    )

    root = tmp_path_factory.mktemp("distributed")
    env = job_env(root)
    zero3, zero2 = write_ds_config(root / "zero3.json", 3), write_ds_config(root / "zero2.json", 2)
    local_store = f"sqlite:///{root / 'local_mlflow.db'}"
    tracking = {
        "zero3_2ranks": [
            "--mlflow_tracking_uri",
            mlflow_server,
            "--mlflow_experiment",
            "server-exp",
            "--run_name",
            "zero3-2ranks",
        ],
        "one_rank": [
            "--mlflow_tracking_uri",
            local_store,
            "--mlflow_experiment",
            "local-exp",
            "--run_name",
            "one-rank",
        ],
        "zero2_torchrun": [
            "--mlflow_tracking_uri",
            local_store,
            "--mlflow_experiment",
            "local-exp",
            "--run_name",
            "zero2-torchrun",
        ],
    }
    data = ["--data_dir", e2e_dir]
    out = {name: str(root / name) for name in ("zero3_2ranks", "one_rank", "zero2_torchrun", "synced_eval")}
    logs = {
        "zero3_2ranks": launch(
            deepspeed(
                TRAIN,
                "--ds_config",
                zero3,
                *global_batch(2, 4),
                "--output_dir",
                out["zero3_2ranks"],
                *data,
                *COMMON,
                *tracking["zero3_2ranks"],
            ),
            env,
        ).stdout,
        "one_rank": launch(
            one_rank(
                TRAIN,
                "--ds_config",
                zero3,
                *global_batch(1, 4),
                # checkpoints to resume on other shapes (tests/test_resume_reshaped.py); saving changes
                # nothing that is trained
                "--save_steps",
                "4",
                "--output_dir",
                out["one_rank"],
                *data,
                *COMMON,
                *tracking["one_rank"],
            ),
            env,
        ).stdout,
        "zero2_torchrun": launch(
            torchrun(
                TRAIN,
                "--ds_config",
                zero2,
                *global_batch(2, 2),
                "--save_steps",
                "4",
                "--output_dir",
                out["zero2_torchrun"],
                *data,
                *COMMON,
                *tracking["zero2_torchrun"],
                # the launcher is torchrun (its rank environment, no --local_rank); the ranks forked warm
                preloaded=True,
            ),
            env,
        ).stdout,
    }
    logs["synced_eval"] = launch(
        direct(
            EVALUATE,
            "--ds_config",
            zero3,
            "--task",
            "e2e",
            "--split",
            "validation",
            *data,
            "--adapter",
            os.path.join(out["zero3_2ranks"], "adapter"),
            "--output_dir",
            out["synced_eval"],
            "--eval_generation",
            "synced",
            "--max_eval_samples",
            "10",
            "--max_new_tokens",
            "12",
            "--eval_batch_size",
            "3",
        ),
        env,
    ).stdout
    out["local_store"] = local_store
    out["server"] = mlflow_server
    out["zero3_config"] = zero3
    out["zero2_config"] = zero2
    out["root"] = str(root)
    return out, logs
