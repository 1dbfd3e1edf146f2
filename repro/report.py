"""The report of a grid made with one rate for all (the paper grid: repro/PAPER_GRID.md) from the study's
committed result files (never from a local database). The tuned-rate study's report is final_report.py's.

Every number is a mean ± sample standard deviation over the seeds that finished, with n. A difference to
LoRA-drop (T = 0.9) is given with its standard error ``sqrt(s1^2/n1 + s2^2/n2)`` and called larger than
the seed-to-seed spread when it exceeds two standard errors. A cell that reuses the same seed's LoRA-drop
stage 1 (``plan_from``: the thresholds and ablations) is compared seed by seed instead: the mean of the
per-seed differences ± its standard error, which a single seed already gives (without a spread).
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics

from grid import REPO_ROOT, Cell, Grid

METRICS = ("bleu", "rouge_l", "accuracy")
PAPER_NOTES = {
    "main": (
        "Paper (Llama2-7b): E2E BLEU LoRA 53.70 (4.2M) vs LoRA-drop 53.49 (2.1M); DialogSum ROUGE-L "
        "41.12 (8.4M) vs 40.96 (5.2M)."
    ),
    "threshold": "Paper (Table 6): T = 0.9 keeps about half of the layers; the metric stops rising above it.",
    "ablation": (
        "Paper (Table 7): sharing beats dropping; output-norm selection beats ΔWx inv, random and top-k."
    ),
    "learning_rate": (
        "Not in the paper: LoRA and LoRA-drop at the learning rate the same 30-step training-loss probe "
        "chose for them (repro/results/probes/lora_lr.json), as VeRA's was chosen "
        "(repro/results/probes/vera_lr.json); differences against LoRA-drop at that rate."
    ),
}
TABLE_TITLES = {
    "main": "Full fine-tuning, LoRA, LoRA-drop (the paper's Tables 2 and 5)",
    "threshold": "The threshold T (the paper's Table 6)",
    "ablation": "Selection and sharing ablations at T = 0.9 (the paper's Table 7)",
    "learning_rate": "LoRA, LoRA-drop and VeRA each at its probed learning rate",
}


def load_results(results_dir: str) -> dict[str, list[dict]]:
    """cell name -> its finished runs, ordered by seed."""
    by_cell: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "**", "seed*.json"), recursive=True)):
        with open(path) as handle:
            result = json.load(handle)
        by_cell.setdefault(result["cell"], []).append(result)
    for runs in by_cell.values():
        runs.sort(key=lambda r: r["seed"])
    return by_cell


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def difference(ours: list[float], reference: list[float]) -> str:
    """``+0.42 ± 0.31`` (difference of means ± its standard error), with '**' when beyond 2 SE."""
    if len(ours) < 2 or len(reference) < 2:
        return "-"
    (m1, s1), (m2, s2) = mean_std(ours), mean_std(reference)
    error = math.sqrt(s1**2 / len(ours) + s2**2 / len(reference))
    mark = " **" if error > 0 and abs(m1 - m2) > 2 * error else ""
    return f"{m1 - m2:+.2f} ± {error:.2f}{mark}"


def paired_difference(ours: list[dict], reference: list[dict], metric: str) -> str:
    """Per-seed differences to the reference runs of the same seeds: ``+0.42 ± 0.31 (paired, n=3)`` (mean ±
    standard error of the differences, '**' beyond 2 SE), or ``-3.72 (seed 1)`` for one shared seed."""
    by_seed = {r["seed"]: r["eval_metrics"][metric] for r in reference if metric in r["eval_metrics"]}
    diffs = [
        (r["seed"], r["eval_metrics"][metric] - by_seed[r["seed"]]) for r in ours if r["seed"] in by_seed
    ]
    if not diffs:
        return "-"
    if len(diffs) == 1:
        return f"{diffs[0][1]:+.2f} (seed {diffs[0][0]})"
    values = [d for _, d in diffs]
    error = statistics.stdev(values) / math.sqrt(len(values))
    mark = " **" if error > 0 and abs(statistics.mean(values)) > 2 * error else ""
    return f"{statistics.mean(values):+.2f} ± {error:.2f}{mark} (paired, n={len(values)})"


def runs_of(grid: Grid, cell: Cell, results: dict[str, list[dict]]) -> list[dict]:
    return results.get(cell.same_as or cell.name, [])


def metric_values(runs: list[dict], metric: str, base: bool = False) -> list[float]:
    key = "base_eval_metrics" if base else "eval_metrics"
    return [r[key][metric] for r in runs if metric in r.get(key, {})]


# What "kept layers" means for the methods without a LoRA-drop layout.
LAYERS_OF = {
    "full": "all weights",
    "vera": "every layer (d, b)",
    "tied_lora": "every layer (u, v; tied pair)",
    "sparse_lora": "every layer (SNIP-pruned entries)",
}


def kept(runs: list[dict]) -> str:
    if not runs:
        return "-"
    parts = []
    for target in sorted(runs[0]["retained"]):
        counts = [len(r["retained"][target]) for r in runs]
        total = runs[0]["num_layers"][target]
        parts.append(f"{target.split('_')[0]} {fmt([float(c) for c in counts], 1)}/{total}")
    return ", ".join(parts)


def tables(grid: Grid, name: str, results: dict[str, list[dict]]) -> list[str]:
    """One table per task for the cells of table ``name``, differences against that task's LoRA-drop."""
    tasks = list(dict.fromkeys(c.task for c in grid.cells if c.table == name))
    lines = []
    for task in tasks:
        cells = [c for c in grid.cells if c.table == name and c.task == task]
        # the table's own LoRA-drop cell where it has one (e.g. at another learning rate)
        own = [c.name for c in cells if c.name.startswith(f"{task}/loradrop")]
        lines += table(grid, name, task, cells, results, own[0] if own else f"{task}/loradrop")
    return lines


