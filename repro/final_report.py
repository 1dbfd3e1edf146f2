"""REPRODUCTION.md for the final grid (every method at its tuned rate), from committed result files only.

    python repro/study.py report --grid final        # writes REPRODUCTION.md and repro/figures/

Every comparison is paired by seed (same seed = same data order and stage-1 sample) and tested with a
paired t-test; the p-values of all comparisons in the report form one family, corrected with Holm's method
(``repro/stats.py``). The findings use the corrected values. Lower-cased DART BLEU is the one each run
scored when it finished (``rescored_metrics`` in its result file).
"""

from __future__ import annotations

import gzip
import json
import os

from findings import Facts, GSM8KRow, Indices, Rerun, findings_section
from grid import BASELINE_PARAMETERS, BASELINES, METHOD_LABELS, REPO_ROOT, RERUN, Grid, short_label
from report import fmt, load_results, mean_std
from scipy import stats as scipy_stats
from stats import Family, p_text, paired, verdict

PAPER_REPORT = os.path.join(REPO_ROOT, "repro", "PAPER_GRID.md")

LORA_PARAMETERS = 460_800


def seed_metric(runs: list[dict], metric: str) -> dict[int, float]:
    return {r["seed"]: r["eval_metrics"][metric] for r in runs if metric in r.get("eval_metrics", {})}


def parameters(runs: list[dict]) -> list[float]:
    return [float(r["trainable_parameters"]) for r in runs]


def share_of_lora(counts: list[float]) -> float | None:
    """A cell's mean trainable parameters as a percentage of LoRA's; None before it has a run."""
    return 100 * sum(counts) / len(counts) / LORA_PARAMETERS if counts else None


def share_text(percent: float) -> str:
    """``52.1 %`` of LoRA's parameters; ``292x`` where a method trains far more (full fine-tuning)."""
    return f"{percent:.1f} %" if percent < 1000 else f"{percent / 100:,.0f}x"


def parameters_text(counts: list[float]) -> str:
    """``240,230 (215,040-258,048) (52.1 %)``: a cell's parameter counts and their share of LoRA's."""
    return f"{count_text(counts)} ({share_text(share_of_lora(counts))})" if counts else "-"


def count_text(values: list[float]) -> str:
    """``230,400`` when every seed has the same count, else ``mean (min-max)``."""
    if not values:
        return "-"
    if min(values) == max(values):
        return f"{values[0]:,.0f}"
    return f"{sum(values) / len(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def lowercased_bleu(runs: list[dict]) -> dict[int, float]:
    """Each run's BLEU lower-cased (DART's official script), as scored when the run finished; a run
    without it is left out. (The committed predictions hold no references: those are dataset rows.)"""
    return {
        run["seed"]: run["rescored_metrics"]["bleu_lowercase"]
        for run in runs
        if "bleu_lowercase" in run.get("rescored_metrics", {})
    }


def comparison_cells(family: Family, index: int | None, adjusted: list[float]) -> str:
    """``Δ ± se (n) | p | p Holm | reading`` of one comparison, or dashes."""
    if index is None:
        return "- | - | - | -"
    c = family.comparisons[index]
    return (
        f"{c.difference_text()} (n={c.n}) | {p_text(c.p_value)} | {p_text(adjusted[index])} | "
        f"{verdict(c.mean, adjusted[index])}"
    )


def machine_hours(*dirs: str) -> float:
    seconds = 0.0
    for directory in dirs:
        for runs in load_results(directory).values():
            seconds += sum(r.get("wall_seconds_launch", 0.0) for r in runs)
    return seconds / 3600


