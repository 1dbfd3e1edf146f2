"""Every rank of every job imports the training recipe: what it does not need at start-up stays out (PEFT
through transformers' scheduler helpers ~3-4 s, rouge-score's nltk and scipy ~2 s, MLflow through
DeepSpeed's autotuner ~2 s, matplotlib), imported where it is used (the exports, rank 0's scoring and
tracking, the plots)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.unit

# mlflow: DeepSpeed's autotuner would import it on every rank (engine._import_deepspeed hides it); the
# global rank 0 imports it when it starts tracking, after the flags are parsed
NOT_AT_START = ("peft", "nltk", "rouge_score", "sacrebleu", "matplotlib", "mlflow")


def test_the_training_entry_point_imports_none_of_what_it_does_not_need_at_start():
    probe = (
        "import sys; sys.argv = ['train.py', '--help']; import runpy\n"
        "try:\n    runpy.run_path('launch/train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {NOT_AT_START!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
