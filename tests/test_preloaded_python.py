"""tests/preloaded_python.py, the stand-in for ``python`` that forks the suite's jobs from the preload
server: a job sees what a fresh interpreter would give it, its status and signals are its own, a killed
stand-in takes its job along, and the job really starts with its imports done (else the suite is slow
without failing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT
from launching import PRELOADED_PYTHON, one_rank

pytestmark = pytest.mark.integration

PROBE = """
import json, os, shutil, sys
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "variable": os.environ.get("PROBE_VARIABLE"),
    "path0": sys.path[0], "stdin": sys.stdin.read(), "name": __name__, "file": __file__,
    "torch_imported": "torch" in sys.modules, "ninja": shutil.which("ninja"),
}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""

SLEEPER = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_preloaded_job_sees_what_a_fresh_interpreter_gives_and_exits_with_its_status(
    preload_server, tmp_path
):
    assert preload_server is not None
    script = _write(tmp_path, "probe.py", PROBE)
    env = {**os.environ, "PROBE_VARIABLE": "set for this job only"}
    outputs = {}
    commands = {"plain": one_rank(script, "3", preloaded=False), "preloaded": one_rank(script, "3")}
    for name, command in commands.items():
        done = subprocess.run(
            command, cwd=tmp_path, env=env, input="from stdin", capture_output=True, text=True, check=False
        )
        assert done.returncode == 3 and done.stderr.endswith("to stderr\n"), (name, done.stderr[-2000:])
        outputs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    plain, preloaded = outputs["plain"], outputs["preloaded"]
    assert plain.pop("torch_imported") is False and preloaded.pop("torch_imported") is True  # forked, warm
    assert preloaded == plain
    assert plain["argv"] == [script, "3"] and plain["stdin"] == "from stdin" and plain["cwd"] == str(tmp_path)
    # DeepSpeed's JIT builds run the environment's ninja in every job (conftest): with two ninjas the jobs
    # rebuilt its shared-memory op each time they alternated (their build logs hash commands differently)
    assert plain["ninja"] == os.path.join(os.path.dirname(sys.executable), "ninja")


def test_signals_reach_the_job_and_a_killed_stand_in_takes_its_job_along(preload_server, tmp_path):
    script = _write(tmp_path, "sleeper.py", SLEEPER)
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        pid_file = tmp_path / f"pid{signal_number}"
        stand_in = subprocess.Popen([sys.executable, PRELOADED_PYTHON, script, str(pid_file)], cwd=REPO_ROOT)
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.time() < deadline and stand_in.poll() is None
            time.sleep(0.1)
        job = int(pid_file.read_text())
        assert job != stand_in.pid
        stand_in.send_signal(signal_number)
        assert stand_in.wait(timeout=30) == -signal_number  # SIGTERM: the job's own death, reported as it
        deadline = time.time() + 10
        while _alive(job):
            assert time.time() < deadline, f"job {job} outlived its stand-in ({signal_number!r})"
            time.sleep(0.1)


def test_a_job_killed_by_a_signal_and_one_that_ends_at_once_report_their_own_status(preload_server, tmp_path):
    """The status can reach the stand-in right behind the job's pid; a job killed by SIGKILL is reported as
    killed, not as a failure of the stand-in."""
    killed = _write(tmp_path, "killed.py", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    quick = _write(tmp_path, "quick.py", "import sys\nsys.exit(int(sys.argv[1]))\n")
    assert subprocess.run(one_rank(killed), check=False).returncode == -signal.SIGKILL
    for status in (0, 2, 5, 0, 2, 5):
        done = subprocess.run(one_rank(quick, str(status)), capture_output=True, text=True, check=False)
        assert (done.returncode, done.stderr) == (status, "")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between the open and the read
        return False
