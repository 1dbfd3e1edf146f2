"""A peer that is alive but never joins a collective fails the other rank after the time-out given to
``engine.init_distributed`` (two processes, gloo, a 5-second time-out), and the entry points' handler
(``cli.run_main``) ends that rank with its traceback and exit status 1. Interpreter finalisation with the
process group still alive aborted it instead (SIGABRT) in about one run in three."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO_ROOT

from ds_loradrop.training.distributed import free_port

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent(
    """
    import datetime, time
    import torch, torch.distributed as dist
    from ds_loradrop.recipes.cli import run_main
    from ds_loradrop.training.engine import init_distributed

    def main():
        init_distributed(datetime.timedelta(seconds=5))
        if dist.get_rank() == 1:
            time.sleep(300)  # stuck: alive, never joins the all-reduce
        start = time.time()
        try:
            dist.all_reduce(torch.ones(1))
        finally:
            print(f"failed after {time.time() - start:.1f} s", flush=True)

    run_main(main)
    """
)


def test_a_silent_peer_fails_the_collective_after_the_timeout():
    env = {
        **os.environ,
        "PYTHONPATH": REPO_ROOT,
        "WORLD_SIZE": "2",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        started = time.time()
        output, _ = ranks[0].communicate(timeout=240)
        assert ranks[0].returncode == 1, output[-3000:]
        assert "Traceback" in output and "all_reduce" in output, output[-3000:]
        waited = float(output.split("failed after ")[1].split(" s")[0])
        assert 4.0 <= waited < 30.0, output[-3000:]
        assert time.time() - started < 200
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
