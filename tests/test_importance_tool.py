"""launch/importance.py (the importance profile of any saved adapter) and launch/train.py --plan.

Uses the one-rank reference run of the session fixture ``runs``: the tool must reproduce its plan.json
from its stage1_adapter/, also after that adapter went through the plain PEFT export, and a run trained
with ``--plan`` must train exactly that layout without a stage 1.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import REPO_ROOT
from launching import one_rank

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

IMPORTANCE = os.path.join(REPO_ROOT, "launch", "importance.py")
TRAIN = os.path.join(REPO_ROOT, "launch", "train.py")


def _run(args, timeout=600):
    """The importance tool in this process (it starts no process group); training in a subprocess."""
    if args[0] == IMPORTANCE:
        from launching import run_in_process

        return run_in_process(*args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        one_rank(*args),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _json(path):
    with open(path) as handle:
        return json.load(handle)


def _assert_same_importance(plan, reference):
    assert plan["num_sampled"] == reference["num_sampled"] and plan["num_tokens"] == reference["num_tokens"]
    for name, target in reference["targets"].items():
        assert plan["targets"][name]["importance"] == pytest.approx(target["importance"], rel=1e-4)
        assert plan["targets"][name]["retained"] == target["retained"]
        assert plan["targets"][name]["shared"] == target["shared"]


def test_reproduces_the_runs_plan_from_its_stage1_adapter(runs, tmp_path):
    out, _ = runs
    run = out["one_rank"]
    result = _run([IMPORTANCE, "--run", run, "--output_dir", str(tmp_path / "plan")])
    assert result.returncode == 0, result.stderr[-3000:]
    plan, reference = _json(tmp_path / "plan" / "plan.json"), _json(os.path.join(run, "plan.json"))
    _assert_same_importance(plan, reference)
    assert plan["threshold"] == reference["threshold"] == 0.6
    assert (tmp_path / "plan" / "plots" / "importance.png").read_bytes()[:4] == b"\x89PNG"
    # another threshold from the same importance: a different (larger) layout, nothing recomputed by hand
    result = _run([IMPORTANCE, "--run", run, "--threshold", "0.95", "--output_dir", str(tmp_path / "t95")])
    assert result.returncode == 0, result.stderr[-3000:]
    wider = _json(tmp_path / "t95" / "plan.json")
    assert wider["threshold"] == 0.95
    for name in reference["targets"]:
        assert wider["targets"][name]["importance"] == plan["targets"][name]["importance"]
        assert set(wider["targets"][name]["retained"]) >= set(plan["targets"][name]["retained"])
    refused = _run([IMPORTANCE, "--run", run, "--output_dir", str(tmp_path / "plan")])
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].endswith(
        "plan.json' exists; choose another --output_dir"
    )


def test_a_plain_peft_adapter_gives_the_same_profile(runs, tmp_path):
    from ds_loradrop.recipes.export import export_peft

    out, _ = runs
    run = out["one_rank"]
    export_peft(os.path.join(run, "stage1_adapter"), str(tmp_path / "peft"))
    assert _json(tmp_path / "peft" / "adapter_config.json")["peft_type"] == "LORA"
    base = _json(os.path.join(run, "stage1_adapter", "adapter_config.json"))["base_model"]
    result = _run(
        [
            IMPORTANCE,
            "--adapter",
            str(tmp_path / "peft"),
            "--model",
            base,
            "--run",
            run,
            "--output_dir",
            str(tmp_path / "plan"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_importance(_json(tmp_path / "plan" / "plan.json"), _json(os.path.join(run, "plan.json")))


def test_training_with_a_given_plan_skips_stage1_and_trains_that_layout(runs, tmp_path, e2e_dir):
    from launching import COMMON, global_batch

    out, _ = runs
    result = _run(
        [IMPORTANCE, "--run", out["one_rank"], "--threshold", "0.3", "--output_dir", str(tmp_path / "p")]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    given = _json(tmp_path / "p" / "plan.json")
    trained = tmp_path / "trained"
    result = _run(
        [
            TRAIN,
            "--ds_config",
            out["zero3_config"],
            *global_batch(1, 4),
            "--data_dir",
            e2e_dir,
            *COMMON,
            "--plan",
            str(tmp_path / "p" / "plan.json"),
            "--output_dir",
            str(trained),
            "--report_to",
            "none",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 1 skipped: training the plan" in result.stdout
    summary = _json(trained / "summary.json")
    assert [stage["name"] for stage in summary["stages"]] == ["stage2"]
    assert summary["retained"] == {name: t["retained"] for name, t in given["targets"].items()}
    assert _json(trained / "plan.json") == given
    assert not (trained / "stage1_adapter").exists()
    assert summary["base_eval_metrics"]["num_examples"] == 10  # the base model is evaluated before stage 2
    usage = _json(trained / "adapter" / "adapter_config.json")["layers"]
    for name, target in given["targets"].items():
        assert [i for i, adapter in enumerate(usage[name]) if adapter == f"{name}.shared"] == target["shared"]


def test_bad_plans_are_refused_before_anything_is_written(runs, tmp_path, e2e_dir):
    from ds_loradrop.errors import UsageError
    from ds_loradrop.recipes.checks import check_inputs
    from ds_loradrop.recipes.cli import parse_run_config

    out, _ = runs
    plan = os.path.join(out["one_rank"], "plan.json")
    base = [
        "--model",
        "tiny-llama",
        "--data_dir",
        e2e_dir,
        "--max_train_samples",
        "64",
        "--output_dir",
        str(tmp_path / "out"),
        "--ds_config",
        out["zero3_config"],
    ]
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    for extra, message in [
        (["--plan", str(tmp_path / "none.json")], "cannot be read"),
        (["--plan", str(broken)], "is not a plan.json"),
        (
            ["--plan", plan, "--lora_targets", "q_proj"],
            "is for targets ['q_proj', 'v_proj'], this run trains ['q_proj']",
        ),
        (
            ["--plan", plan, "--method", "lora"],
            "--plan is a LoRA-drop layout; --method lora does not use one",
        ),
        (["--plan", plan, "--stage2_init", "carry"], "--stage2_init carry needs this run's stage-1 adapter"),
    ]:
        with pytest.raises(UsageError, match=__import__("re").escape(message)):
            check_inputs(parse_run_config(base + extra))
    assert not (tmp_path / "out").exists()
