"""repro/study.py on the tiny grid (tiny-llama, 3 steps a stage, 2 seeds): every run through the real CLI,
a plan made from another cell's stage 1, finished runs skipped, an unfinished one resumed, and the report
with mean ± std over seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from launching import preloaded_python_program

pytestmark = pytest.mark.integration

STUDY = os.path.join(REPO_ROOT, "repro", "study.py")


def _study(args, env):
    result = subprocess.run(
        [sys.executable, STUDY, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _json(path):
    with open(path) as handle:
        return json.load(handle)


def test_tiny_study_runs_skips_resumes_and_reports(tmp_path, e2e_dir):
    env = {
        **os.environ,
        "DS_LORADROP_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "DS_LORADROP_DATA_ROOT": os.path.dirname(e2e_dir),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    # each run's interpreter: the preloaded stand-in for python (tests/preloaded_python.py), under that name
    python = preloaded_python_program(tmp_path / "bin")
    dirs = [
        "--grid",
        "tiny",
        "--results_dir",
        str(tmp_path / "results"),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--python",
        str(python),
    ]
    log = _study(["run", *dirs], env)
    assert "grid tiny: 6 runs to do" in log and "grid tiny: all runs done" in log
    results = tmp_path / "results" / "tiny" / "e2e"
    assert sorted(p.name for p in results.iterdir()) == ["T0.5", "lora", "loradrop"]  # T1.0 is lora's runs
    for seed in (1, 2):
        lora, drop, half = (
            _json(results / cell / f"seed{seed}.json") for cell in ("lora", "loradrop", "T0.5")
        )
        assert lora["method"] == "lora" and drop["method"] == "loradrop" and lora["seed"] == seed
        assert f"--seed {seed}" in drop["command"] and "--resume auto" in drop["command"]
        assert drop["command"].startswith("python launch/train.py ")  # --python, named by its file name
        assert [s["name"] for s in drop["stages"]] == ["stage1", "stage2"]
        # T = 0.5 from the same seed's stage 1: same importance, fewer kept layers, no stage 1 of its own
        assert [s["name"] for s in half["stages"]] == ["stage2"] and half["plan"]["threshold"] == 0.5
        for target, profile in drop["normalized_importance"].items():
            assert half["normalized_importance"][target] == pytest.approx(profile, rel=1e-4)
            assert len(half["retained"][target]) <= len(drop["retained"][target])
        assert half["trainable_parameters"] <= drop["trainable_parameters"] < lora["trainable_parameters"]
    assert _json(results / "lora" / "seed1.json")["eval_metrics"] != {}
    # every finished run commits its predictions beside its result, one line per evaluated input
    import gzip

    with gzip.open(results / "loradrop" / "seed2.predictions.jsonl.gz", "rt") as handle:
        predictions = [json.loads(line) for line in handle]
    assert len(predictions) == 6 and all(p["prediction"] is not None for p in predictions)
    assert all(set(p) == {"id", "prediction"} for p in predictions)  # no prompt, no references: dataset rows
    lowercase = _json(results / "loradrop" / "seed2.json")["rescored_metrics"]["bleu_lowercase"]
    assert lowercase >= _json(results / "loradrop" / "seed2.json")["eval_metrics"]["bleu"] - 1e-9
    half_seed1 = _json(results / "T0.5" / "seed1.json")

    # finished runs are skipped; a run without a result file continues from its newest checkpoint
    assert "grid tiny: 0 runs to do" in _study(["run", *dirs], env)
    before = _json(results / "lora" / "seed2.json")
    os.remove(results / "lora" / "seed2.json")
    log = _study(["run", *dirs], env)
    assert "grid tiny: 1 runs to do" in log and "start e2e/lora seed 2" in log
    again = _json(results / "lora" / "seed2.json")
    launch_log = (tmp_path / "runs" / "tiny" / "e2e" / "lora" / "seed2" / "launch.log").read_text()
    assert "resuming from" in launch_log and "checkpoints/train-step-000003" in launch_log
    assert again["eval_metrics"]["bleu"] == before["eval_metrics"]["bleu"]
    assert again["trainable_parameters"] == before["trainable_parameters"]

    # on a machine without the run directories a plan cell reruns its source's stage 1 first
    import shutil

    shutil.rmtree(tmp_path / "runs" / "tiny" / "e2e")
    os.remove(results / "T0.5" / "seed1.json")
    log = _study(["run", *dirs, "--only", "e2e/T0.5", "--seeds", "1"], env)
    assert "no stage 1 of e2e/loradrop seed 1 here; running it again" in log and "done e2e/T0.5 seed 1" in log
    assert _json(results / "T0.5" / "seed1.json")["retained"] == half_seed1["retained"]

    report = tmp_path / "REPRODUCTION.md"
    text = _study(["report", *dirs, "--output", str(report)], env)
    assert report.read_text() == text
    assert "| LoRA | 2 |" in text and "| LoRA-drop (T = 0.9) | 2 |" in text and "| T = 0.5 | 2 |" in text
    assert "| T = 1.0 (every layer: LoRA) (= e2e/lora) | 2 |" in text
    assert " ± " in text and "reference" in text
    assert "`e2e/T0.5`: `" in text and "--plan" in text
    assert (tmp_path / "importance.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.unit
def test_plan_cells_are_compared_with_lora_drop_seed_by_seed():
    sys.path.insert(0, os.path.join(REPO_ROOT, "repro"))
    from report import paired_difference

    def runs(*bleus, seeds=(1, 2, 3)):
        return [{"seed": s, "eval_metrics": {"bleu": b}} for s, b in zip(seeds, bleus, strict=False)]

    reference = runs(55.0, 54.0, 56.0)
    assert paired_difference(runs(52.0), reference, "bleu") == "-3.00 (seed 1)"
    # a shift that the unpaired spread (±1 over seeds) would hide is beyond two paired standard errors
    assert paired_difference(runs(54.0, 53.1, 54.9), reference, "bleu") == "-1.00 ± 0.06 ** (paired, n=3)"
    # only seeds present on both sides are paired
    assert paired_difference(runs(57.0, 55.0, seeds=(2, 3)), reference, "bleu").endswith("(paired, n=2)")
    assert paired_difference(runs(50.0, seeds=(4,)), reference, "bleu") == "-"


@pytest.mark.unit
def test_lower_cased_bleu_is_rescored_only_for_a_run_scored_by_bleu():
    sys.path.insert(0, os.path.join(REPO_ROOT, "repro"))
    from study import rescored_metrics

    rows = [{"id": "a", "prediction": "The Eagle is cheap.", "references": ["the eagle is cheap."]}]
    lowered = rescored_metrics(rows, {"bleu": 0.0})["bleu_lowercase"]
    assert lowered == pytest.approx(100.0)
    # GSM8K is scored by accuracy; a BLEU of its worked solutions would be a number with no meaning
    assert rescored_metrics(rows, {"accuracy": 2.2}) == {}
    assert rescored_metrics([{"id": "a", "prediction": "x", "references": []}], {"bleu": 1.0}) == {}


@pytest.mark.unit
def test_a_diverged_run_is_recorded_without_metrics_and_the_grid_goes_on(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(REPO_ROOT, "repro"))
    import study
    from grid import TINY

    from ds_loradrop.errors import DIVERGED_EXIT_STATUS

    dirs = study.StudyDirs(str(tmp_path / "results"), str(tmp_path / "runs"))
    launched = []

    def fake_launch(command, log_path):
        launched.append(command)
        return DIVERGED_EXIT_STATUS

    monkeypatch.setattr(study, "launch_logged", fake_launch)
    assert study.run(dirs, TINY, ["e2e/lora"], [1, 2], sys.executable, commit=False) == 2
    assert len(launched) == 2
    result = _json(tmp_path / "results" / "tiny" / "e2e" / "lora" / "seed2.json")
    assert result["diverged"] is True and result["eval_metrics"] == {} and "--seed 2" in result["command"]

    def failing_launch(command, log_path):
        return 1

    monkeypatch.setattr(study, "launch_logged", failing_launch)
    with pytest.raises(RuntimeError, match="exit status 1"):
        study.run(dirs, TINY, ["e2e/loradrop"], [1], sys.executable, commit=False)
    assert not (tmp_path / "results" / "tiny" / "e2e" / "loradrop" / "seed1.json").exists()


@pytest.mark.unit
def test_the_tuned_rate_is_the_best_bleu_and_a_choice_at_the_grid_edge_is_flagged():
    sys.path.insert(0, os.path.join(REPO_ROOT, "repro"))
    from tuning import choose, method_of, rate_of

    assert (method_of("e2e/sparse_lora_lr2.5e-4"), rate_of("e2e/sparse_lora_lr2.5e-4")) == (
        "sparse_lora",
        "2.5e-4",
    )
    rates = ("1e-3", "2e-3", "5e-3")
    assert choose({}, rates) is None
    middle = choose({"1e-3": {"bleu": 50.0, "rouge_l": 60.0}, "2e-3": {"bleu": 52.0, "rouge_l": 61.0},
                     "5e-3": None}, rates)  # fmt: skip
    assert middle == {
        "learning_rate": "2e-3",
        "bleu": 52.0,
        "rouge_l": 61.0,
        "complete": True,
        "at_edge": False,
    }
    top = choose({"2e-3": {"bleu": 52.0, "rouge_l": 61.0}, "5e-3": {"bleu": 52.0, "rouge_l": 62.0}}, rates)
    # ROUGE-L breaks the tie
    assert top["learning_rate"] == "5e-3" and top["at_edge"] and not top["complete"]
