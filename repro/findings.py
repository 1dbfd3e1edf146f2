"""The final report's findings in words, from its comparisons: what each table says, worded by the
comparisons' Holm-corrected p-values (``stats.verdict``), never by a mean alone.

Every comparison is a difference "A − B" (seed by seed); a sentence names it, its mean ± standard error,
its seeds and its corrected p-value, and calls it significant only below ``stats.ALPHA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from grid import short_label
from report import fmt
from stats import ALPHA, Family, p_text, verdict

# The paper's E2E result on Llama-2-7b: LoRA 53.70 BLEU (4.2M parameters), LoRA-drop 53.49 (2.1M).
PAPER_E2E = {"lora": 53.70, "loradrop": 53.49}


@dataclass
class Indices:
    """Where each of the report's comparisons sits in its family; a key is missing (or None) until both of
    its cells have a finished seed."""

    main: dict[str, int | None] = field(default_factory=dict)  # method − LoRA-drop, by method
    matched: dict[str, int | None] = field(default_factory=dict)  # LoRA-drop at the budget − baseline
    scale: dict[str, int | None] = field(default_factory=dict)  # LoRA − LoRA-drop: "1x", "4x", "change"
    dart: dict[str, int | None] = field(default_factory=dict)  # "cased", "lower"


@dataclass(frozen=True)
class Rerun:
    """One of the earlier study's runs and its rerun on the study's final code (same command, same seed)."""

    cell: str
    earlier: float
    earlier_commit: str
    rerun: float
    rerun_commit: str
    seed_spread: float | None  # the earlier cell's BLEU std over its seeds
    seeds: int

    @property
    def delta(self) -> float:
        return self.rerun - self.earlier


@dataclass(frozen=True)
class GSM8KRow:
    """One GSM8K row: accuracy (%) on ``problems`` held-out problems."""

    label: str
    accuracy: float
    problems: int

    @property
    def correct(self) -> int:
        return round(self.accuracy * self.problems / 100)


@dataclass
class Facts:
    """The numbers the sentences quote besides the comparisons."""

    loradrop_bleu: list[float]
    loradrop_share: float | None  # LoRA-drop's trainable parameters, % of LoRA's
    dart_bleu: dict[str, list[float]]  # "lora" / "loradrop" -> BLEU per seed
    dart_template_bleu: float | None
    gsm8k: list[GSM8KRow]
    reruns: list[Rerun] = field(default_factory=list)


def cite(family: Family, adjusted: list[float], index: int) -> str:
    """``+2.92 ± 1.84 BLEU (n = 4, p (Holm) 1.000)``."""
    c = family.comparisons[index]
    return f"{c.difference_text()} BLEU (n = {c.n}, p (Holm) {p_text(adjusted[index])})"


def significance(family: Family, adjusted: list[float], indices: list[int]) -> str:
    """Which of ``indices`` are significant after the correction, in words."""
    tested = [i for i in indices if not math.isnan(adjusted[i])]
    if not tested:
        return "with one seed this is not tested yet"
    significant = [i for i in tested if adjusted[i] < ALPHA]
    if not significant:
        return (
            "this difference is not significant after Holm's correction"
            if len(tested) == 1
            else "none of these differences is significant after Holm's correction"
        )
    named = "; ".join(
        f"{family.comparisons[i].label} ({verdict(family.comparisons[i].mean, adjusted[i])})"
        for i in significant
    )
    return f"significant after Holm's correction: {named}"


def e2e_finding(family: Family, adjusted: list[float], where: Indices, facts: Facts) -> list[str]:
    lora = where.main.get("lora")
    if lora is None:
        return []
    share = f"trains {facts.loradrop_share:.1f} % of LoRA's parameters and " if facts.loradrop_share else ""
    others = {m: i for m, i in where.main.items() if i is not None}
    above = [m for m, i in others.items() if family.comparisons[i].mean > 0]
    listed = ", ".join(f"{short_label(m)} {family.comparisons[i].mean:+.2f}" for m, i in others.items())
    gap = family.comparisons[lora].mean
    paper_gap = PAPER_E2E["lora"] - PAPER_E2E["loradrop"]
    low, high = family.comparisons[lora].interval()
    if math.isnan(low):
        paper = f"the gap here is {gap:.2f} (one seed: no interval)"
    else:
        # Against the paper's gap, not against zero: whether these runs can tell the two gaps apart.
        inside = low <= paper_gap <= high
        paper = (
            f"the gap here is {gap:.2f}, and its 95 % interval (uncorrected), {low:+.2f} to {high:+.2f}, "
            + (
                f"holds the paper's{' (and zero)' if low <= 0 <= high else ''}: these runs cannot tell the "
                "gap here from the paper's"
                if inside
                else "leaves the paper's out: the gap here differs from the paper's"
            )
        )
    return [
        (
            f"- **E2E, 1,200 rows, each method at its tuned rate.** LoRA-drop (T = 0.9) {share}scores "
            f"{fmt(facts.loradrop_bleu)} BLEU (n = {len(facts.loradrop_bleu)}); LoRA − LoRA-drop "
            f"{cite(family, adjusted, lora)}. {len(above)} of the {len(others)} other methods score above "
            f"LoRA-drop on average over the seeds both ran (method − LoRA-drop: {listed}); "
            f"{significance(family, adjusted, list(others.values()))}. The paper reports LoRA-drop "
            f"{paper_gap:.2f} BLEU below LoRA at half the parameters on Llama-2-7b "
            f"({PAPER_E2E['loradrop']:.2f} vs {PAPER_E2E['lora']:.2f}); {paper}."
        )
    ]


def matched_finding(family: Family, adjusted: list[float], where: Indices) -> list[str]:
    matched = {b: i for b, i in where.matched.items() if i is not None}
    if not matched:
        return []
    below = [b for b, i in matched.items() if family.comparisons[i].mean < 0]
    listed = "; ".join(f"vs {short_label(b)} {cite(family, adjusted, i)}" for b, i in matched.items())
    return [
        (
            f"- **Matched budgets.** LoRA-drop's layout at each baseline's parameter count minus the "
            f"baseline: {listed}. LoRA-drop is below {len(below)} of the {len(matched)} baselines on "
            "average; "
            f"{significance(family, adjusted, list(matched.values()))}."
        )
    ]


def scale_finding(family: Family, adjusted: list[float], where: Indices) -> list[str]:
    one, four, change = (where.scale.get(k) for k in ("1x", "4x", "change"))
    if one is None or four is None:
        return []
    sentence = (
        f"- **Data scale.** LoRA − LoRA-drop is {cite(family, adjusted, one)} on 1,200 rows and "
        f"{cite(family, adjusted, four)} on 4,800 rows."
    )
    if change is not None:
        c = family.comparisons[change]
        words = verdict(c.mean, adjusted[change])
        meaning = {
            "higher": "LoRA gains significantly more from the extra data than LoRA-drop",
            "lower": "LoRA-drop gains significantly more from the extra data than LoRA",
            "no significant difference": "no significant change of the gap with 4x the data",
        }.get(words, "with one seed this is not tested yet")
        sentence += f" The gap's change, seed by seed: {cite(family, adjusted, change)}: {meaning}."
    return [sentence]


def dart_finding(family: Family, adjusted: list[float], where: Indices, facts: Facts) -> list[str]:
    cased, lower = where.dart.get("cased"), where.dart.get("lower")
    if cased is None or facts.dart_template_bleu is None:
        return []
    floor = facts.dart_template_bleu
    means = {m: sum(v) / len(v) for m, v in facts.dart_bleu.items() if v}
    under = [short_label(m) for m, mean in means.items() if mean <= floor]
    floor_words = "both trained methods are above it" if not under else f"not above it: {', '.join(under)}"
    indices = [cased] + ([lower] if lower is not None else [])
    lowered = f"; lower-cased {cite(family, adjusted, lower)}" if lower is not None else ""
    return [
        (
            f"- **DART, split by entity.** LoRA {fmt(facts.dart_bleu['lora'])} BLEU, LoRA-drop "
            f"{fmt(facts.dart_bleu['loradrop'])}; the copy-the-triples template scores {floor:.2f}: "
            f"{floor_words}. LoRA-drop − LoRA {cite(family, adjusted, cased)}{lowered}; "
            f"{significance(family, adjusted, indices)}."
        )
    ]


def gsm8k_finding(facts: Facts) -> list[str]:
    if not facts.gsm8k:
        return []
    listed = ", ".join(f"{row.label} {row.accuracy:.1f} %" for row in facts.gsm8k)
    problems = sorted({row.problems for row in facts.gsm8k})
    floor = (
        " The 135M model is near the floor on grade-school arithmetic: this row cannot tell the methods "
        "apart."
        if max(row.accuracy for row in facts.gsm8k) < 10
        else ""
    )
    counted = " / ".join(f"{n:,}" for n in problems)
    return [f"- **GSM8K** (one seed, {counted} held-out training problems): {listed}.{floor}"]


def move_text(delta: float) -> str:
    """A rerun's move in BLEU: two decimals, three where a move that is not zero would read "+0.00"."""
    return f"{delta:+.3f}" if delta != 0 and round(delta, 2) == 0 else f"{delta:+.2f}"


