"""A chaos run: a training job under launch/restart.py receives K faults at seeded random times, and must
still end as an uninterrupted run of the same command ends.

    python bench/chaos.py --faults 6 --seed 1 --output_dir /tmp/chaos --reference /tmp/reference \\
        [--json result.json] -- deepspeed --num_gpus 2 launch/train.py ... (without --output_dir)

``--shrink_hostfile FILE --shrink_to N``: after the first fault the hostfile the command launches from
(``deepspeed --hostfile FILE --no_ssh ...``, as launch/node_launch.sh does) is rewritten to N slots on
localhost, as when a node is lost: the restarts run on fewer ranks and must continue the run (the
portable checkpoint state, the global batch kept); compared with ``--tolerance`` (default 1e-6, exact on
the same ranks).

Faults, each kind in turn in a seeded random order, one per attempt of the job (each waits for the
attempt's ranks to be training, then a random delay):

- ``kill_rank``: SIGKILL of a random rank (a lost node, the OOM killer);
- ``term_rank``: SIGTERM to a random rank (preemption of one node: the ranks agree, checkpoint and exit);
- ``kill_during_save``: SIGKILL of a random rank while a checkpoint is being written (``.saving-*``).

A fault whose moment never comes (the job finished first) is not counted as injected. The reference is
the same command run once without faults (made here when ``--reference`` does not hold a finished run).
Checked: exit status 0, the final adapters against the reference (max abs difference), one MLflow run,
FINISHED, whose ``restarts`` equals the number of faults injected. Printed (and written with ``--json``):
faults injected, survived, steps repeated (work redone after rolling back to a checkpoint), the
difference, and the verdict.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

RESTART = os.path.join(REPO_ROOT, "launch", "restart.py")
FAULTS = ("kill_rank", "term_rank", "kill_during_save")


@dataclass
class ChaosResult:
    faults_planned: int
    faults_injected: list[str] = field(default_factory=list)
    exit_status: int | None = None
    restarts_recorded: int | None = None
    mlflow_runs: int | None = None
    mlflow_status: str | None = None
    max_abs_difference: float | None = None
    steps_repeated: int = 0
    seconds: float = 0.0
    tolerance: float = 1e-6

    @property
    def survived(self) -> bool:
        return (
            self.exit_status == 0
            and self.mlflow_runs == 1
            and self.mlflow_status == "FINISHED"
            and self.restarts_recorded == len(self.faults_injected)
            and self.max_abs_difference is not None
            and self.max_abs_difference <= self.tolerance
        )


def rank_pids(output_dir: str) -> dict[int, int]:
    """rank -> pid of the training processes of the job writing to ``output_dir``."""
    found = {}
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as handle:
                args = handle.read().split(b"\0")
            if b"launch/train.py" not in b" ".join(args) or output_dir.encode() not in args:
                continue
            with open(cmdline.replace("cmdline", "environ"), "rb") as handle:
                env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(cmdline.split("/")[2])
    return found


def attempt_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        return int(env.get(b"DS_LORADROP_RESTART_COUNT", b"0"))
    except (OSError, ValueError):
        return None


def is_training(output_dir: str) -> bool:
    """Past start-up: a stage has written a checkpoint or its adapter files in this attempt (coarse)."""
    return bool(glob.glob(os.path.join(output_dir, "checkpoints", "*"))) or os.path.isdir(
        os.path.join(output_dir, "stage1_adapter")
    )


def wait_for(predicate, job: subprocess.Popen, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if predicate():
            return True
        time.sleep(poll)
    return False


def inject(kind: str, output_dir: str, job: subprocess.Popen, rng: random.Random, attempt: int) -> bool:
    """One fault into attempt ``attempt`` of the job; True if it was delivered."""

    def ranks_of_attempt():
        pids = rank_pids(output_dir)
        return {r: p for r, p in pids.items() if attempt_of(p) == attempt}

    if not wait_for(lambda: len(ranks_of_attempt()) > 0, job, 600):
        return False
    attempt_started = time.time()
    if not wait_for(lambda: is_training(output_dir), job, 600):
        return False
    if kind == "kill_during_save":
        # a save of this attempt (an earlier attempt's interrupted one may still lie there)
        saving = os.path.join(output_dir, "checkpoints", ".saving-*")

        def saving_now():
            return any(os.path.getmtime(p) >= attempt_started for p in glob.glob(saving) if os.path.exists(p))

        if not wait_for(saving_now, job, 600, poll=0.005):
            return False
    else:
        time.sleep(rng.uniform(0.5, 4.0))
    ranks = ranks_of_attempt()
    if not ranks or job.poll() is not None:
        return False
    rank = rng.choice(sorted(ranks))
    try:
        os.kill(ranks[rank], signal.SIGTERM if kind == "term_rank" else signal.SIGKILL)
    except ProcessLookupError:
        return False
    print(f"[chaos] attempt {attempt}: {kind} -> rank {rank} (pid {ranks[rank]})", flush=True)
    return True


def with_output(command: list[str], output_dir: str) -> list[str]:
    return [*command, "--output_dir", output_dir]


def run_chaos(
    command: list[str], output_dir: str, faults: int, seed: int, shrink: tuple[str, int] | None = None
) -> ChaosResult:
    rng = random.Random(seed)
    plan = [FAULTS[i % len(FAULTS)] for i in range(faults)]  # every kind, in a seeded order
    rng.shuffle(plan)
    result = ChaosResult(faults_planned=faults)
    started = time.monotonic()
    job = subprocess.Popen(
        [sys.executable, RESTART, "--max_restarts", str(faults + 2), "--restart_delay", "1", "--",
         *with_output(command, output_dir)],
        cwd=REPO_ROOT,
    )  # fmt: skip
    for attempt, kind in enumerate(plan):
        if job.poll() is not None:
            break
        if inject(kind, output_dir, job, rng, attempt):
            result.faults_injected.append(kind)
        else:
            break
        if shrink is not None and attempt == 0:
            with open(shrink[0], "w") as handle:
                handle.write(f"localhost slots={shrink[1]}\n")
            print(f"[chaos] hostfile {shrink[0]} now has {shrink[1]} slot(s)", flush=True)
        # the next attempt starts from its newest checkpoint
        wait_for(
            lambda a=attempt: any(attempt_of(p) == a + 1 for p in rank_pids(output_dir).values()), job, 600
        )
    result.exit_status = job.wait()
    result.seconds = round(time.monotonic() - started, 1)
    return result


def check_against(result: ChaosResult, output_dir: str, reference: str) -> ChaosResult:
    from safetensors.torch import load_file

    adapter = "adapter/adapter_model.safetensors"
    if result.exit_status == 0 and os.path.isfile(os.path.join(output_dir, adapter)):
        got, want = load_file(os.path.join(output_dir, adapter)), load_file(os.path.join(reference, adapter))
        if sorted(got) == sorted(want):
            result.max_abs_difference = max(float((got[k] - want[k]).abs().max()) for k in want)
    with open(os.path.join(output_dir, "tracking.json")) as handle:
        tracking = json.load(handle)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    run = client.get_run(tracking["run_id"])
    experiment_runs = client.search_runs([run.info.experiment_id])
    result.mlflow_runs = sum(r.info.run_name == run.info.run_name for r in experiment_runs)
    result.mlflow_status = run.info.status
    result.restarts_recorded = int(float(run.data.tags.get("restarts", run.data.metrics.get("restarts", -1))))
    history = client.get_metric_history(run.info.run_id, "stage2/loss") + client.get_metric_history(
        run.info.run_id, "stage1/loss"
    )
    result.steps_repeated = len(history) - len({(m.key, m.step) for m in history})
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], usage="%(prog)s [options] -- TRAINING COMMAND (no --output_dir)"
    )
    parser.add_argument("--faults", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--reference", required=True, help="An uninterrupted run of the command (made if absent)."
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--shrink_hostfile", default=None, help="Hostfile to shrink after the first fault.")
    parser.add_argument("--shrink_to", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-6, help="Max abs difference to the reference.")
    args = parser.parse_args(argv[:split])
    if split == len(argv) or split == len(argv) - 1:
        print("error: give the training command after --", file=sys.stderr)
        return 2
    command = argv[split + 1 :]
    if "--output_dir" in command:
        print("error: the command must not set --output_dir (chaos.py sets it)", file=sys.stderr)
        return 2
    if os.path.exists(args.output_dir):
        print(f"error: --output_dir {args.output_dir!r} exists; chaos needs a fresh one", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.reference, "summary.json")):
        subprocess.run(with_output(command, args.reference), cwd=REPO_ROOT, check=True)
    shrink = (args.shrink_hostfile, args.shrink_to) if args.shrink_hostfile else None
    result = check_against(
        run_chaos(command, args.output_dir, args.faults, args.seed, shrink), args.output_dir, args.reference
    )
    result.tolerance = args.tolerance
    report = {**asdict(result), "survived": result.survived}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0 if result.survived else 1


if __name__ == "__main__":
    sys.exit(main())
