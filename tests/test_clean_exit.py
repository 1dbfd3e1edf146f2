"""A finished 2-rank job exits 0: no rank aborts at interpreter exit.

Reported: about one short 2-rank ZeRO-3 job in eight ended with rank 1 aborting after ``done in ...``
("terminate called without an active exception", launcher status -6), so a finished job exited as
failed. The cause: a gloo process group still alive at interpreter exit (a plain 2-rank gloo program that
does not destroy it aborted in 7 of 35 runs here, 0 of 15 once it does; ``finished_gloo_program.py`` with
``--no_teardown`` aborted in 1 of 12). Every rank now destroys it (``engine.shutdown_distributed``).

Two checks, each where it is cheap:
- every multi-rank launch of the suite (``launching.launch``, about 25 finished 2-rank jobs of training or
  evaluation) asserts that each rank logged the teardown and that none aborted;
- here, the teardown itself ``REPETITIONS`` times in a program that only starts the process group, runs the
  collectives a job runs and tears down (a third of a training launch's time), on fresh interpreters.
  Were the fault still one in eight, the suite's 2-rank jobs and these would all pass with probability
  (7/8)^(25+8) = 1.2 %. Most of those jobs are now forked from the preload server (tests/preload_server.py)
  and a forked rank seems not to show the abort: with the teardown removed (``--no_teardown``) 4 of 84
  fresh runs of this program aborted and 0 of 84 forked ones (Fisher's exact p = 0.12). Counting only the
  ~3 multi-rank jobs on fresh interpreters, the probability is (7/8)^(3+8) = 23 %. What the forked jobs
  still catch every time: a rank that does not log its teardown (the call left out on some path).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO_ROOT
from launching import assert_no_shm_buffers_left, direct, job_env

pytestmark = pytest.mark.distributed

REPETITIONS = int(os.environ.get("DS_LORADROP_EXIT_REPETITIONS", "8"))
PROGRAM = os.path.join(REPO_ROOT, "tests", "finished_gloo_program.py")


def _exited_badly(done: subprocess.CompletedProcess) -> bool:
    return done.returncode != 0 or "terminate called" in done.stdout + done.stderr


def test_the_teardown_keeps_finished_two_rank_programs_from_aborting(tmp_path):
    """The ranks are started by the test's own launcher (tests/rank_launcher.py): the abort is a rank's own
    exit status (-6, reported as 134), and the deepspeed launcher's start-up would be a third of each
    repetition."""
    env = job_env(tmp_path)
    failures = []
    for attempt in range(REPETITIONS):
        command = direct(PROGRAM, preloaded=False)  # each rank's own interpreter ends: the subject
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
        log = done.stdout + done.stderr
        assert "finished rank 0" in log and "finished rank 1" in log, log[-4000:]
        assert_no_shm_buffers_left(command)
        if _exited_badly(done):
            failures.append((attempt, done.returncode, log[-2000:]))
    assert not failures, f"{len(failures)} of {REPETITIONS} finished programs exited badly: {failures[0]}"
