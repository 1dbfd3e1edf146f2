"""The self-restarting job (launch/restart.py): which exits restart, how often, with --resume auto and the
restart count in the environment, and a stop from outside that is passed on and never restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

from ds_loradrop.errors import UsageError
from ds_loradrop.recipes.restart import RestartPolicy, exit_status, supervise, with_resume_auto

pytestmark = pytest.mark.unit

RESTART = os.path.join(REPO_ROOT, "launch", "restart.py")


def attempts_of(tmp_path, script: str, max_restarts: int = 3) -> tuple[int, list[str], list[str]]:
    """Run ``bash -c script`` under supervise; (status, one line per attempt, the supervisor's log)."""
    record = tmp_path / "attempts.txt"
    logged: list[str] = []
    command = ["bash", "-c", f'echo "$DS_LORADROP_RESTART_COUNT $*" >> {record}; {script}', "job"]
    status = supervise(command, RestartPolicy(max_restarts, 0.0), log=logged.append, sleep=lambda _: None)
    return status, record.read_text().splitlines(), logged


def test_a_lost_rank_restarts_with_resume_auto_until_it_succeeds(tmp_path):
    # fails twice (as a killed rank's launcher does), then finishes
    script = '[ "$DS_LORADROP_RESTART_COUNT" -ge 2 ] && exit 0; kill -9 $$'
    status, attempts, logged = attempts_of(tmp_path, script)
    assert status == 0
    assert attempts == ["0 --resume auto", "1 --resume auto", "2 --resume auto"]
    assert "status 137" in logged[0] and "restart 1/3" in logged[0]


@pytest.mark.parametrize(
    "code, meaning",
    [(0, "finished"), (2, "usage error"), (3, "diverged loss"), (4, "no space for a checkpoint")],
)
def test_success_usage_errors_divergence_and_a_full_disk_are_not_retried(tmp_path, code, meaning):
    status, attempts, logged = attempts_of(tmp_path, f"exit {code}")
    assert status == code and len(attempts) == 1 and meaning in logged[-1]


def test_it_gives_up_after_max_restarts(tmp_path):
    status, attempts, logged = attempts_of(tmp_path, "exit 1", max_restarts=2)
    assert status == 1 and len(attempts) == 3 and "giving up after 2 restart(s)" in logged[-1]


def test_resume_flags():
    assert with_resume_auto(["x", "--seed", "1"]) == ["x", "--seed", "1", "--resume", "auto"]
    assert with_resume_auto(["x", "--resume", "auto"]) == ["x", "--resume", "auto"]
    assert with_resume_auto(["x", "--resume=auto"]) == ["x", "--resume=auto"]
    with pytest.raises(UsageError, match="resumes with --resume auto, not --resume 'ckpt'"):
        with_resume_auto(["x", "--resume", "ckpt"])
    with pytest.raises(UsageError, match="--overwrite_output_dir would delete the checkpoints"):
        with_resume_auto(["x", "--overwrite_output_dir"])
    with pytest.raises(UsageError, match="must be >= 0"):
        RestartPolicy(-1)
    assert exit_status(-9) == 137 and exit_status(3) == 3


def test_sigterm_to_the_supervisor_is_passed_on_and_ends_the_job(tmp_path):
    """A scheduler stopping the whole job: the command gets SIGTERM, exits, and is not restarted."""
    marker = tmp_path / "started"
    script = (
        f"trap 'kill $!; echo got-term >> {tmp_path}/term; exit 143' TERM; touch {marker}; sleep 60 & wait"
    )
    supervisor = subprocess.Popen(
        [sys.executable, RESTART, "--restart_delay", "0", "--", "bash", "-c", script, "job"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    supervisor.send_signal(signal.SIGTERM)
    _, stderr = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 143
    assert (tmp_path / "term").read_text() == "got-term\n"
    assert "stopped by signal 15" in stderr and "restart 1" not in stderr


def test_the_command_line_refuses_a_fixed_resume_point():
    done = subprocess.run(
        [sys.executable, RESTART, "--", "python", "launch/train.py", "--resume", "checkpoints/x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "error: a self-restarting job resumes with --resume auto, not --resume 'checkpoints/x'"
    )
