"""Two simulated nodes, a rank killed, a preempted job: through the real launchers, against the 2-rank
reference run of the session fixture ``runs`` (same configuration, tests/launching.py).

Four launches: the two-node run (two DeepSpeed launchers via launch/node_launch.sh, one rank each, at a
loopback master address), and one job that loses a rank to SIGKILL, is resumed and preempted with SIGTERM,
and is resumed again to the end. A self-restarting job (launch/restart.py around the DeepSpeed launcher,
ZeRO-3) that loses a rank is tests/test_chaos.py's second test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time

import psutil
import pytest
import torch
from conftest import REPO_ROOT
from launching import (
    COMMON,
    DEEPSPEED,
    NODE_LAUNCH,
    TRAIN,
    deepspeed,
    direct,
    free_port,
    global_batch,
    job_env,
    launch,
)
from mlflow import MlflowClient
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed


def _adapters(directory, sub="adapter"):
    return load_file(os.path.join(directory, sub, "adapter_model.safetensors"))


def _max_abs_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[key] - b[key]).abs().max().item() for key in a)


def _plan(directory):
    with open(os.path.join(directory, "plan.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def two_nodes(runs, tmp_path_factory, e2e_dir):
    out, _ = runs
    root = tmp_path_factory.mktemp("two_nodes")
    env = {
        **job_env(root),
        "PATH": f"{os.path.dirname(DEEPSPEED)}:{os.environ['PATH']}",
        "NODES": "node-a node-b",
        "GPUS_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    args = [
        "--ds_config",
        out["zero3_config"],
        *global_batch(2, 4),
        "--data_dir",
        e2e_dir,
        *COMMON,
        "--output_dir",
        str(root / "run"),
        "--mlflow_tracking_uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--mlflow_experiment",
        "two-nodes",
        # checked here rather than in a run of its own: equal to the one-node run without it
        "--gradient_checkpointing",
        "true",
    ]
    second = subprocess.Popen(
        ["bash", NODE_LAUNCH, *args],
        cwd=REPO_ROOT,
        env={**env, "NODE_RANK": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = launch(["bash", NODE_LAUNCH, *args], {**env, "NODE_RANK": "0"})
        second_log, _ = second.communicate(timeout=120)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, second_log[-4000:]
    return root, first.stdout, second_log


def test_two_nodes_select_and_train_like_one_node(runs, two_nodes):
    """Two nodes of one rank each (launch/node_launch.sh), with activation checkpointing (non-reentrant)
    on every decoder layer: the same plan, losses and adapters (the shared one included) as the one-node
    run without it."""
    out, _ = runs
    root, first_log, second_log = two_nodes
    assert "[ds_loradrop rank0]" in first_log and "[ds_loradrop rank1]" not in first_log
    assert "activation checkpointing: 8 decoder layers recompute in backward" in first_log
    with open(os.path.join(out["zero3_2ranks"], "summary.json")) as handle:
        reference_stages = json.load(handle)["stages"]
    with open(root / "run" / "summary.json") as handle:
        stages = json.load(handle)["stages"]
    assert [s["name"] for s in stages] == ["stage1", "stage2"]
    for ours, theirs in zip(stages, reference_stages, strict=True):
        assert ours["final_loss"] == pytest.approx(theirs["final_loss"], rel=1e-6)
    assert any(".shared." in name for name in _adapters(root / "run"))
    assert "[ds_loradrop rank1] rank 1 holds layer mask" in second_log
    reference, candidate = _plan(out["zero3_2ranks"]), _plan(root / "run")
    assert candidate["world_size"] == 2 and candidate["num_tokens"] == reference["num_tokens"]
    for name, target in reference["targets"].items():
        assert candidate["targets"][name]["retained"] == target["retained"]
        assert candidate["targets"][name]["importance"] == pytest.approx(target["importance"], rel=1e-5)
    for sub in ("stage1_adapter", "adapter"):
        assert _max_abs_difference(_adapters(root / "run", sub), _adapters(out["zero3_2ranks"], sub)) <= 1e-6
    # one MLflow run for the job (global rank 0), not one per node
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert (
        run.info.status == "FINISHED"
        and run.data.tags["num_nodes"] == "2"
        and run.data.tags["world_size"] == "2"
    )


class Job:
    """A launcher started in a session of its own, so the test can signal the whole job like a
    scheduler does; its output is read by a thread (a hung job must not hang the test)."""

    def __init__(self, command, env):
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not re.search(pattern, self.log):
            if not self.reader.is_alive() or time.time() > deadline:
                raise AssertionError(f"no {pattern!r} in the job's output:\n{self.log[-6000:]}")
            time.sleep(0.05)

    def rank_process(self, rank: int) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if f"--local_rank={rank}" in " ".join(child.cmdline()):
                return child
        raise AssertionError(f"no process of rank {rank} under the launcher")

    def signal_all(self, signal_number: int) -> None:
        os.killpg(self.process.pid, signal_number)

    def wait_for_end(self, timeout: float) -> bool:
        """True once the launcher and every process of its session have exited within ``timeout``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.process.poll()  # reap the launcher: a zombie still counts as a member of the group
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                self.process.wait()
                self.reader.join(timeout=10)
                return True
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def _checkpointing_job(out: dict, e2e_dir: str, output_dir, store: str, launcher=deepspeed) -> list[str]:
    """The 2-rank reference configuration (ZeRO-3), checkpointing every 2 steps, tracked in ``store``."""
    return launcher(
        TRAIN,
        "--ds_config",
        out["zero3_config"],
        *global_batch(2, 4),
        "--data_dir",
        e2e_dir,
        *COMMON,
        "--output_dir",
        str(output_dir),
        "--save_steps",
        "2",
        "--mlflow_tracking_uri",
        store,
        "--mlflow_experiment",
        "faults",
        "--run_name",
        "job",
    )


