"""Compare the runs of an MLflow experiment: a table (markdown + CSV), metric vs trainable parameters,
and the importance profiles side by side; runs that differ only in the seed are also grouped into one
row with mean ± standard deviation and n. Works against a local store and a tracking server."""

from __future__ import annotations

import csv
import os
import statistics
from dataclasses import dataclass, field

from ds_loradrop.errors import UsageError
from ds_loradrop.tracking.plots import plot_importance_profiles, plot_metric_vs_parameters

EVAL_METRICS = ("bleu", "rouge_l", "accuracy", "exact_match")
# Parameters that do not change what a run learns: runs differing only in these (and the seed) are
# repetitions of one configuration.
NOT_CONFIGURATION = (
    "train.seed",
    "train.output_dir",
    "train.overwrite_output_dir",
    "train.resume",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "train.collective_timeout_minutes",
    "model.model_cache_dir",
    "model_path",
)
NOT_CONFIGURATION_PREFIXES = ("tracking.",)


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
    params: dict[str, str] = field(default_factory=dict)
    seed: str = "-"

    @property
    def configuration(self) -> tuple[tuple[str, str], ...]:
        """The run's parameters without those that do not change what it learns (seed, paths, tracking)."""
        return tuple(
            sorted(
                (key, value)
                for key, value in self.params.items()
                if key not in NOT_CONFIGURATION and not key.startswith(NOT_CONFIGURATION_PREFIXES)
            )
        )


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
    for run in client.search_runs(
        [found.experiment_id], order_by=["attributes.start_time ASC"], max_results=10000
    ):
        params, metrics = run.data.params, run.data.metrics
        targets = [t.strip() for t in params.get("lora.lora_targets", "").split(",") if t.strip()]
        method = params.get("finetuning.method", params.get("drop.method", "?"))  # drop.: older runs
        # A run that trained a plan (LoRA-drop) logged its importance profile: show the plan's columns.
        learns_layout = any(f"normalized_importance/{target}" in metrics for target in targets)
        kept = {}
        for target in targets:
            value, total = metrics.get(f"retained_layers/{target}"), metrics.get(f"num_layers/{target}")
            kept[target] = (
                "-" if value is None else f"{int(value)}/{int(total)}" if total else str(int(value))
            )
        importance = {}
        if learns_layout:
            for target in targets:
                history = client.get_metric_history(run.info.run_id, f"normalized_importance/{target}")
                importance[target] = [m.value for m in sorted(history, key=lambda m: m.step)]
        trainable = metrics.get("trainable_parameters")
        share = metrics.get("trainable_share_of_lora")
        rows.append(
            RunRow(
                run_name=run.info.run_name or run.info.run_id[:8],
                run_id=run.info.run_id,
                status=run.info.status,
                method=method,
                selection=params.get("drop.selection", "-") if learns_layout else "-",
                threshold=params.get("drop.threshold", "-") if learns_layout else "-",
                kept=kept,
                trainable_parameters=int(trainable) if trainable is not None else None,
                share_of_lora=100.0 * share if share is not None else None,
                metrics={name: metrics[f"eval/{name}"] for name in EVAL_METRICS if f"eval/{name}" in metrics},
                importance=importance,
                params=dict(params),
                seed=params.get("train.seed", "-"),
            )
        )
    return rows


@dataclass(frozen=True)
class _Columns:
    """The columns both tables share: the targets seen in any run and the metrics any run has."""

    targets: list[str]
    metric_names: list[str]

    @classmethod
    def of(cls, rows: list[RunRow]) -> _Columns:
        return cls(
            targets=sorted({t for row in rows for t in row.kept}),
            metric_names=[m for m in EVAL_METRICS if any(m in row.metrics for row in rows)],
        )

    def header(self, *leading: str) -> list[str]:
        return [
            *leading,
            "method",
            "selection",
            "threshold",
            *[f"kept {t}" for t in self.targets],
            "trainable params",
            "% of LoRA",
            *self.metric_names,
        ]


