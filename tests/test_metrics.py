import os
import subprocess
import sys

import pytest

from ds_loradrop.data.tasks import get_task
from ds_loradrop.eval.metrics import (
    compute_metrics,
    corpus_bleu,
    extract_gsm8k_answer,
    gsm8k_accuracy,
    rouge_l,
)

pytestmark = pytest.mark.unit


def test_bleu_known_values():
    assert corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert corpus_bleu(["completely different words here"], [["the cat sat on the mat"]]) == pytest.approx(
        0.0
    )
    # Hand computation: hyp "the cat sat on a mat" (6 tokens), ref "the cat sat on the mat" (6 tokens):
    # precisions 1-4 grams: 5/6, 3/5, 2/4, 1/3; BP = 1; BLEU = 100 * (5/6*3/5*2/4*1/3) ** (1/4)
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu(["the cat sat on a mat"], [["the cat sat on the mat"]]) == pytest.approx(
        expected, rel=1e-9
    )
    # a second reference that contains the missing n-grams lifts the score to 100
    assert corpus_bleu(
        ["the cat sat on a mat"], [["the cat sat on the mat", "the cat sat on a mat"]]
    ) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu(["x"], [[]])


def test_rouge_l_known_values():
    # LCS("the cat sat", "the cat sat down") = 3; P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7
    assert rouge_l(["the cat sat"], [["the cat sat down"]]) == pytest.approx(100 * 6 / 7)
    # stemming: "sitting" ~ "sit", "cats" ~ "cat"; best reference per example, then the mean
    assert rouge_l(["cats sitting"], [["cat sits", "dog"]]) == pytest.approx(100.0)
    assert rouge_l(["a b", "x y"], [["a b"], ["z"]]) == pytest.approx(50.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3*4=12 dollars.\n#### 1,080", 1080.0),
        ("The answer is #### -42", -42.0),
        ("so it costs 2.5 dollars, then 7.25", 7.25),
        ("first 10, then 1,234,567 apples", 1234567.0),
        ("He lost -3 points", -3.0),
        ("no number at all", None),
        ("#### seventy", None),
        ("#### 72.", 72.0),
        ("#### 18\nQuestion: next one #### 40", 18.0),
    ],
)
def test_gsm8k_answer_extraction(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_accuracy_compares_numbers():
    predictions = ["... #### 1080", "the result is 1,080.", "#### 18", "I don't know"]
    references = [["1,080"], ["1080"], ["18.0"], ["5"]]
    assert gsm8k_accuracy(predictions, references) == pytest.approx(75.0)
    assert compute_metrics(("accuracy",), predictions, references) == {"accuracy": pytest.approx(75.0)}


def test_multi_reference_bleu_equals_the_sacrebleu_command_line(tmp_path, e2e_dir):
    """Variable numbers of references (2 to 43 per E2E MR) against sacrebleu's own CLI on the same files.

    The CLI takes one file per reference stream; inputs with fewer references get empty lines there, which
    sacrebleu's CLI scores as empty references; our API passes None (skipped). With hypotheses of normal
    length the two agree exactly, which is what this checks on real data.
    """
    examples = get_task("e2e").load_eval(e2e_dir, "validation")[:120]
    references = [ex.references for ex in examples]
    # hypotheses: another input's reference, so scores are neither 0 nor 100
    hypotheses = [examples[(i + 1) % len(examples)].references[0] for i in range(len(examples))]
    ours = corpus_bleu(hypotheses, references)
    num_streams = max(len(refs) for refs in references)
    ref_files = []
    for k in range(num_streams):
        path = tmp_path / f"ref{k}.txt"
        path.write_text("".join((refs[k] if k < len(refs) else "") + "\n" for refs in references))
        ref_files.append(str(path))
    (tmp_path / "hyp.txt").write_text("".join(h + "\n" for h in hypotheses))
    cli = os.path.join(os.path.dirname(sys.executable), "sacrebleu")
    result = subprocess.run(
        [cli, *ref_files, "-i", str(tmp_path / "hyp.txt"), "-b", "-w", "6"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 5 < ours < 60
    assert ours == pytest.approx(float(result.stdout.strip()), abs=1e-6)
