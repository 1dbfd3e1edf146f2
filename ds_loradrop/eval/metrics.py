"""Paper-comparable metrics, computed offline with sacrebleu and rouge-score directly.

(The ``evaluate`` package fetches its metric scripts from the hub at run time, which fails on offline
compute nodes.)

- BLEU: sacrebleu corpus BLEU (13a tokenisation), all references of an input used together; inputs may
  have different numbers of references (missing ones are passed as ``None``, which sacrebleu skips).
- ROUGE-L: rouge-score F-measure with the Porter stemmer, best reference per example, averaged, x100.
- Exact match (``--task custom --eval_metric exact_match``): SQuAD's normalisation, any reference.
- GSM8K accuracy: the number after ``####`` in the generation if present, else its last number; commas
  removed; compared numerically with the gold answer.
"""

from __future__ import annotations

import re
import string

_PUNCTUATION = set(string.punctuation)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def corpus_bleu(predictions: list[str], references: list[list[str]], lowercase: bool = False) -> float:
    """sacrebleu corpus BLEU over all references of each input (``lowercase``: as DART's official script)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every input needs at least one reference")
    import sacrebleu  # here, not at import: only the scoring rank needs it

    num_streams = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(num_streams)]
    return sacrebleu.corpus_bleu(predictions, streams, lowercase=lowercase).score


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over inputs of the best ROUGE-L F-measure against its references, x100."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    from rouge_score import rouge_scorer  # here, not at import: it loads nltk and scipy (~2 s per process)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [
        max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
        for pred, refs in zip(predictions, references)
    ]
    return 100.0 * sum(best) / len(best) if best else 0.0


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_gsm8k_answer(generation: str) -> float | None:
    """The number after the first ``####`` if there is one (a model that goes on after its answer
    may write more), else the last number in the text."""
    if "####" in generation:
        numbers = _NUMBER.findall(generation.split("####", 1)[1])
        if numbers:
            return _to_number(numbers[0])
    numbers = _NUMBER.findall(generation)
    return _to_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(predictions: list[str], references: list[list[str]]) -> float:
    """Share (x100) of generations whose extracted answer equals the gold answer numerically."""
    correct = 0
    for pred, refs in zip(predictions, references):
        answer, gold = extract_gsm8k_answer(pred), _to_number(refs[0])
        correct += answer is not None and gold is not None and abs(answer - gold) < 1e-6
    return 100.0 * correct / len(predictions) if predictions else 0.0


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Share (x100) of generations equal to one of their references after :func:`normalize_answer`."""
    correct = sum(
        normalize_answer(pred) in {normalize_answer(ref) for ref in refs}
        for pred, refs in zip(predictions, references)
    )
    return 100.0 * correct / len(predictions) if predictions else 0.0


METRICS = {"bleu": corpus_bleu, "rouge_l": rouge_l, "accuracy": gsm8k_accuracy, "exact_match": exact_match}


def compute_metrics(
    names: tuple[str, ...], predictions: list[str], references: list[list[str]]
) -> dict[str, float]:
    return {name: METRICS[name](predictions, references) for name in names}