def table(rows: list[RunRow]) -> tuple[list[str], list[list[str]]]:
    columns = _Columns.of(rows)
    targets, metric_names = columns.targets, columns.metric_names
    header = columns.header("run", "status")
    body = []
    for row in rows:
        body.append(
            [
                row.run_name,
                row.status,
                row.method,
                row.selection,
                row.threshold,
                *[row.kept.get(t, "-") for t in targets],
                "-" if row.trainable_parameters is None else str(row.trainable_parameters),
                "-" if row.share_of_lora is None else f"{row.share_of_lora:.1f}",
                *["-" if m not in row.metrics else f"{row.metrics[m]:.2f}" for m in metric_names],
            ]
        )
    return header, body


@dataclass
class RunGroup:
    """FINISHED runs of one configuration (differing only in the seed)."""

    label: str
    rows: list[RunRow]

    @property
    def first(self) -> RunRow:
        return self.rows[0]


def group_by_configuration(rows: list[RunRow]) -> list[RunGroup]:
    """FINISHED runs grouped by :attr:`RunRow.configuration`, in order of each group's first run; each group
    is labelled by the parameters that tell the groups apart (e.g. ``drop.threshold=0.8``)."""
    groups: dict[tuple, list[RunRow]] = {}
    for row in rows:
        if row.status == "FINISHED":
            groups.setdefault(row.configuration, []).append(row)
    configurations = [dict(key) for key in groups]
    varying = sorted(
        {
            name
            for config in configurations
            for name in config
            if len({c.get(name) for c in configurations}) > 1
        }
    )
    labelled = []
    for key, members in groups.items():
        config = dict(key)
        label = ", ".join(f"{name}={config.get(name, '-')}" for name in varying) or members[0].method
        labelled.append(RunGroup(label=label, rows=members))
    return labelled


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample standard deviation) with two decimals; a single value has no spread."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def grouped_table(groups: list[RunGroup]) -> tuple[list[str], list[list[str]]]:
    """One row per configuration: n, the seeds, kept layers, trainable parameters, metrics as mean ± std."""
    columns = _Columns.of([row for group in groups for row in group.rows])
    targets, metric_names = columns.targets, columns.metric_names
    header = columns.header("configuration", "n", "seeds")
    body = []
    for group in groups:
        first = group.first
        trainable = [r.trainable_parameters for r in group.rows if r.trainable_parameters is not None]
        shares = [r.share_of_lora for r in group.rows if r.share_of_lora is not None]
        kept = {t: sorted({r.kept.get(t, "-") for r in group.rows}) for t in targets}
        body.append(
            [
                group.label,
                str(len(group.rows)),
                ",".join(r.seed for r in group.rows),
                first.method,
                first.selection,
                first.threshold,
                *[" / ".join(kept[t]) for t in targets],
                "-" if not trainable else f"{statistics.mean(trainable):.0f}",
                "-" if not shares else f"{statistics.mean(shares):.1f}",
                *[
                    mean_std([r.metrics[m] for r in group.rows if m in r.metrics])
                    if any(m in r.metrics for r in group.rows)
                    else "-"
                    for m in metric_names
                ],
            ]
        )
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def write_table(header: list[str], body: list[list[str]], output_dir: str, name: str) -> str:
    """``<name>.md`` and ``<name>.csv`` in ``output_dir``; returns the markdown."""
    markdown = to_markdown(header, body)
    with open(os.path.join(output_dir, f"{name}.md"), "w") as handle:
        handle.write(markdown)
    with open(os.path.join(output_dir, f"{name}.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(body)
    return markdown


def compare(experiment: str, tracking_uri: str | None, output_dir: str) -> str:
    """Write comparison.md/.csv (one row per run), comparison_grouped.md/.csv (one row per configuration,
    mean ± std over seeds), metric_vs_parameters.png, importance_profiles.png; return both tables."""
    rows = collect_runs(experiment, tracking_uri)
    if not rows:
        raise UsageError(f"MLflow experiment {experiment!r} has no runs")
    os.makedirs(output_dir, exist_ok=True)
    markdown = write_table(*table(rows), output_dir, "comparison")
    grouped = write_table(*grouped_table(group_by_configuration(rows)), output_dir, "comparison_grouped")
    plot_metric_vs_parameters(rows, EVAL_METRICS, os.path.join(output_dir, "metric_vs_parameters.png"))
    plot_importance_profiles(rows, os.path.join(output_dir, "importance_profiles.png"))
    title = "Runs that differ only in the seed (mean ± std over seeds, n = number of seeds):"
    return f"{markdown}\n{title}\n\n{grouped}"
