"""A job under launch/restart.py that receives faults at seeded random times (bench/chaos.py): SIGKILL of a
random rank, SIGTERM to a random rank, SIGKILL during a checkpoint write. It must end with exit 0, the
adapters of the uninterrupted run (the session's 2-rank ZeRO-2 reference, same configuration), one
FINISHED MLflow run and ``restarts`` equal to the faults injected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from launching import COMMON, DEEPSPEED, TRAIN, direct, free_port, global_batch, job_env

pytestmark = pytest.mark.distributed

CHAOS = os.path.join(REPO_ROOT, "bench", "chaos.py")


def test_a_self_restarting_job_survives_faults_at_random_times(runs, tmp_path, e2e_dir):
    """Started by tests/rank_launcher.py (4 attempts, ~10 s of launcher start-up less each): what restarts
    is the subject; the ``deepspeed`` launcher under launch/restart.py is the next test's (the multi-node
    and preemption launches are test_multinode_faults.py's). Its ranks are forked from the preload server:
    bench/chaos.py finds each rank's stand-in (tests/preloaded_python.py) by its ``/proc`` command line and
    environment, which are the rank's; a SIGTERM sent to it reaches the rank, and a SIGKILL makes the
    server kill the rank at once (tests/test_preloaded_python.py)."""
    out, _ = runs
    command = direct(TRAIN, "--ds_config", out["zero2_config"], *global_batch(2, 2),
                     "--data_dir", e2e_dir, *COMMON, "--save_steps", "2",
                     "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--mlflow_experiment", "chaos")  # fmt: skip
    report = str(tmp_path / "chaos.json")
    result = subprocess.run(
        [sys.executable, CHAOS, "--faults", "3", "--seed", "7", "--output_dir", str(tmp_path / "run"),
         "--reference", out["zero2_torchrun"], "--json", report, "--", *command],
        cwd=REPO_ROOT, env=job_env(tmp_path), capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(report) as handle:
        figures = json.load(handle)
    assert figures["survived"] and figures["exit_status"] == 0
    assert len(figures["faults_injected"]) == 3 == figures["restarts_recorded"]
    assert figures["mlflow_runs"] == 1 and figures["mlflow_status"] == "FINISHED"
    assert figures["max_abs_difference"] <= 1e-6


def test_a_restart_that_gets_fewer_ranks_continues_on_them(runs, tmp_path, e2e_dir):
    """A node lost: launch/restart.py around the DeepSpeed launcher (ZeRO-3); after the first fault the
    hostfile shrinks from 2 slots to 1 and the restarted job continues the 2-rank run on 1 rank (the global
    batch of 8 kept by accumulating 2 micro batches), ends with the 2-rank reference's adapters and one
    FINISHED MLflow run that says (tag and metric) it was restarted once."""
    out, _ = runs
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    command = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), TRAIN, "--ds_config", out["zero3_config"],
               *global_batch(2, 4), "--data_dir", e2e_dir, *COMMON, "--save_steps", "2",
               "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--mlflow_experiment", "shrink"]  # fmt: skip
    report = str(tmp_path / "chaos.json")
    result = subprocess.run(
        [sys.executable, CHAOS, "--faults", "1", "--seed", "3", "--output_dir", str(tmp_path / "run"),
         "--reference", out["zero3_2ranks"], "--json", report, "--shrink_hostfile", str(hostfile),
         "--shrink_to", "1", "--tolerance", "5e-5", "--", *command],
        cwd=REPO_ROOT, env=job_env(tmp_path), capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(report) as handle:
        figures = json.load(handle)
    assert figures["faults_injected"] == ["kill_rank"] and figures["restarts_recorded"] == 1
    assert figures["mlflow_status"] == "FINISHED" and figures["max_abs_difference"] <= 5e-5
    log = result.stdout + result.stderr
    assert "on 1 rank(s): gradient accumulation 1 -> 2 keeps its global batch of 8" in log
    assert "restart 1/3 from the newest complete checkpoint" in log and "restart 2/3" not in log
    from mlflow import MlflowClient

    with open(tmp_path / "run" / "tracking.json") as handle:
        tracking = json.load(handle)
    run = MlflowClient(tracking_uri=tracking["tracking_uri"]).get_run(tracking["run_id"])
    assert run.data.tags["restarts"] == "1" and run.data.metrics["restarts"] == 1
