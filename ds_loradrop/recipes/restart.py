"""A job that restarts itself: run a launch command (the DeepSpeed launcher, torchrun, node_launch.sh)
with ``--resume auto`` and, when it ends by losing a rank or by preemption, run it again from the newest
complete checkpoint, up to ``max_restarts`` times.

Deterministic failures are not retried: a usage error (exit status 2), a diverged loss (3) or a checkpoint
that does not fit on its file system (4) would fail the same way again, so they end the job at once with
their status, as does success (0). Every other
status (a rank killed by SIGKILL or the OOM killer, a lost node, SIGTERM to the ranks, a collective that
timed out) is a restart. The run keeps its MLflow run (``tracking.json`` in the output directory) and
records ``restarts``: each attempt gets ``DS_LORADROP_RESTART_COUNT`` in its environment.

SIGTERM / SIGINT to the supervisor itself (the scheduler stopping the whole job) are passed on to the
launch command, which checkpoints and exits; the supervisor then exits with its status and does not
restart (a requeued job starts it again and it resumes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ds_loradrop.errors import DIVERGED_EXIT_STATUS, STORAGE_EXIT_STATUS, USAGE_EXIT_STATUS, UsageError

RESTART_COUNT_ENV = "DS_LORADROP_RESTART_COUNT"
# torchrun's elastic agent tells its workers the same way.
TORCHELASTIC_RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
SLURM_RESTART_COUNT_ENV = "SLURM_RESTART_COUNT"  # requeues of a Slurm job
FINAL_STATUSES = {
    0: "finished",
    USAGE_EXIT_STATUS: "usage error",
    DIVERGED_EXIT_STATUS: "diverged loss",
    STORAGE_EXIT_STATUS: "no space for a checkpoint",
}


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3
    delay_seconds: float = 5.0  # let the ports and files of the failed attempt go

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise UsageError(f"--max_restarts must be >= 0, got {self.max_restarts}")
        if self.delay_seconds < 0:
            raise UsageError(f"--restart_delay must be >= 0, got {self.delay_seconds}")


def restart_count() -> int:
    """How many times this job has been started again: by restart.py (or torchrun's elastic agent) plus
    the times Slurm requeued it (0 on its first attempt)."""
    count = 0
    for name in (RESTART_COUNT_ENV, TORCHELASTIC_RESTART_COUNT_ENV):
        value = os.environ.get(name, "")
        if value.isdigit():
            count = int(value)
            break
    requeued = os.environ.get(SLURM_RESTART_COUNT_ENV, "")
    return count + (int(requeued) if requeued.isdigit() else 0)


def with_resume_auto(command: list[str]) -> list[str]:
    """``command`` continuing from the newest complete checkpoint: ``--resume auto`` appended unless it is
    there (another ``--resume`` value would restart from the same checkpoint every time: refused)."""
    if not command:
        raise UsageError("no launch command given (expected: ... -- deepspeed launch/train.py ...)")
    for i, arg in enumerate(command):
        value = arg.split("=", 1)[1] if arg.startswith("--resume=") else None
        if arg == "--resume":
            value = command[i + 1] if i + 1 < len(command) else ""
        if value is not None:
            if value != "auto":
                raise UsageError(f"a self-restarting job resumes with --resume auto, not --resume {value!r}")
            return list(command)
    if "--overwrite_output_dir" in command:
        raise UsageError("--overwrite_output_dir would delete the checkpoints a restart resumes from")
    return [*command, "--resume", "auto"]


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code (-N: killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(
    command: list[str],
    policy: RestartPolicy,
    *,
    log: Callable[[str], None] = lambda line: print(f"[restart] {line}", file=sys.stderr, flush=True),
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``command`` until it finishes, fails deterministically, is stopped from outside, or has been
    restarted ``policy.max_restarts`` times. Returns the exit status to end with."""
    command = with_resume_auto(command)
    stop: list[int] = []
    child: subprocess.Popen | None = None

    def pass_on(signal_number, _frame) -> None:
        stop.append(signal_number)
        if child is not None and child.poll() is None:
            child.send_signal(signal_number)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        restarts, status = 0, 0
        while True:
            if stop:  # stopped while waiting to restart
                log(f"stopped by signal {stop[0]} before restart {restarts}; not restarting")
                return status
            started = time.monotonic()
            child = subprocess.Popen(command, env={**os.environ, RESTART_COUNT_ENV: str(restarts)})
            if stop:  # a signal that arrived while the child was being started
                child.send_signal(stop[0])
            status = exit_status(child.wait())
            seconds = time.monotonic() - started
            if status in FINAL_STATUSES:
                log(f"the job ended with status {status} ({FINAL_STATUSES[status]}) after {seconds:.0f}s")
                return status
            if stop:
                log(f"stopped by signal {stop[0]}; the job exited with status {status}; not restarting")
                return status
            if restarts >= policy.max_restarts:
                log(f"the job failed with status {status}; giving up after {restarts} restart(s)")
                return status
            restarts += 1
            log(
                f"the job failed with status {status} after {seconds:.0f}s (a lost rank or preemption): "
                f"restart {restarts}/{policy.max_restarts} from the newest complete checkpoint"
            )
            sleep(policy.delay_seconds)
    finally:
        for signal_number, handler in previous.items():
            signal.signal(signal_number, handler)