def params_plot(points: list[tuple[str, list[float], list[float]]], path: str) -> None:
    """Parameters (x, log) against validation BLEU (mean ± std over seeds), a point per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9.5, 4.5))
    for label, params, bleu in points:
        if not bleu:
            continue
        mean, std = mean_std(bleu)
        marker = "o" if label.startswith("LoRA-drop") else "s"
        axes.errorbar(
            sum(params) / len(params), mean, yerr=std, fmt=marker, capsize=4, label=f"{label} (n={len(bleu)})"
        )
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (log scale)")
    axes.set_ylabel("E2E validation BLEU (mean ± std over seeds)")
    axes.set_title("Parameters vs BLEU, each method at its tuned learning rate (SmolLM2-135M)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, not on them
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def status_line(
    grids: list[tuple[Grid, dict[str, list[dict]]]], paper_report: str = "repro/PAPER_GRID.md"
) -> str:
    """How much of the grids (the final one first, then the rerun) has finished (every table shows what
    has, n per row) and where the earlier one-rate study, with the paper's threshold and ablation tables,
    is."""
    missing, total, left_count = [], 0, 0
    for position, (grid, runs) in enumerate(grids):
        for cell in (c for c in grid.cells if c.same_as is None):
            seeds = grid.seeds_of(cell)
            total += len(seeds)
            done = {r["seed"] for r in runs.get(cell.name, [])}
            left = [s for s in seeds if s not in done]
            left_count += len(left)
            if left:
                name = cell.name if position == 0 else f"{grid.name} {cell.name}"
                missing.append(f"{name} seed {', '.join(map(str, left))}")
    state = (
        f"**Status: {total - left_count} of {total} runs finished.** Still to run: "
        + "; ".join(missing)
        + ". Every table shows the runs that have finished (n per row)."
        if missing
        else f"**Status: all {total} runs finished.**"
    )
    return (
        f"{state} The earlier study, every method at one rate (5e-4; VeRA 5e-2), with the paper's threshold "
        f"(Table 6) and ablation (Table 7) cells: [repro/PAPER_GRID.md]({paper_report})."
    )


def write_final_report(grid: Grid, results_root: str, output: str, figures_dir: str) -> str:
    """Write REPRODUCTION.md (``output``) and the parameters-vs-BLEU plot; return the text."""
    results_dir = os.path.join(results_root, grid.name)
    results = load_results(results_dir) if os.path.isdir(results_dir) else {}
    tuning_file = os.path.join(results_root, "tuning", "chosen_rates.json")
    choices = {}
    if os.path.isfile(tuning_file):
        with open(tuning_file) as handle:
            choices = json.load(handle)
    runs = {name: results.get(name, []) for name in (c.name for c in grid.cells)}
    bleu = {name: seed_metric(r, "bleu") for name, r in runs.items()}
    family = Family()

    # E2E, every method at its tuned rate, against LoRA-drop
    main_methods = ("lora", "loradrop", *BASELINES)
    main_index = {
        m: family.add(paired(f"{short_label(m)} − LoRA-drop", bleu[f"e2e/{m}"], bleu["e2e/loradrop"]))
        for m in main_methods
        if m != "loradrop"
    }
    # matched budgets: LoRA-drop at the baseline's count minus the baseline
    match_index = {
        b: family.add(
            paired(
                f"LoRA-drop at {short_label(b)}'s budget − {short_label(b)}",
                bleu[f"e2e/loradrop_match_{b}"],
                bleu[f"e2e/{b}"],
            )
        )
        for b in BASELINE_PARAMETERS
    }
    # data scale: LoRA − LoRA-drop at 4,800 rows and the change of that gap; at 1,200 rows the gap is the
    # E2E table's own comparison (one family member, not two)
    gap_1x = family.comparisons[main_index["lora"]] if main_index["lora"] is not None else None
    gap_4x = paired("LoRA − LoRA-drop, 4,800 rows", bleu["e2e4x/lora"], bleu["e2e4x/loradrop"])
    scale_index = {"1x": main_index["lora"], "4x": family.add(gap_4x)}
    if gap_1x and gap_4x:
        per_seed_1x = dict(zip(gap_1x.seeds, gap_1x.differences))
        per_seed_4x = dict(zip(gap_4x.seeds, gap_4x.differences))
        change = "(LoRA − LoRA-drop) at 4,800 − at 1,200 rows"
        scale_index["change"] = family.add(paired(change, per_seed_4x, per_seed_1x))
    # DART (entity split): LoRA-drop − LoRA, cased and lower-cased; both in the family (the official
    # script's metric and the one the other tasks report), which only makes the correction stricter
    dart_lower = {cell: lowercased_bleu(runs[cell]) for cell in ("dart/lora", "dart/loradrop")}
    dart_index = {
        "cased": family.add(paired("DART: LoRA-drop − LoRA", bleu["dart/loradrop"], bleu["dart/lora"])),
        "lower": family.add(
            paired(
                "DART: LoRA-drop − LoRA, lower-cased BLEU",
                dart_lower["dart/loradrop"],
                dart_lower["dart/lora"],
            )
        ),
    }
    adjusted = family.adjusted()
    dart_split = read_dart_split(os.path.join(results_root, grid.name, "dart_split.json"))
    gsm8k = gsm8k_rows(runs, results_dir)
    rerun_dir = os.path.join(results_root, RERUN.name)
    rerun_runs = load_results(rerun_dir) if os.path.isdir(rerun_dir) else {}
    reruns_done = reruns(rerun_runs, results_root)
    facts = Facts(
        loradrop_bleu=list(bleu["e2e/loradrop"].values()),
        loradrop_share=share_of_lora(parameters(runs["e2e/loradrop"])),
        dart_bleu={m: list(bleu[f"dart/{m}"].values()) for m in ("lora", "loradrop")},
        dart_template_bleu=dart_split["template"]["bleu"] if dart_split else None,
        gsm8k=gsm8k,
        reruns=reruns_done,
    )
    where = Indices(main=main_index, matched=match_index, scale=scale_index, dart=dart_index)

    lines = [
        "# Reproduction: LoRA-drop against LoRA and its baselines, each at its own tuned learning rate",
        "",
        (
            "Generated by `python repro/study.py report --grid final` from the committed result files in "
            f"`repro/results/{grid.name}` (one JSON and the compressed predictions per run; never a local "
            "database). SmolLM2-135M-Instruct, adapters on q_proj and v_proj (r = 8), 2 CPU ranks under "
            "ZeRO-2, 1,200 training rows unless said, global batch 8, one epoch; LoRA-drop's stage 1 on a "
            "stratified 10 % sample for 3 epochs, T = 0.9, low-importance layers sharing one adapter."
        ),
        "",
        (
            "**Statistics.** Mean ± sample standard deviation over seeds (n given). Every comparison is "
            "paired by "
            "seed: the same seed gives two cells the same data order and the same stage-1 sample. Δ is "
            "the mean "
            'of the per-seed differences ± its standard error; p is a two-sided paired t-test; "p (Holm)" is '
            f"corrected with Holm's method over all {family.tested} comparisons of this report "
            "together (those with 2 seeds or more; DART's cased and lower-cased BLEU both count, which "
            "only makes the correction stricter). A difference A − B is called higher (A above B) or lower "
            "only where p (Holm) < 0.05."
        ),
        "",
        status_line(
            [(grid, runs), (RERUN, rerun_runs)],
            os.path.relpath(PAPER_REPORT, os.path.dirname(os.path.abspath(output))),
        ),
        *findings_section(family, adjusted, where, facts),
        "",
        "## Learning rates",
        "",
        (
            "Tuned on 200 held-out E2E *training* MRs, one seed per rate (grid and scores: "
            "[repro/TUNING.md](repro/TUNING.md)); the reported split below is never seen by the choice."
        ),
        "",
        "| method | tuned rate | tuning-split BLEU | grid |",
        "|---|---:|---:|---|",
    ]
    for method in main_methods:
        choice = choices.get(method)
        if not choice:
            lines.append(f"| {METHOD_LABELS[method]} | not tuned yet | - | - |")
            continue
        state = "complete" if choice["complete"] else "not finished"
        state += ", at its edge" if choice["at_edge"] else ""
        lines.append(
            f"| {METHOD_LABELS[method]} | {choice['learning_rate']} | {choice['bleu']:.2f} | {state} |"
        )

    lines += [
        "",
        "## E2E: every method at its tuned rate (validation split, 547 MRs)",
        "",
        "Δ: the method minus LoRA-drop (T = 0.9), BLEU.",
        "",
        (
            "| method | rate | parameters (% of LoRA) | n | BLEU | ROUGE-L | Δ BLEU vs LoRA-drop | p | p "
            "(Holm) | reading |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method in main_methods:
        cell = f"e2e/{method}"
        r = runs[cell]
        rate = (choices.get(method) or {}).get("learning_rate", "-")
        params = parameters(r)
        share = parameters_text(params)
        rouge = list(seed_metric(r, "rouge_l").values())
        compared = (
            "- | - | - | (reference)"
            if method == "loradrop"
            else comparison_cells(family, main_index[method], adjusted)
        )
        lines.append(
            f"| {METHOD_LABELS[method]} | {rate} | {share} | {len(r)} | {fmt(list(bleu[cell].values()))} | "
            f"{fmt(rouge)} | {compared} |"
        )
    base = [run["base_eval_metrics"]["bleu"] for run in runs["e2e/lora"] if run.get("base_eval_metrics")]
    if base:
        lines += ["", f"The base model without training scores BLEU {fmt(base[:1])} on the same inputs."]

    lines += [
        "",
        "## Matched budgets",
        "",
        (
            "LoRA-drop's layout at the T that comes closest to each baseline's parameter count (from the "
            "same "
            "seed's stage 1 as the T = 0.9 cell; T chosen by `repro/budget.py`, trained with `--plan`). Δ: "
            "LoRA-drop at the budget minus the baseline."
        ),
        "",
        (
            "| budget of | baseline parameters | baseline BLEU | LoRA-drop parameters | LoRA-drop T (mean) | "
            "LoRA-drop BLEU | Δ BLEU | p | p (Holm) | reading |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    points = [
        (
            short_label(m) if m != "loradrop" else "LoRA-drop T = 0.9",
            parameters(runs[f"e2e/{m}"]),
            list(bleu[f"e2e/{m}"].values()),
        )
        for m in main_methods
        if m != "full"
    ]
    for baseline, budget in BASELINE_PARAMETERS.items():
        matched = runs[f"e2e/loradrop_match_{baseline}"]
        thresholds = [r["plan"]["threshold"] for r in matched if r.get("plan")]
        lines.append(
            f"| {METHOD_LABELS[baseline]} | {budget:,} | {fmt(list(bleu[f'e2e/{baseline}'].values()))} | "
            f"{count_text(parameters(matched))} | {fmt(thresholds, 3)} | "
            f"{fmt(list(bleu[f'e2e/loradrop_match_{baseline}'].values()))} | "
            f"{comparison_cells(family, match_index[baseline], adjusted)} |"
        )
        points.append(
            (
                f"LoRA-drop at {short_label(baseline)}'s budget",
                parameters(matched),
                list(bleu[f"e2e/loradrop_match_{baseline}"].values()),
            )
        )
    figure = os.path.join(figures_dir, "params_vs_bleu.png")
    if any(p[2] for p in points):
        params_plot(points, figure)
        lines += ["", f"![parameters vs BLEU]({os.path.relpath(figure, os.path.dirname(output))})"]

    lines += [
        "",
        "## Data scale: 1,200 vs 4,800 E2E rows",
        "",
        (
            "LoRA and LoRA-drop at their tuned rates on 4x the rows (stage 1 samples 10 % of them, so it "
            "is 4x longer too). Δ: LoRA minus LoRA-drop, seed by seed (on 1,200 rows it is the E2E table's "
            "comparison); the last row compares the two gaps seed by seed."
        ),
        "",
        (
            "| rows | LoRA BLEU | LoRA-drop BLEU | LoRA-drop parameters (% of LoRA) | Δ (LoRA − LoRA-drop) "
            "| p | p (Holm) | reading |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, rows, prefix in (("1x", "1,200", "e2e"), ("4x", "4,800", "e2e4x")):
        kept = parameters(runs[f"{prefix}/loradrop"])
        lines.append(
            f"| {rows} | {fmt(list(bleu[f'{prefix}/lora'].values()))} | "
            f"{fmt(list(bleu[f'{prefix}/loradrop'].values()))} | "
            f"{parameters_text(kept)} | "
            f"{comparison_cells(family, scale_index[key], adjusted)} |"
        )
    lines.append(
        "| gap change (4,800 − 1,200) | | | | "
        f"{comparison_cells(family, scale_index.get('change'), adjusted)} |"
    )

    lines += dart_section(dart_split, runs, bleu, dart_lower, family, dart_index, adjusted)
    lines += gsm8k_section(gsm8k)
    lines += provenance_section(reruns_done)
    hours = machine_hours(*(os.path.join(results_root, g) for g in ("tuning", grid.name, "rerun")))
    lines += [
        "",
        "## Machine time",
        "",
        (
            f"{hours:.1f} hours of launches for this report's runs (tuning, final and rerun grids, 2 CPU "
            "cores), a lower bound: a run resumed after the session that started it ended counts its last "
            "launch only, and a stage 1 rerun for a matched-budget cell is not counted. The earlier study "
            "took 871 minutes."
        ),
    ]
    text = "\n".join(lines) + "\n"
    with open(output, "w") as handle:
        handle.write(text)
    return text


def read_dart_split(path: str) -> dict | None:
    """The DART split's description (``repro/dart_split.py`` writes it), None before it is built."""
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def dart_section(split, runs, bleu, dart_lower, family, dart_index, adjusted) -> list[str]:
    lines = ["", "## DART on a split by entity", ""]
    if split is None:
        return lines + ["Not run yet."]
    sources = ", ".join(
        f"{s} {split['eval_by_source'].get(s, 0)} / {split['train_rows_by_source'].get(s, 0)}"
        for s in sorted(split["dev_inputs_by_source"], key=lambda s: -split["dev_inputs_by_source"][s])
    )
    overlap = split["overlap"]
    template = split["template"]
    lines += [
        (
            "Built by `repro/dart_split.py` from DART's dev file (the only split here): "
            f"{split['num_eval_inputs']} "
            f"evaluated inputs and {split['num_train_rows']:,} training rows ({split['num_train_inputs']} "
            "triple "
            f"sets), each source in proportion to the file (evaluated inputs / training rows: {sources}). "
            "Triple "
            "sets sharing a subject, a subject-object entity or a source table form one of "
            f"{split['num_components']} "
            "components, and a component lies wholly on one side: shared triples "
            f"{overlap['shared_triples']}, shared subjects {overlap['shared_subjects']} (checked). "
            f"{split['num_withheld_inputs']} sets of evaluated components beyond their source's quota are "
            "withheld. "
            "Lower-cased BLEU is what DART's official script reports; each run scores it when it finishes, "
            "from the predictions committed beside its result."
        ),
        "",
        "| row | n | BLEU | BLEU (lower-cased) | ROUGE-L |",
        "|---|---:|---:|---:|---:|",
        (
            f'| copy-the-triples template ("subject predicate object.") | - | {template["bleu"]:.2f} | '
            f"{template['bleu_lowercase']:.2f} | {template['rouge_l']:.2f} |"
        ),
    ]
    for cell in ("dart/lora", "dart/loradrop"):
        r = runs[cell]
        lines.append(
            f"| {'LoRA' if cell == 'dart/lora' else 'LoRA-drop (T = 0.9)'} | {len(r)} | "
            f"{fmt(list(bleu[cell].values()))} | {fmt(list(dart_lower[cell].values()))} | "
            f"{fmt(list(seed_metric(r, 'rouge_l').values()))} |"
        )
    lines += [
        "",
        "| comparison | Δ | p | p (Holm) | reading |",
        "|---|---:|---:|---:|---|",
        f"| LoRA-drop − LoRA, BLEU | {comparison_cells(family, dart_index['cased'], adjusted)} |",
        f"| LoRA-drop − LoRA, lower-cased BLEU | {comparison_cells(family, dart_index['lower'], adjusted)} |",
    ]
    return lines


