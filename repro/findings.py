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
    """One of the earlier study's runs and its rerun on the final commit (same command, same seed)."""

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


@dataclass
class Facts:
    """The numbers the sentences quote besides the comparisons."""

    loradrop_bleu: list[float]
    loradrop_share: float | None  # LoRA-drop's trainable parameters, % of LoRA's
    dart_bleu: dict[str, list[float]]  # "lora" / "loradrop" -> BLEU per seed
    dart_template_bleu: float | None
    gsm8k: list[tuple[str, float]]  # (row, accuracy %)
    reruns: list[Rerun] = field(default_factory=list)


def reading(difference: float, adjusted_p: float) -> str:
    """A difference's reading: its sign only where significant."""
    words = verdict(difference, adjusted_p)
    return {"higher": "positive, significant", "lower": "negative, significant"}.get(words, words)


def cite(family: Family, adjusted: list[float], index: int) -> str:
    """``+2.92 ± 1.84 BLEU (n = 4, p (Holm) 1.000)``."""
    c = family.comparisons[index]
    se = "" if math.isnan(c.standard_error) else f" ± {c.standard_error:.2f}"
    return f"{c.mean:+.2f}{se} BLEU (n = {c.n}, p (Holm) {p_text(adjusted[index])})"


def significance(family: Family, adjusted: list[float], indices: list[int]) -> str:
    """Which of ``indices`` are significant after the correction, in words."""
    significant = [i for i in indices if adjusted[i] < ALPHA]
    if not significant:
        return (
            "this difference is not significant after Holm's correction"
            if len(indices) == 1
            else "none of these differences is significant after Holm's correction"
        )
    named = "; ".join(
        f"{family.comparisons[i].label} ({reading(family.comparisons[i].mean, adjusted[i])})"
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
    low, high = family.comparisons[lora].interval()
    paper_gap = PAPER_E2E["lora"] - PAPER_E2E["loradrop"]
    lora_reading = verdict(gap, adjusted[lora])
    if lora_reading == "higher":
        paper = "the paper's parity is not reproduced here"
    elif lora_reading == "lower":
        paper = "LoRA-drop does better here than the paper reports"
    else:
        seeds = family.comparisons[lora].n
        paper = f"with {seeds} seeds the data neither show nor rule out the paper's parity"
    if not math.isnan(low):
        inside = "inside" if low <= paper_gap <= high else "outside"
        paper += f" (the paper's gap is {inside} the 95 % interval of the gap here, {low:+.2f} to "
        paper += f"{high:+.2f})"
    return [
        (
            f"- **E2E, 1,200 rows, each method at its tuned rate.** LoRA-drop (T = 0.9) {share}scores "
            f"{fmt(facts.loradrop_bleu)} BLEU (n = {len(facts.loradrop_bleu)}); LoRA − LoRA-drop "
            f"{cite(family, adjusted, lora)}. {len(above)} of the {len(others)} other methods score above "
            f"LoRA-drop on average over the seeds both ran (method − LoRA-drop: {listed}); "
            f"{significance(family, adjusted, list(others.values()))}. The paper reports LoRA-drop "
            f"{paper_gap:.2f} BLEU below LoRA at half the parameters on Llama-2-7b "
            f"({PAPER_E2E['loradrop']:.2f} vs {PAPER_E2E['lora']:.2f}); the gap here is {gap:.2f}: {paper}."
        )
    ]


def matched_finding(family: Family, adjusted: list[float], where: Indices, facts: Facts) -> list[str]:
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
        }.get(words, "no significant change of the gap with 4x the data")
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
    listed = ", ".join(f"{label} {accuracy:.1f} %" for label, accuracy in facts.gsm8k)
    best = max(accuracy for _, accuracy in facts.gsm8k)
    floor = (
        " The 135M model is near the floor on grade-school arithmetic: this row cannot tell the methods "
        "apart."
        if best < 10
        else ""
    )
    return [f"- **GSM8K** (one seed, 500 held-out training problems): {listed}.{floor}"]


def provenance_finding(facts: Facts) -> list[str]:
    if not facts.reruns:
        return []
    moved = ", ".join(f"{r.cell} {r.delta:+.2f}" for r in facts.reruns)
    spreads = [r.seed_spread for r in facts.reruns if r.seed_spread is not None]
    largest = max(abs(r.delta) for r in facts.reruns)
    within = (
        f"; the largest move, {largest:.2f}, is {'within' if largest <= max(spreads) else 'beyond'} the "
        f"cells' seed spreads ({', '.join(f'{s:.2f}' for s in spreads)})"
        if spreads
        else ""
    )
    return [
        (
            f"- **Provenance.** The earlier study's first cells rerun on the final commit moved by {moved} "
            f"BLEU{within}."
        )
    ]


def findings_section(family: Family, adjusted: list[float], where: Indices, facts: Facts) -> list[str]:
    """The findings: one paragraph per table, then every comparison of the family worded by its p (Holm)."""
    lines = ["", "## Findings", ""]
    if not family.comparisons:
        return lines + ["No comparison has two finished cells yet."]
    lines += e2e_finding(family, adjusted, where, facts)
    lines += matched_finding(family, adjusted, where, facts)
    lines += scale_finding(family, adjusted, where)
    lines += dart_finding(family, adjusted, where, facts)
    lines += gsm8k_finding(facts)
    lines += provenance_finding(facts)
    lines += ["", f"Every comparison, worded by p (Holm) over all {len(family.comparisons)}:", ""]
    for comparison, p in zip(family.comparisons, adjusted):
        lines.append(
            f"- {comparison.label}: {comparison.mean:+.2f} BLEU over {comparison.n} seed(s), p (Holm) "
            f"{p_text(p)}: {reading(comparison.mean, p)}."
        )
    return lines
