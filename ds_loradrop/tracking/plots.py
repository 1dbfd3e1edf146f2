"""PNG plots: a run's importance profile per target (the paper's Figures 9/10) and loss curve, and the
comparison of several runs (metric vs trainable parameters, importance profiles side by side)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ds_loradrop.method.plan import Plan


def plot_importance(plan: Plan, path: str, title: str = "") -> None:
    """Bars of normalised importance over layers, one row per target; retained layers filled, shared
    layers hatched, dropped layers grey; the threshold's share noted in the legend.

    The figure widens with the number of layers (30 for SmolLM2, 32 for Llama-2-7b, 80 for 70B) so
    every layer keeps a readable bar and tick label."""
    targets = list(plan.targets)
    num_layers = max(len(plan.targets[name].normalized) for name in targets)
    width = max(6.0, 1.5 + 0.26 * num_layers)
    figure, axes = plt.subplots(len(targets), 1, figsize=(width, 2.9 * len(targets)), squeeze=False)
    for axis, name in zip(axes[:, 0], targets):
        target = plan.targets[name]
        layers = range(len(target.normalized))
        colors = ["tab:blue" if i in target.retained else "white" for i in layers]
        hatches = ["" if i in target.retained else ("//" if i in target.shared else "xx") for i in layers]
        bars = axis.bar(layers, target.normalized, color=colors, edgecolor="tab:blue", width=0.8)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        kept = 100.0 * sum(target.normalized[i] for i in target.retained)
        axis.set_title(
            f"{name}: {len(target.retained)}/{len(target.normalized)} layers retained "
            f"({kept:.1f}% of the importance)",
            fontsize=10,
        )
        axis.set_xlabel("layer")
        axis.set_ylabel("normalised importance")
        axis.set_xlim(-0.7, len(target.normalized) - 0.3)
        axis.set_xticks(list(layers))
        axis.tick_params(axis="x", labelsize=7 if len(target.normalized) > 16 else 9)
        axis.grid(axis="y", alpha=0.3)
        handles = [plt.Rectangle((0, 0), 1, 1, color="tab:blue", label="retained")]
        if target.shared:
            handles.append(
                plt.Rectangle(
                    (0, 0), 1, 1, facecolor="white", edgecolor="tab:blue", hatch="//", label="shared"
                )
            )
        if target.dropped:
            handles.append(
                plt.Rectangle(
                    (0, 0), 1, 1, facecolor="white", edgecolor="tab:blue", hatch="xx", label="dropped"
                )
            )
        axis.legend(
            handles=handles,
            fontsize=8,
            title=f"T = {plan.threshold}",
            title_fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.005, 1.0),
        )
    figure.suptitle(title or f"LoRA-drop importance ({plan.selection})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: str) -> None:
    """Training loss against the optimizer step, one line per stage; validation curves (named
    ``<stage> validation``) with markers."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        if points:
            steps, losses = zip(*points)
            axis.plot(steps, losses, label=name, marker="o" if name.endswith("validation") else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (mean over target tokens)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_metric_vs_parameters(rows, metrics: tuple[str, ...], path: str) -> None:
    """One panel per evaluation metric: each run's score against its trainable parameters.

    ``rows`` are ``compare.RunRow``s (run_name, method, trainable_parameters, metrics)."""
    metric_names = [m for m in metrics if any(m in row.metrics for row in rows)] or ["(no metric)"]
    figure, axes = plt.subplots(1, len(metric_names), figsize=(5 * len(metric_names), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], metric_names):
        for row in rows:
            if metric in row.metrics and row.trainable_parameters is not None:
                axis.scatter(row.trainable_parameters, row.metrics[metric])
                axis.annotate(
                    f"{row.run_name} ({row.method})",
                    (row.trainable_parameters, row.metrics[metric]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        axis.set_xlabel("trainable parameters")
        axis.set_ylabel(metric)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_importance_profiles(rows, path: str) -> None:
    """One panel per target: the normalised importance over layers of every LoRA-drop run."""
    targets = sorted({t for row in rows for t in row.importance}) or ["(no LoRA-drop run)"]
    figure, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.8), squeeze=False)
    for axis, target in zip(axes[0], targets):
        for row in rows:
            profile = row.importance.get(target)
            if profile:
                axis.plot(range(len(profile)), profile, marker="o", label=row.run_name)
        axis.set_title(target)
        axis.set_xlabel("layer")
        axis.set_ylabel("normalised importance")
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
