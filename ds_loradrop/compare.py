"""Compare the runs of an MLflow experiment: a table (markdown + CSV), metric vs trainable parameters,
and the importance profiles side by side. Works against a local store and a tracking server."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

from ds_loradrop.errors import UsageError
from ds_loradrop.plots import plot_importance_profiles, plot_metric_vs_parameters

EVAL_METRICS = ("bleu", "rouge_l", "accuracy")


@dataclass
class RunRow:
    run_name: str
    run_id: str
    status: str
    method: str
    selection: str
    threshold: str
    kept: dict[str, str]
    trainable_parameters: int | None
    share_of_lora: float | None
    metrics: dict[str, float]
    importance: dict[str, list[float]] = field(default_factory=dict)


def collect_runs(experiment: str, tracking_uri: str | None) -> list[RunRow]:
    """Every run of ``experiment``, oldest first. Raises UsageError if the experiment does not exist."""
    import mlflow
    from mlflow import MlflowClient

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UsageError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    rows = []
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], max_results=10000):
        params, metrics = run.data.params, run.data.metrics
        targets = [t.strip() for t in params.get("lora.lora_targets", "").split(",") if t.strip()]
        method = params.get("drop.method", "?")
        is_loradrop = method == "loradrop"
        kept = {}
        for target in targets:
            value, total = metrics.get(f"retained_layers/{target}"), metrics.get(f"num_layers/{target}")
            kept[target] = "-" if value is None else f"{int(value)}/{int(total)}" if total else str(int(value))
        importance = {}
        if is_loradrop:
            for target in targets:
                history = client.get_metric_history(run.info.run_id, f"normalized_importance/{target}")
                importance[target] = [m.value for m in sorted(history, key=lambda m: m.step)]
        trainable = metrics.get("trainable_parameters")
        share = metrics.get("trainable_share_of_lora")
        rows.append(RunRow(
            run_name=run.info.run_name or run.info.run_id[:8],
            run_id=run.info.run_id,
            status=run.info.status,
            method=method,
            selection=params.get("drop.selection", "-") if is_loradrop else "-",
            threshold=params.get("drop.threshold", "-") if is_loradrop else "-",
            kept=kept,
            trainable_parameters=int(trainable) if trainable is not None else None,
            share_of_lora=100.0 * share if share is not None else None,
            metrics={name: metrics[f"eval/{name}"] for name in EVAL_METRICS if f"eval/{name}" in metrics},
            importance=importance,
        ))
    return rows


def table(rows: list[RunRow]) -> tuple[list[str], list[list[str]]]:
    targets = sorted({t for row in rows for t in row.kept})
    metric_names = [m for m in EVAL_METRICS if any(m in row.metrics for row in rows)]
    header = ["run", "status", "method", "selection", "threshold", *[f"kept {t}" for t in targets],
              "trainable params", "% of LoRA", *metric_names]
    body = []
    for row in rows:
        body.append([
            row.run_name, row.status, row.method, row.selection, row.threshold,
            *[row.kept.get(t, "-") for t in targets],
            "-" if row.trainable_parameters is None else str(row.trainable_parameters),
            "-" if row.share_of_lora is None else f"{row.share_of_lora:.1f}",
            *["-" if m not in row.metrics else f"{row.metrics[m]:.2f}" for m in metric_names],
        ])
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def compare(experiment: str, tracking_uri: str | None, output_dir: str) -> str:
    """Write comparison.md, comparison.csv, metric_vs_parameters.png, importance_profiles.png; return
    the markdown table."""
    rows = collect_runs(experiment, tracking_uri)
    if not rows:
        raise UsageError(f"MLflow experiment {experiment!r} has no runs")
    header, body = table(rows)
    os.makedirs(output_dir, exist_ok=True)
    markdown = to_markdown(header, body)
    with open(os.path.join(output_dir, "comparison.md"), "w") as handle:
        handle.write(markdown)
    with open(os.path.join(output_dir, "comparison.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(body)
    plot_metric_vs_parameters(rows, EVAL_METRICS, os.path.join(output_dir, "metric_vs_parameters.png"))
    plot_importance_profiles(rows, os.path.join(output_dir, "importance_profiles.png"))
    return markdown
