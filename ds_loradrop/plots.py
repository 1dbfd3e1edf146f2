"""PNG plots of a run: the importance profile per target (the paper's Figures 9/10) and the loss curve."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ds_loradrop.plan import Plan


def plot_importance(plan: Plan, path: str, title: str = "") -> None:
    """Bars of normalised importance over layers, one panel per target; retained layers filled,
    shared layers hatched, dropped layers grey; the threshold's share noted in the legend."""
    targets = list(plan.targets)
    figure, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.6), squeeze=False)
    for axis, name in zip(axes[0], targets):
        target = plan.targets[name]
        layers = range(len(target.normalized))
        colors = ["tab:blue" if i in target.retained else "white" for i in layers]
        hatches = ["" if i in target.retained else ("//" if i in target.shared else "xx") for i in layers]
        bars = axis.bar(layers, target.normalized, color=colors, edgecolor="tab:blue")
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        axis.set_title(f"{name}: {len(target.retained)}/{len(target.normalized)} retained")
        axis.set_xlabel("layer")
        axis.set_ylabel("normalised importance")
        axis.set_xticks(list(layers))
        handles = [plt.Rectangle((0, 0), 1, 1, color="tab:blue", label="retained")]
        if target.shared:
            handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="tab:blue", hatch="//",
                                         label="shared"))
        if target.dropped:
            handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="tab:blue", hatch="xx",
                                         label="dropped"))
        axis.legend(handles=handles, fontsize=8, title=f"T = {plan.threshold}", title_fontsize=8)
    figure.suptitle(title or f"LoRA-drop importance ({plan.selection})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: str) -> None:
    """Training loss against the optimizer step, one line per stage."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        if points:
            steps, losses = zip(*points)
            axis.plot(steps, losses, label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (mean over target tokens)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