def evaluated_inputs(results_dir: str, cell: str, seed: int) -> int:
    """How many inputs a finished run was scored on: the lines of its committed predictions."""
    with gzip.open(os.path.join(results_dir, cell, f"seed{seed}.predictions.jsonl.gz"), "rt") as handle:
        return sum(1 for line in handle if line.strip())


def gsm8k_rows(runs: dict[str, list[dict]], results_dir: str) -> list[GSM8KRow]:
    """The GSM8K cells that finished: the base model (scored in the LoRA run, on its inputs), LoRA,
    LoRA-drop; each with the number of problems it was scored on."""
    rows = []
    lora = runs["gsm8k/lora"]
    if lora and lora[0].get("base_eval_metrics"):
        problems = evaluated_inputs(results_dir, "gsm8k/lora", lora[0]["seed"])
        rows.append(GSM8KRow("base model (no training)", lora[0]["base_eval_metrics"]["accuracy"], problems))
    for cell, label in (("gsm8k/lora", "LoRA"), ("gsm8k/loradrop", METHOD_LABELS["loradrop"])):
        if runs[cell]:
            run = runs[cell][0]
            problems = evaluated_inputs(results_dir, cell, run["seed"])
            rows.append(GSM8KRow(label, run["eval_metrics"]["accuracy"], problems))
    return rows


