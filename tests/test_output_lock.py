"""One job per output directory: a live holder refuses a second job by name; a dead one (SIGKILL) does
not block a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.unit

HOLD = """
import sys, time
from ds_loradrop.training.output_lock import lock_output_dir
lock_output_dir(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def _hold(directory):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, directory], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_live_job_holds_its_directory_and_a_killed_one_does_not(tmp_path):
    from ds_loradrop.errors import UsageError
    from ds_loradrop.training.output_lock import LOCK_NAME, lock_output_dir, unlock_output_dir

    run = str(tmp_path / "run")
    holder = _hold(run)
    try:
        with pytest.raises(UsageError, match=rf"'{run}' is in use by another job \(pid {holder.pid} on "):
            lock_output_dir(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock: a restart takes it, whatever the file still says
    assert os.path.getsize(os.path.join(run, LOCK_NAME)) > 0
    lock_output_dir(run)
    lock_output_dir(run)  # idempotent within the job
    unlock_output_dir(run)


def test_train_refuses_a_directory_another_job_holds_in_one_line(tmp_path, e2e_dir):
    run = str(tmp_path / "run")
    holder = _hold(run)
    try:
        started = time.monotonic()
        command = [sys.executable, "launch/train.py", "--model", "tiny-llama", "--data_dir", e2e_dir,
                   "--max_train_samples", "64", "--output_dir", run, "--resume", "auto"]  # fmt: skip
        env = {**os.environ, "DS_LORADROP_CACHE": str(tmp_path / "cache")}
        result = subprocess.run(
            command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env, check=False
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    holder_text = f"pid {holder.pid} on {os.uname().nodename}, started "
    assert len(errors) == 1 and errors[0].startswith(
        f"error: output directory '{run}' is in use by another job ({holder_text}"
    )
    assert "Traceback" not in result.stderr and time.monotonic() - started < 120
    assert sorted(os.listdir(run)) == [".ds_loradrop.lock"]  # nothing of the refused job written