def provenance_finding(facts: Facts) -> list[str]:
    if not facts.reruns:
        return []
    if all(r.rerun == r.earlier for r in facts.reruns):
        cells = ", ".join(f"{r.cell} {r.rerun:.2f}" for r in facts.reruns)
        return [
            (
                f"- **Provenance.** The earlier study's first cells rerun on the study's final code scored "
                f"the same BLEU to the last digit ({cells}): the commits since changed none of these results."
            )
        ]
    moved = ", ".join(f"{r.cell} {move_text(r.delta)}" for r in facts.reruns)
    judged = [r for r in facts.reruns if r.seed_spread is not None]
    within = [r for r in judged if abs(r.delta) <= r.seed_spread]
    spread = (
        f"; {len(within)} of {len(judged)} moved by no more than their cell's seed spread (std over seeds)"
        if judged
        else ""
    )
    return [
        (
            f"- **Provenance.** The earlier study's first cells rerun on the study's final code moved by "
            f"{moved} BLEU{spread}."
        )
    ]


def findings_section(family: Family, adjusted: list[float], where: Indices, facts: Facts) -> list[str]:
    """The findings: one paragraph per table, then every comparison of the family worded by its p (Holm)."""
    lines = ["", "## Findings", ""]
    if not family.comparisons:
        return lines + ["No comparison has two finished cells yet."]
    lines += e2e_finding(family, adjusted, where, facts)
    lines += matched_finding(family, adjusted, where)
    lines += scale_finding(family, adjusted, where)
    lines += dart_finding(family, adjusted, where, facts)
    lines += gsm8k_finding(facts)
    lines += provenance_finding(facts)
    lines += [
        "",
        (
            f"Every comparison A − B, worded by p (Holm) over all {family.tested} (higher: A significantly "
            "above B; lower: below):"
        ),
        "",
    ]
    for comparison, p in zip(family.comparisons, adjusted):
        lines.append(
            f"- {comparison.label}: {comparison.mean:+.2f} BLEU over {comparison.n} seed(s), p (Holm) "
            f"{p_text(p)}: {verdict(comparison.mean, p)}."
        )
    return lines