@pytest.fixture(scope="module")
def faults(runs, tmp_path_factory, e2e_dir):
    """The reference configuration with --save_steps 2: SIGKILL of rank 1 after the stage-2 step-2
    checkpoint; --resume auto (with --eval_steps 1 so that a step lasts long enough to be preempted) and
    SIGTERM to the whole job once stage 2's loop is running again (after step 3); --resume auto to the end."""
    out, _ = runs
    root = tmp_path_factory.mktemp("faults")
    env = job_env(root)
    store = f"sqlite:///{root / 'mlflow.db'}"
    args = _checkpointing_job(out, e2e_dir, root / "run", store)
    facts = {"root": root, "store": store}

    killed = Job(args, env)
    try:
        killed.wait_for(r"stage2: checkpoint .*stage2-step-000002")
        killed.rank_process(1).kill()
        killed_at = time.time()
        facts["kill_ended"] = killed.wait_for_end(timeout=120)
        facts["kill_seconds"] = time.time() - killed_at
    finally:
        killed.kill()
    facts["kill_returncode"], facts["kill_log"] = killed.process.returncode, killed.log
    facts["after_kill"] = sorted(os.listdir(root / "run" / "checkpoints"))

    preempted = Job([*args, "--resume", "auto", "--eval_steps", "1"], env)
    try:
        preempted.wait_for(r"stage2: resumed from")
        # Inside the training loop (outside it a signal stops the job at once, by design): the first
        # step after the resume has run once its validation loss is logged.
        preempted.wait_for(r"stage2 step 3: validation loss")
        preempted.signal_all(signal.SIGTERM)
        facts["term_ended"] = preempted.wait_for_end(timeout=120)
    finally:
        preempted.kill()
    facts["term_returncode"], facts["term_log"] = preempted.process.returncode, preempted.log
    facts["after_term"] = sorted(os.listdir(root / "run" / "checkpoints"))

    # the last resume only has to finish the run: the launcher is not its subject
    finish = _checkpointing_job(out, e2e_dir, root / "run", store, launcher=direct)
    facts["final_log"] = launch([*finish, "--resume", "auto"], env).stdout
    return facts


def test_a_killed_rank_ends_the_job_quickly_and_keeps_the_last_checkpoint(faults):
    assert faults["kill_ended"] and faults["kill_returncode"] != 0
    assert faults["kill_seconds"] < 60, faults["kill_log"][-4000:]
    assert "stage2-step-000002" in faults["after_kill"]
    assert not [name for name in faults["after_kill"] if name.startswith(".saving-")]
    client = MlflowClient(tracking_uri=faults["store"])
    [run] = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FINISHED"  # the same run, continued by both resumes


def test_sigterm_writes_a_checkpoint_on_every_rank_then_exits(faults):
    log = faults["term_log"]
    assert faults["term_ended"] and faults["term_returncode"] != 0
    stopped = re.findall(r"stage2: signal 15 received; stopping after step (\d+)", log)
    assert stopped, log[-4000:]
    step = int(stopped[0])
    assert 2 < step < 8
    assert f"stage2-step-{step:06d}" in faults["after_term"]
    state = json.loads(
        (
            faults["root"] / "run" / "checkpoints" / f"stage2-step-{step:06d}" / "trainer_state.json"
        ).read_text()
    )
    assert state["step"] == step and state["world_size"] == 2
    assert sorted(os.listdir(faults["root"] / "run" / "checkpoints" / f"stage2-step-{step:06d}")) == [
        "ds",
        "manifest.json",
        "rng_rank0.safetensors",
        "rng_rank1.safetensors",
        "run_config.json",
        "trainable_state.json",
        "trainable_state.safetensors",
        "trainer_state.json",
    ]
    from ds_loradrop.training.checkpoint_integrity import verify

    assert verify(str(faults["root"] / "run" / "checkpoints" / f"stage2-step-{step:06d}")) is None
    assert f"stage2-step-{step:06d} at step {step}/8" in faults["final_log"]


def test_resumed_twice_ends_like_the_uninterrupted_run(runs, faults):
    out, _ = runs
    log = faults["final_log"]
    assert "stage 1 finished before: using its plan" in log and "stage1 step" not in log
    assert _plan(faults["root"] / "run")["targets"] == _plan(out["zero3_2ranks"])["targets"]
    difference = _max_abs_difference(_adapters(faults["root"] / "run"), _adapters(out["zero3_2ranks"]))
    assert difference <= 1e-6
    final = _adapters(faults["root"] / "run")
    assert any(value.abs().max() > 1e-3 for key, value in final.items() if key.endswith("lora_B"))
    assert torch.isfinite(torch.cat([value.flatten() for value in final.values()])).all()
