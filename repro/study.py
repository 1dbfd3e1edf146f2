"""The reproduction study: run a grid through the real CLI, resumably, and write its report.

    python repro/study.py run --grid final [--only e2e/lora e2e/loradrop] [--seeds 1 2 3] [--commit]
    python repro/study.py report --grid final [--output REPRODUCTION.md]
    python repro/study.py status --grid final

``--grid`` defaults to ``paper`` (the earlier one-rate study, reported in repro/PAPER_GRID.md); ``final``
is the tuned-rate study reported in REPRODUCTION.md, ``tuning`` its learning-rate search (repro/TUNING.md).

``run`` goes through the grid's cells seed by seed (a cell's plan source first). A run whose result file
``repro/results/<grid>/<cell>/seed<N>.json`` exists is skipped; any other run is launched with
``--resume auto``, so one interrupted by the end of a session continues from its newest checkpoint.
Each finished run's result (metrics, parameters, kept layers, importance, wall time, the exact command)
is written at once and, with ``--commit``, committed on its own. Progress goes to
``study_runs/<grid>/progress.log``; all runs of a grid are one MLflow experiment
(``study_runs/<grid>/mlflow.db``). ``report`` reads only the committed result files.

Run the whole study in the background (``nohup bash repro/campaign.sh > study.log 2>&1 &``: tuning, final,
the provenance rerun) and check the progress file; it takes many hours on a 2-core machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from grid import GRIDS, Cell, Grid

from ds_loradrop.errors import DIVERGED_EXIT_STATUS


@dataclass(frozen=True)
class StudyDirs:
    """Where result files (committed) and run directories (not committed) go."""

    results: str = os.path.join(REPO_ROOT, "repro", "results")
    runs: str = os.path.join(REPO_ROOT, "study_runs")

    def result_path(self, grid: Grid, cell: Cell, seed: int) -> str:
        return os.path.join(self.results, grid.name, cell.name, f"seed{seed}.json")

    def output_dir(self, grid: Grid, cell: Cell, seed: int) -> str:
        return os.path.join(self.runs, grid.name, cell.name, f"seed{seed}")

    def grid_runs(self, grid: Grid) -> str:
        return os.path.join(self.runs, grid.name)


def train_command(dirs: StudyDirs, grid: Grid, cell: Cell, seed: int, python: str) -> list[str]:
    """The exact launch/train.py command of one run (relative paths: it runs in the repository root)."""
    launcher = list(grid.launcher)
    if launcher and launcher[0] == "deepspeed":
        launcher[0] = os.path.join(os.path.dirname(python), "deepspeed")
    else:
        launcher = [python, *launcher]
    tracking = (
        "--mlflow_experiment",
        f"loradrop-study-{grid.name}",
        "--mlflow_tracking_uri",
        f"sqlite:///{os.path.abspath(os.path.join(dirs.grid_runs(grid), 'mlflow.db'))}",
        "--run_name",
        f"{cell.name}/seed{seed}",
    )
    out = dirs.output_dir(grid, cell, seed)
    plan = (
        ("--plan", os.path.relpath(os.path.join(out, "given_plan", "plan.json"), REPO_ROOT))
        if cell.plan_from
        else ()
    )
    return [
        *launcher,
        "launch/train.py",
        *grid.common,
        *grid.task_args.get(cell.task, ()),
        *cell.args,
        *plan,
        "--seed",
        str(seed),
        "--output_dir",
        os.path.relpath(out, REPO_ROOT),
        "--resume",
        "auto",
        *tracking,
    ]


def plan_command(dirs: StudyDirs, grid: Grid, cell: Cell, seed: int, python: str) -> list[str]:
    source = dirs.output_dir(grid, grid.cell(cell.plan_from), seed)
    target = os.path.join(dirs.output_dir(grid, cell, seed), "given_plan")
    plan_args = cell.plan_args
    if cell.parameter_budget is not None:
        threshold = budget_threshold(source, cell.parameter_budget)
        plan_args = (*plan_args, "--threshold", repr(threshold))
    return [
        python,
        "launch/importance.py",
        "--run",
        os.path.relpath(source, REPO_ROOT),
        *plan_args,
        "--output_dir",
        os.path.relpath(target, REPO_ROOT),
    ]


def budget_threshold(source_run: str, budget: int) -> float:
    """The T whose LoRA-drop layout comes closest to ``budget`` parameters, from a run's stage-1 plan
    (its normalised importance) and its stage-1 adapter (the parameters of one layer per target)."""
    from budget import layer_parameters, threshold_for_budget
    from safetensors import safe_open

    plan = read_json(os.path.join(source_run, "plan.json"))
    with safe_open(os.path.join(source_run, "stage1_adapter", "adapter_model.safetensors"), "pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    normalized = {name: target["normalized"] for name, target in plan["targets"].items()}
    return threshold_for_budget(normalized, layer_parameters(shapes, list(normalized)), budget)


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def collect_result(out: str, grid: Grid, cell: Cell, seed: int, command: list[str], seconds: float) -> dict:
    """The small record of a finished run (in ``out``) that the report is built from."""
    summary = read_json(os.path.join(out, "summary.json"))
    plan_file = os.path.join(out, "plan.json")
    plan = read_json(plan_file) if os.path.isfile(plan_file) else None
    return {
        **run_identity(grid, cell, seed, command, seconds),
        "wall_seconds": summary["wall_seconds"],
        "method": summary["method"],
        "trainable_parameters": summary["trainable_parameters"],
        "lora_parameters": summary["lora_parameters"],
        "retained": summary["retained"],
        "num_layers": summary["num_layers"],
        "eval_metrics": summary["eval_metrics"],
        "base_eval_metrics": summary.get("base_eval_metrics", {}),
        "stages": summary["stages"],
        "peak_memory_bytes": summary.get("peak_memory_bytes", []),
        "normalized_importance": {t: p["normalized"] for t, p in plan["targets"].items()} if plan else None,
        "plan": {
            k: plan[k]
            for k in ("threshold", "selection", "low_importance", "stage1_steps", "stage1_planned_steps")
            if k in plan
        }
        if plan
        else None,
        "git_commit": git_commit(),
    }


def ordered_runs(grid: Grid, only: list[str] | None, seeds: list[int] | None) -> list[tuple[Cell, int]]:
    """(cell, seed) pairs to run: task by task, seed by seed, cells in grid order (where a plan's source
    comes before the cells that use it), a source that ``only`` leaves out added first. A cell runs its own
    seeds (the grid's by default), those of ``seeds`` only when given."""
    wanted = [c for c in grid.cells if c.same_as is None and (not only or c.name in only)]
    for cell in list(wanted):
        if cell.plan_from and grid.cell(cell.plan_from) not in wanted:
            wanted.insert(0, grid.cell(cell.plan_from))
    tasks = list(dict.fromkeys(cell.task for cell in wanted))

    def cell_seeds(cell: Cell) -> tuple[int, ...]:
        return tuple(s for s in grid.seeds_of(cell) if seeds is None or s in seeds)

    all_seeds = sorted({s for cell in wanted for s in cell_seeds(cell)})
    return [
        (cell, seed)
        for task in tasks
        for seed in all_seeds
        for cell in wanted
        if cell.task == task and seed in cell_seeds(cell)
    ]


class Progress:
    def __init__(self, dirs: StudyDirs, grid: Grid):
        os.makedirs(dirs.grid_runs(grid), exist_ok=True)
        self.path = os.path.join(dirs.grid_runs(grid), "progress.log")

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")


def launch_logged(command: list[str], log_path: str) -> int:
    """Run ``command`` in the repository root, its output appended to ``log_path``; its exit status."""
    with open(log_path, "a") as log:
        return subprocess.run(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode


def run_stage1_only(dirs: StudyDirs, grid: Grid, cell: Cell, seed: int, python: str, log_path: str) -> None:
    """Stage 1 of a LoRA-drop cell's run, into that run's directory (``--stop_after_stage1``, no MLflow)."""
    command = [*train_command(dirs, grid, cell, seed, python), "--stop_after_stage1", "--report_to", "none"]
    status = launch_logged(command, log_path)
    if status != 0:
        raise RuntimeError(f"{cell.name} seed {seed}: stage 1 failed ({status}); see {log_path}")


def run_one(
    dirs: StudyDirs, grid: Grid, cell: Cell, seed: int, python: str, progress: Progress, commit: bool
) -> None:
    out = dirs.output_dir(grid, cell, seed)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "launch.log")
    if cell.plan_from and not os.path.isfile(os.path.join(out, "given_plan", "plan.json")):
        source = grid.cell(cell.plan_from)
        if not os.path.isdir(os.path.join(dirs.output_dir(grid, source, seed), "stage1_adapter")):
            # Run directories are not committed: on another machine the source's stage 1 (deterministic)
            # is rerun alone, untracked; its result file stays as it is.
            progress(
                f"{cell.name} seed {seed}: no stage 1 of {source.name} seed {seed} here; running it again"
            )
            run_stage1_only(dirs, grid, source, seed, python, log_path)
        status = launch_logged(plan_command(dirs, grid, cell, seed, python), log_path)
        if status != 0:
            raise RuntimeError(f"{cell.name} seed {seed}: plan command failed ({status}); see {log_path}")
    command = train_command(dirs, grid, cell, seed, python)
    progress(f"start {cell.name} seed {seed}: {shlex.join(command)}")
    start = time.perf_counter()
    status = launch_logged(command, log_path)
    seconds = time.perf_counter() - start
    path = dirs.result_path(grid, cell, seed)
    if status == DIVERGED_EXIT_STATUS:
        # A diverged loss is an outcome of the setting (a learning rate too high), not a fault: recorded,
        # with no metrics, so a learning-rate grid can go on.
        result = diverged_result(grid, cell, seed, command, seconds)
        written = [write_result(path, result)]
        progress(f"done {cell.name} seed {seed} in {seconds:.0f}s: diverged")
    elif status != 0:
        raise RuntimeError(
            f"{cell.name} seed {seed}: exit status {status} after {seconds:.0f}s; "
            f"see {log_path} (rerunning the study resumes it)"
        )
    else:
        result = collect_result(out, grid, cell, seed, command, seconds)
        rows = prediction_rows(out)
        result["rescored_metrics"] = rescored_metrics(rows, result["eval_metrics"])
        # The predictions first: a result file is the mark of a finished run.
        written = [copy_predictions(rows, predictions_path(path)), write_result(path, result)]
        scores = ", ".join(
            f"{k} {v:.2f}" for k, v in result["eval_metrics"].items() if k in ("bleu", "rouge_l", "accuracy")
        )
        progress(f"done {cell.name} seed {seed} in {seconds:.0f}s: {scores}")
    if commit:
        subprocess.run(["git", "add", *written], cwd=REPO_ROOT, check=True)
        subprocess.run(
            ["git", "commit", "-q", "-m", f"study {grid.name}: {cell.name} seed {seed}", "--", *written],
            cwd=REPO_ROOT,
            check=True,
        )


def predictions_path(result_path: str) -> str:
    """``seed<N>.json`` -> ``seed<N>.predictions.jsonl.gz`` beside it."""
    return result_path[: -len(".json")] + ".predictions.jsonl.gz"


def prediction_rows(out: str) -> list[dict]:
    """The run's evaluated predictions (``eval/predictions.jsonl``: id, prompt, prediction, references)."""
    with open(os.path.join(out, "eval", "predictions.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def copy_predictions(rows: list[dict], target: str) -> str:
    """The run's predictions, gzip-compressed to ``target``: each input's id and the generated text only.
    The prompts and references are dataset rows and are not committed; the id names the input in the
    data, and the scores a report needs beyond the run's own (lower-cased BLEU) are computed when the run
    finishes (:func:`rescored_metrics`)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = target + ".tmp"
    lines = [json.dumps({"id": row["id"], "prediction": row["prediction"]}) + "\n" for row in rows]
    with gzip.GzipFile(staging, "wb", mtime=0) as handle:  # mtime 0: the same run gives the same bytes
        handle.write("".join(lines).encode("utf-8"))
    os.replace(staging, target)
    return target


def rescored_metrics(rows: list[dict], eval_metrics: dict) -> dict:
    """Scores of a run's prediction rows besides its own: BLEU lower-cased (DART's official script), for
    a run scored by BLEU (not GSM8K's accuracy, whose references are worked solutions)."""
    from ds_loradrop.eval.metrics import corpus_bleu

    if "bleu" not in eval_metrics or not rows or any(not row.get("references") for row in rows):
        return {}
    predictions, references = [row["prediction"] for row in rows], [row["references"] for row in rows]
    return {"bleu_lowercase": corpus_bleu(predictions, references, lowercase=True)}


def write_result(path: str, result: dict) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = path + ".tmp"
    with open(staging, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(staging, path)
    return path


def run_identity(grid: Grid, cell: Cell, seed: int, command: list[str], seconds: float) -> dict:
    """What every result file starts with: the run's place in the grid, its command and launch time."""
    return {
        "grid": grid.name,
        "cell": cell.name,
        "seed": seed,
        "table": cell.table,
        "label": cell.label,
        # the launcher by name (python / deepspeed), not this machine's venv path
        "command": shlex.join([os.path.basename(command[0]), *command[1:]]),
        "wall_seconds_launch": round(seconds, 1),
    }


def diverged_result(grid: Grid, cell: Cell, seed: int, command: list[str], seconds: float) -> dict:
    return {
        **run_identity(grid, cell, seed, command, seconds),
        "diverged": True,
        "eval_metrics": {},
        "git_commit": git_commit(),
    }


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def wait_while_paused(dirs: StudyDirs, grid: Grid, progress: Progress) -> None:
    """Between runs, wait while ``<runs>/<grid>/PAUSE`` exists: a benchmark that must be timed on a quiet
    machine creates it, waits for the running cell to end (``progress.log`` says "paused"), and removes
    it afterwards."""
    flag = os.path.join(dirs.grid_runs(grid), "PAUSE")
    if not os.path.exists(flag):
        return
    progress(f"paused: {flag} exists")
    while os.path.exists(flag):
        time.sleep(10)
    progress("resumed")


def run(
    dirs: StudyDirs, grid: Grid, only: list[str] | None, seeds: list[int], python: str, commit: bool
) -> int:
    progress = Progress(dirs, grid)
    pending = [
        (c, s) for c, s in ordered_runs(grid, only, seeds) if not os.path.isfile(dirs.result_path(grid, c, s))
    ]
    progress(f"grid {grid.name}: {len(pending)} runs to do")
    done = 0
    for cell, seed in pending:
        missing = unmet_needs(dirs, grid, cell, commit)
        if missing:
            progress(f"skipped {cell.name} seed {seed}: {missing}")
            continue
        wait_while_paused(dirs, grid, progress)
        run_one(dirs, grid, cell, seed, python, progress, commit)
        done += 1
    skipped = len(pending) - done
    progress(f"grid {grid.name}: " + (f"{done} runs done, {skipped} skipped" if skipped else "all runs done"))
    return done


def unmet_needs(dirs: StudyDirs, grid: Grid, cell: Cell, commit: bool) -> str | None:
    """Why ``cell`` cannot run yet (None: it can). The DART entity split is written here when missing."""
    from grid import DART_ENTITY_DIR, UNTUNED

    needs = set(cell.needs) | (set(grid.cell(cell.plan_from).needs) if cell.plan_from else set())
    source_args = grid.cell(cell.plan_from).args if cell.plan_from else ()
    if "tuned_rates" in needs and UNTUNED in (*cell.args, *source_args):
        return "its method's learning rate is not tuned yet (repro/results/tuning/chosen_rates.json)"
    if "dart_entity_split" in needs:
        split_dir = os.path.join(REPO_ROOT, DART_ENTITY_DIR)
        if not os.path.isfile(os.path.join(split_dir, "split.json")):
            from dart_split import DEV_FILE, write_split

            dev = os.path.join(REPO_ROOT, "..", "shared", "data", "dart", DEV_FILE)
            description = os.path.join(dirs.results, grid.name, "dart_split.json")
            os.makedirs(os.path.dirname(description), exist_ok=True)
            write_split(dev, split_dir, 500, 1200, description)
            if commit:
                subprocess.run(["git", "add", description], cwd=REPO_ROOT, check=True)
                subprocess.run(
                    [
                        "git",
                        "commit",
                        "-q",
                        "-m",
                        f"study {grid.name}: the DART entity split",
                        "--",
                        description,
                    ],
                    cwd=REPO_ROOT,
                    check=True,
                )
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "report", "status"))
    parser.add_argument("--grid", default="paper", choices=sorted(GRIDS))
    parser.add_argument(
        "--only", nargs="*", default=None, help="Cells to run (their plan sources come along)."
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="Default: the grid's seeds.")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run's result file.")
    parser.add_argument(
        "--output",
        default=None,
        help="report: where to write (default REPRODUCTION.md for the final grid, repro/TUNING.md for the "
        "tuning grid, repro/PAPER_GRID.md for the paper grid (one rate for all, the paper's Tables 6 and 7), "
        "<runs_dir>/<grid>/REPRODUCTION.md otherwise).",
    )
    parser.add_argument(
        "--results_dir", default=StudyDirs.results, help="Result files (default repro/results)."
    )
    parser.add_argument("--runs_dir", default=StudyDirs.runs, help="Run directories (default study_runs).")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="The interpreter of each run's command (default: this one; the result files name it by its "
        "file name).",
    )
    args = parser.parse_args(argv)
    grid = GRIDS[args.grid]
    dirs = StudyDirs(os.path.abspath(args.results_dir), os.path.abspath(args.runs_dir))
    unknown = [name for name in args.only or [] if name not in {c.name for c in grid.cells}]
    if unknown:
        print(f"error: unknown cell(s) {unknown} in grid {grid.name!r}", file=sys.stderr)
        sys.exit(2)
    seeds = args.seeds or None
    if args.action == "run":
        try:
            run(dirs, grid, args.only, seeds, args.python, args.commit)
        except RuntimeError as error:
            Progress(dirs, grid)(f"stopped: {error}")
            sys.exit(1)
    elif args.action == "status":
        for cell, seed in ordered_runs(grid, args.only, seeds):
            state = (
                "done"
                if os.path.isfile(dirs.result_path(grid, cell, seed))
                else ("started" if os.path.isdir(dirs.output_dir(grid, cell, seed)) else "to do")
            )
            print(f"{cell.name:24s} seed {seed}: {state}")
    elif grid.name == "final":
        from final_report import write_final_report

        output = args.output or os.path.join(REPO_ROOT, "REPRODUCTION.md")
        figures = os.path.join(REPO_ROOT, "repro", "figures")
        print(write_final_report(grid, dirs.results, output, figures), end="")
    elif grid.name == "tuning":
        from tuning import write_tuning_report

        output = args.output or os.path.join(REPO_ROOT, "repro", "TUNING.md")
        print(write_tuning_report(grid, os.path.join(dirs.results, grid.name), output), end="")
    else:
        from report import write_report

        default = (
            os.path.join(REPO_ROOT, "repro", "PAPER_GRID.md")
            if grid.name == "paper"
            else os.path.join(dirs.grid_runs(grid), "REPRODUCTION.md")
        )
        print(write_report(grid, os.path.join(dirs.results, grid.name), args.output or default), end="")


if __name__ == "__main__":
    main()
