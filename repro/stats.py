"""The study's statistics: one paired analysis throughout.

Two cells run with the same seed see the same data order and (for LoRA-drop cells) the same stage-1
sample, so a comparison is made seed by seed: the mean of the per-seed differences, its standard error,
and a two-sided paired t-test over the seeds both cells finished. The p-values of all of a report's
comparisons (a ``Family``) are corrected together with Holm's step-down method (it controls the
family-wise error rate without assuming independence); the findings' wording follows the corrected values.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class PairedComparison:
    label: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # this cell minus the reference, seed by seed

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.mean(self.differences)

    @property
    def standard_error(self) -> float:
        return statistics.stdev(self.differences) / math.sqrt(self.n) if self.n > 1 else float("nan")

    def difference_text(self) -> str:
        """``+1.79 ± 1.82``: the mean difference ± its standard error (no error below 2 seeds)."""
        se = "" if math.isnan(self.standard_error) else f" ± {self.standard_error:.2f}"
        return f"{self.mean:+.2f}{se}"

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The t interval of the mean difference (nan below 2 seeds)."""
        if self.n < 2:
            return float("nan"), float("nan")
        half = stats.t.ppf(0.5 + confidence / 2, self.n - 1) * self.standard_error
        return self.mean - half, self.mean + half

    @property
    def p_value(self) -> float:
        """Two-sided paired t-test (a one-sample t-test of the differences, which is ``ttest_rel``); nan
        below 2 seeds; 1.0 when every difference is zero, 0.0 when all are the same non-zero value."""
        if self.n < 2:
            return float("nan")
        if all(d == self.differences[0] for d in self.differences):
            return 1.0 if self.differences[0] == 0 else 0.0
        return float(stats.ttest_1samp(self.differences, 0.0).pvalue)


def paired(label: str, cell: dict[int, float], reference: dict[int, float]) -> PairedComparison | None:
    """The comparison of ``cell`` with ``reference`` (seed -> metric) over the seeds both have."""
    seeds = tuple(sorted(set(cell) & set(reference)))
    if not seeds:
        return None
    return PairedComparison(label, seeds, tuple(cell[s] - reference[s] for s in seeds))


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given); nan entries are left out of the family."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(difference: float, adjusted_p: float, alpha: float = ALPHA) -> str:
    """The words a finding may use for one comparison."""
    if math.isnan(adjusted_p):
        return "not tested (one seed)"
    if adjusted_p < alpha:
        return "higher" if difference > 0 else "lower"
    return "no significant difference"


def p_text(p: float) -> str:
    """A p-value as the report writes it: three decimals, or two significant digits below 0.001."""
    return "-" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


class Family:
    """The report's comparisons; Holm-corrected together before the text is written."""

    def __init__(self):
        self.comparisons: list[PairedComparison] = []

    def add(self, comparison: PairedComparison | None) -> int | None:
        if comparison is None:
            return None
        self.comparisons.append(comparison)
        return len(self.comparisons) - 1

    def adjusted(self) -> list[float]:
        return holm([c.p_value for c in self.comparisons])

    @property
    def tested(self) -> int:
        """How many comparisons the correction counts: those with a p-value (2 seeds or more)."""
        return sum(not math.isnan(c.p_value) for c in self.comparisons)