def gsm8k_section(rows: list[GSM8KRow]) -> list[str]:
    lines = [
        "",
        "## GSM8K",
        "",
        (
            "The first 500 problems of GSM8K's training file are evaluated (left out of training; no test "
            "split here) and 1,200 of the rest trained on, one seed. Accuracy: the number after `####` (else "
            "the last number) equals the gold answer. The interval is Wilson's 95 % interval for one run's "
            "share of correct answers (over problems, not seeds)."
        ),
        "",
    ]
    if not rows:
        return lines + ["Not run yet."]
    lines += ["| row | accuracy (%) | 95 % interval | correct |", "|---|---:|---:|---:|"]
    for row in rows:
        interval = scipy_stats.binomtest(row.correct, row.problems).proportion_ci(method="wilson")
        lines.append(
            f"| {row.label} | {row.accuracy:.1f} | {100 * interval.low:.1f}-{100 * interval.high:.1f} | "
            f"{row.correct} of {row.problems} |"
        )
    return lines


def reruns(rerun: dict[str, list[dict]], results_root: str) -> list[Rerun]:
    """The earlier study's cells (seed by seed, from ``results_root``) beside their reruns on the study's
    final code (``rerun``: the rerun grid's results by cell)."""
    paper = load_results(os.path.join(results_root, "paper")) if rerun else {}
    rows = []
    for cell, runs in rerun.items():
        for new in runs:
            old = next((r for r in paper.get(cell, []) if r["seed"] == new["seed"]), None)
            if old is None:
                continue
            earlier = [r["eval_metrics"]["bleu"] for r in paper[cell]]
            rows.append(
                Rerun(
                    cell=cell,
                    earlier=old["eval_metrics"]["bleu"],
                    earlier_commit=old.get("git_commit", ""),
                    rerun=new["eval_metrics"]["bleu"],
                    rerun_commit=new.get("git_commit", ""),
                    seed_spread=mean_std(earlier)[1] if len(earlier) > 1 else None,
                    seeds=len(earlier),
                )
            )
    return rows


def provenance_section(rows: list[Rerun]) -> list[str]:
    lines = [
        "",
        "## Provenance: the earliest cells rerun on the study's final code",
        "",
        (
            "The earlier study's runs were made on 57 commits. Its first cells, rerun with the same "
            "command on the final code (seed 1); every new run also commits its predictions beside its "
            "result. The last column is the earlier cell's standard deviation over its seeds: how far a "
            "score moves with the seed alone."
        ),
        "",
    ]
    if not rows:
        return lines + ["Not run yet."]
    lines += [
        "| cell | earlier BLEU (commit) | rerun BLEU (commit) | Δ | seed spread (std, n) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = f"{row.seed_spread:.2f} (n={row.seeds})" if row.seed_spread is not None else "-"
        lines.append(
            f"| {row.cell} | {row.earlier:.2f} ({row.earlier_commit[:8]}) | {row.rerun:.2f} "
            f"({row.rerun_commit[:8]}) | {row.delta:+.2f} | {spread} |"
        )
    return lines