def table(
    grid: Grid, name: str, task: str, cells: list[Cell], results: dict[str, list[dict]], reference_cell: str
) -> list[str]:
    if not any(runs_of(grid, c, results) for c in cells):
        return [f"### {TABLE_TITLES[name]}: {task}", "", "Not run yet.", ""]
    metric_names = [m for m in METRICS if any(metric_values(runs_of(grid, c, results), m) for c in cells)]
    reference = results.get(reference_cell, [])
    header = [
        "cell",
        "n",
        "kept layers (mean ± std / total)",
        "trainable params",
        "% of LoRA",
        *[f"{m} (mean ± std)" for m in metric_names],
        *[f"{m} vs LoRA-drop" for m in metric_names[:1]],
        "wall time per run (min)",
    ]
    lines = [
        f"### {TABLE_TITLES[name]}: {task}",
        "",
        PAPER_NOTES[name],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for cell in cells:
        runs = runs_of(grid, cell, results)
        if not runs:
            lines.append(
                "| " + " | ".join([cell.label, "0", "not run yet", *[""] * (len(header) - 3)]) + " |"
            )
            continue
        params = [float(r["trainable_parameters"]) for r in runs]
        share = [
            100.0 * r["trainable_parameters"] / r["lora_parameters"] for r in runs if r["lora_parameters"]
        ]
        label = cell.label + (f" (= {cell.same_as})" if cell.same_as else "")
        row = [
            label,
            str(len(runs)),
            kept(runs)
            if runs[0]["method"] in ("lora", "loradrop")
            else LAYERS_OF.get(runs[0]["method"], "every layer"),
            fmt(params, 0),
            fmt(share, 1) if share else "-",
            *[fmt(metric_values(runs, m)) for m in metric_names],
            *[
                "reference"
                if (cell.same_as or cell.name) == reference_cell
                else paired_difference(runs, reference, m)
                if cell.plan_from == reference_cell
                else difference(metric_values(runs, m), metric_values(reference, m))
                for m in metric_names[:1]
            ],
            fmt([r["wall_seconds"] / 60 for r in runs], 1),
        ]
        lines.append("| " + " | ".join(row) + " |")
    base = [r for c in cells for r in runs_of(grid, c, results) if r.get("base_eval_metrics")]
    if base and name == "main":
        values = [fmt(metric_values(base[:1], m, base=True)) for m in metric_names]
        lines.append(
            f"| base model (before training; greedy, seed-independent) | 1 | - | 0 | - | "
            f"{' | '.join(values)} | - | - |"
        )
    return lines + [""]


def importance_figure(grid: Grid, results: dict[str, list[dict]], cell_name: str, path: str) -> bool:
    """Mean ± std over seeds of each layer's normalised importance, one panel per target (Figure 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results.get(cell_name, []) if r.get("normalized_importance")]
    if not runs:
        return False
    targets = sorted(runs[0]["normalized_importance"])
    figure, axes = plt.subplots(
        len(targets),
        1,
        figsize=(
            max(6.0, 1.5 + 0.26 * len(runs[0]["normalized_importance"][targets[0]])),
            2.8 * len(targets),
        ),
        squeeze=False,
    )
    for axis, target in zip(axes[:, 0], targets):
        profiles = [r["normalized_importance"][target] for r in runs]
        layers = range(len(profiles[0]))
        means = [statistics.mean(p[i] for p in profiles) for i in layers]
        stds = [statistics.stdev(p[i] for p in profiles) if len(profiles) > 1 else 0.0 for i in layers]
        axis.bar(layers, means, yerr=stds, color="tab:blue", capsize=2)
        axis.set_title(
            f"{cell_name}: {target}, normalised importance, mean ± std over {len(runs)} seeds", fontsize=10
        )
        axis.set_xlabel("layer")
        axis.set_xticks(list(layers))
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(grid: Grid, results_dir: str, output: str) -> str:
    results = load_results(results_dir)
    total_runs = sum(len(runs) for runs in results.values())
    total_minutes = sum(r["wall_seconds"] for runs in results.values() for r in runs) / 60
    superseded = []
    if grid.name == "paper":
        reproduction = os.path.relpath(os.path.join(REPO_ROOT, "REPRODUCTION.md"), os.path.dirname(output))
        superseded = [
            (
                "**Superseded** by the tuned-rate study, [REPRODUCTION.md]"
                f"({reproduction}): here every method ran at one learning rate (5e-4; VeRA 5e-2), far from "
                "LoRA's best (1e-2), so the tables below compare learning rates as much as methods. They "
                "stay for the threshold (Table 6) and ablation (Table 7) cells, which the tuned-rate study "
                "does not repeat."
            ),
            "",
        ]
    lines = [
        "# Reproduction of LoRA-drop at small scale",
        "",
        *superseded,
        (
            f"Generated by `python repro/study.py report --grid {grid.name}` from the {total_runs} "
            "committed result "
            f"files in `{os.path.relpath(results_dir, REPO_ROOT)}` "
            f"({total_minutes:.0f} minutes of training and evaluation in all). Seeds planned per cell: "
            f"{', '.join(map(str, grid.seeds))}. Values are mean ± sample standard deviation over the "
            "seeds that "
            "finished (n); a difference to LoRA-drop is the difference of means ± its standard "
            "error, marked ** "
            "where it exceeds two standard errors (larger than the seed-to-seed spread). The threshold and "
            "ablation cells reuse the same seed's LoRA-drop stage 1, so they are compared with it seed by "
            "seed (paired: the mean of the per-seed differences ± its standard error; with one seed, the "
            "difference alone)."
        ),
        "",
        "Run or extend it: `python repro/study.py run --grid " + grid.name + " --commit` (finished runs are "
        "skipped, an interrupted one resumes); add a cell to `repro/grid.py` and the same command runs only "
        "the new runs.",
        "",
    ]
    for name in ("main", "threshold", "ablation", "learning_rate"):
        lines += tables(grid, name, results)
    figure = os.path.join(REPO_ROOT, "repro", "figures", f"importance_{grid.name}.png")
    if grid.name != "paper":
        figure = os.path.join(os.path.dirname(os.path.abspath(output)), "importance.png")
    main_cell = next((c.name for c in grid.cells if c.name.endswith("/loradrop")), None)
    if main_cell and importance_figure(grid, results, main_cell, figure):
        lines += [
            "### Importance profile (the paper's Figure 10)",
            "",
            f"![importance]({os.path.relpath(figure, os.path.dirname(os.path.abspath(output)))})",
            "",
        ]
    lines += [
        "### Exact commands",
        "",
        (
            "Each run is the cell's command with `--seed N`; cells with a plan first "
            "run `launch/importance.py` on the same seed's LoRA-drop run."
        ),
        "",
    ]
    for cell in grid.cells:
        runs = results.get(cell.name, [])
        if runs:
            lines.append(f"- `{cell.name}`: `{runs[0]['command']}`")
        elif cell.same_as:
            lines.append(f"- `{cell.name}`: the runs of `{cell.same_as}`")
    findings = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"findings_{grid.name}.md")
    if os.path.isfile(findings):
        with open(findings) as handle:
            lines += ["", handle.read().rstrip()]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as handle:
        handle.write(text)
    return text
