"""Starting the entry points the way users do (deepspeed, torchrun, python) for the distributed tests.

All runs share one small configuration: fp32, a global batch of 8 (:func:`global_batch`: 1 rank x micro 4 x
accumulation 2, 2 ranks x micro 4, or 2 ranks x micro 2 x accumulation 2) and tiny models really
partitioned (stage3_param_persistence_threshold 0), so runs on different launchers must agree.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT

from ds_loradrop.training.distributed import free_port
from ds_loradrop.training.engine import shm_allreduce_buffer_path

TRAIN = os.path.join(REPO_ROOT, "launch", "train.py")
EVALUATE = os.path.join(REPO_ROOT, "launch", "evaluate.py")
NODE_LAUNCH = os.path.join(REPO_ROOT, "launch", "node_launch.sh")
RANK_LAUNCHER = os.path.join(REPO_ROOT, "tests", "rank_launcher.py")
PRELOADED_PYTHON = os.path.join(REPO_ROOT, "tests", "preloaded_python.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
COMMON = [
    "--model",
    "tiny-llama",
    "--max_train_samples",
    "192",
    "--sample_ratio",
    "0.25",
    "--stage1_epochs",
    "2",
    "--threshold",
    "0.6",
    "--max_steps",
    "8",
    "--learning_rate",
    "0.003",
    "--warmup_ratio",
    "0",
    "--logging_steps",
    "5",
    "--seed",
    "3",
    "--max_eval_samples",
    "10",
    "--max_new_tokens",
    "12",
    "--eval_batch_size",
    "3",
    "--val_loss_samples",  # the validation loss's own test scores more (tests/test_validation_loss.py)
    "24",
    "--mlflow_log_model",  # the logged MLflow model is tested where it is the subject (each method's
    "false",  # one-rank run in test_baselines_distributed.py, the smollm2 run, full fine-tuning)
]


def global_batch(ranks: int, micro: int) -> list[str]:
    """The batch flags that make the shared global batch of 8 on ``ranks`` ranks of ``micro`` examples.

    The 2-rank ZeRO-3 reference and what is compared with it run micro 4 without accumulation (a micro
    batch costs the same ZeRO-3 hooks whatever its size: half the forwards, ~40% of a rank's CPU less);
    accumulation is kept by the one-rank reference (ZeRO-3), the ZeRO-2 torchrun reference and the
    baselines' 2-rank ZeRO-3 runs (micro 2 x 2)."""
    accumulation, rest = divmod(8, ranks * micro)
    assert rest == 0 and accumulation >= 1, (ranks, micro)
    return ["--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(accumulation)]


def write_ds_config(path, stage: int) -> str:
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}
        if stage == 3
        else {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    path.write_text(json.dumps(config))
    return str(path)


def assert_no_shm_buffers_left(command) -> None:
    """No DeepSpeed CPU all-reduce buffer is left in /dev/shm for the job ``command`` launched on its
    ``--master_port``. Each is 66 MB of memory; a finished job must leave none (``engine.init_distributed``
    unlinks them), or the suite's launches fill the machine's memory."""
    if "--master_port" not in command:
        return
    port = command[command.index("--master_port") + 1]
    leftover = glob.glob(shm_allreduce_buffer_path("*", port, "*"))
    assert not leftover, leftover


def deepspeed(script: str = TRAIN, *args: str, ranks: int = 2) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args``: how users start a job on one node."""
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]


def direct(script: str = TRAIN, *args: str, ranks: int = 2, preloaded: bool = True) -> list[str]:
    """N ranks started by ``tests/rank_launcher.py`` with the environment ``deepspeed`` gives them, from a
    launcher that imports no torch (~8-10 s less per job): for multi-rank jobs whose launcher is not what
    the test is about. ``deepspeed(...)`` stays where users' launch is the subject (the shared runs, the
    chaos and multi-node tests, the benchmarks). ``preloaded``: each rank forked from the session's preload
    server (:func:`one_rank`); False where the test is about the rank processes themselves."""
    return [
        sys.executable,
        RANK_LAUNCHER,
        *(["--preloaded"] if preloaded else []),
        "--ranks",
        str(ranks),
        "--master_port",
        str(free_port()),
        script,
        *args,
    ]


def torchrun(script: str = TRAIN, *args: str, ranks: int = 2, preloaded: bool = False) -> list[str]:
    """``torchrun --nproc_per_node N --master_port P script args``. ``preloaded``: each rank forked from the
    preload server (``--no-python python tests/preloaded_python.py script args``), where neither the launcher
    nor the rank processes are the subject."""
    python = ["--no-python", sys.executable, PRELOADED_PYTHON] if preloaded else []
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_port", str(free_port()), *python, script, *args,
    ]  # fmt: skip


def one_rank(script: str = TRAIN, *args: str, preloaded: bool = True) -> list[str]:
    """``python script args``: one rank, no launcher. ``preloaded``: through ``tests/preloaded_python.py``,
    which forks the job from the session's preload server with torch, DeepSpeed and transformers imported
    (~7 s of CPU less a process; conftest starts the server). False where the process itself is the subject
    (signals, ``/proc``, start-up, what a user's terminal shows, memory benchmarks): the forked job's parent,
    command line and string-hash seed are the server's."""
    return [sys.executable, PRELOADED_PYTHON, script, *args] if preloaded else [sys.executable, script, *args]


def preloaded_python_program(directory) -> str:
    """An executable ``directory/python`` that runs its arguments as :func:`one_rank` does, forked from the
    preload server: for programs that take the interpreter of the processes they start
    (``repro/study.py --python``, ``bench/compare_trainers.py --python``)."""
    python = os.path.join(str(directory), "python")
    os.makedirs(str(directory), exist_ok=True)
    with open(python, "w") as handle:
        handle.write(f'#!/bin/sh\nexec "{sys.executable}" "{PRELOADED_PYTHON}" "$@"\n')
    os.chmod(python, 0o755)
    return python


def run_in_process(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python script args`` inside the test's own process (``runpy``, ``sys.argv`` set): its exit status
    (``SystemExit``, as ``run_main`` ends it), stdout (the project's log included) and stderr captured.
    Only for single-process entry points that start no process group (the importance tool's reading of a
    run, plan_memory, compare, export): ~8 s of interpreter start-up less than a subprocess each."""
    import contextlib
    import io
    import logging
    import runpy

    out, err = io.StringIO(), io.StringIO()
    handlers = [h for h in logging.getLogger("ds_loradrop").handlers if isinstance(h, logging.StreamHandler)]
    streams = [handler.setStream(out) for handler in handlers]
    saved_argv, status = sys.argv, 0
    sys.argv = [script, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
    return subprocess.CompletedProcess([script, *args], status, out.getvalue(), err.getvalue())


def ranks_that_logged(output: str) -> set[str]:
    return set(re.findall(r"\[ds_loradrop rank(\d+)\]", output))


def assert_torn_down(output: str) -> None:
    """Every rank of a finished multi-rank job destroyed its process group and none aborted at exit.

    Reported: about one short 2-rank job in eight ended with rank 1 aborting after ``done in ...``
    ("terminate called without an active exception"), a gloo group still alive at interpreter exit;
    ``engine.shutdown_distributed`` now destroys it on every rank. Checked on every multi-rank launch of the
    suite (tests/test_clean_exit.py repeats the teardown on its own)."""
    ranks = ranks_that_logged(output)
    if len(ranks) < 2:
        return
    for rank in sorted(ranks):
        assert f"[ds_loradrop rank{rank}] destroying the process group" in output, f"rank {rank}: no teardown"
    assert "terminate called" not in output, output[-3000:]


def launch(command, env, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``command`` to its end; it must exit 0, tear down on every rank and leave no shared memory."""
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{command}\nSTDOUT\n{result.stdout[-6000:]}\nSTDERR\n{result.stderr[-6000:]}"
    )
    assert_torn_down(result.stdout + result.stderr)
    assert_no_shm_buffers_left(command)
    return result


def job_env(root) -> dict:
    env = {**os.environ, "DS_LORADROP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    # MLflow's system metrics every second (10 by default): the tests' jobs last seconds
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def assert_partitioned_on_two_ranks(log: str, stages=("stage1", "stage2"), slack: int = 0) -> None:
    """Each stage's log line on both ranks says every tensor is partitioned and the rank holds half of the
    elements (``slack`` more: tensors whose size is odd, or too small to split evenly)."""
    for stage in stages:
        lines = re.findall(
            rf"\[ds_loradrop rank(\d)\] {stage}: \d+ trainable parameters; ZeRO stage 3: "
            r"(\d+)/(\d+) tensors partitioned, (\d+)/(\d+) elements",
            log,
        )
        assert sorted(rank for rank, *_ in lines) == ["0", "1"], stage
        for _, partitioned, tensors, local, total in lines:
            assert int(partitioned) == int(tensors) and int(local) * 2 <= int(total) + slack, stage
