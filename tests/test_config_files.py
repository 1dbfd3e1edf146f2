"""``--config FILE``: YAML / JSON sectioned like RunConfig, flags override it, a finished run's
run_config.json relaunches it, the shipped recipes parse, and a bad file is one ``error:`` line."""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from ds_loradrop.errors import UsageError
from ds_loradrop.recipes.cli import parse_run_config

pytestmark = pytest.mark.unit

RECIPES = sorted(glob.glob(os.path.join(REPO_ROOT, "recipes", "*.yaml")))


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_yaml_values_become_defaults_and_flags_win(tmp_path):
    config = write(
        tmp_path / "run.yaml",
        "data:\n  task: dialogsum\n  max_train_samples: 300\ntrain:\n  learning_rate: 5e-4\n  seed: 3\n"
        "  eval_base_model: false\ndrop:\n  threshold: 0.8\n",
    )
    cfg = parse_run_config(["--config", config, "--seed", "7", "--threshold", "0.7"])
    assert cfg.data.task == "dialogsum" and cfg.data.max_train_samples == 300
    assert cfg.train.learning_rate == 5e-4  # YAML 1.1 reads 5e-4 as text: taken as a number
    assert cfg.train.eval_base_model is False
    assert cfg.train.seed == 7 and cfg.drop.threshold == 0.7  # the flags
    assert cfg.lora.lora_r == 16  # the task's default still fills what the file leaves unset
    assert parse_run_config([f"--config={config}", "--eval_base_model", "true"]).train.eval_base_model


def test_a_finished_runs_run_config_relaunches_it(tmp_path):
    original = parse_run_config(
        ["--method", "vera", "--vera_r", "64", "--task", "dart", "--learning_rate", "0.05", "--seed", "5"]
    )
    saved = {**original.to_dict(), "resolved": {"world_size": 2, "global_batch_size": 8}}
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(saved))
    assert parse_run_config(["--config", str(path)]).to_dict() == original.to_dict()
    assert parse_run_config(["--config", str(path), "--seed", "6"]).train.seed == 6


def test_files_of_earlier_versions_with_the_method_under_drop_still_read(tmp_path):
    """--method lived in the drop: section before it got its own finetuning: section."""
    old = write(tmp_path / "old.yaml", "drop:\n  method: lora\n  threshold: 0.8\n")
    cfg = parse_run_config(["--config", old])
    assert cfg.finetuning.method == "lora" and cfg.drop.threshold == 0.8
    assert parse_run_config(["--config", old, "--method", "vera"]).finetuning.method == "vera"
    same = write(tmp_path / "same.yaml", "finetuning:\n  method: lora\ndrop:\n  method: lora\n")
    assert parse_run_config(["--config", same]).finetuning.method == "lora"
    both = write(tmp_path / "both.yaml", "finetuning:\n  method: full\ndrop:\n  method: lora\n")
    with pytest.raises(UsageError, match=r"both.yaml: drop.method \('lora', the old place\) and "):
        parse_run_config(["--config", both])
    saved = parse_run_config(["--method", "sparse_lora"]).to_dict()
    saved["drop"]["method"] = saved.pop("finetuning")["method"]  # a run_config.json written before
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(saved))
    assert parse_run_config(["--config", str(path)]).finetuning.method == "sparse_lora"
    from ds_loradrop.config import RunConfig

    assert RunConfig.from_dict(saved).finetuning.method == "sparse_lora"


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_each_recipe_parses_and_begins_with_the_command_that_runs_it(recipe):
    with open(recipe) as handle:
        first = handle.readline()
    assert first.startswith("# ")
    command = shlex.split(first[2:])
    assert "launch/train.py" in command and command[command.index("--config") + 1] == os.path.relpath(
        recipe, REPO_ROOT
    )
    cfg = parse_run_config(["--config", recipe])
    assert cfg.finetuning.method == "loradrop" and cfg.drop.threshold == 0.9


def test_the_quick_start_recipe_is_the_default_run_under_zero2_at_loradrops_tuned_rate():
    recipe = os.path.join(REPO_ROOT, "recipes", "e2e_loradrop.yaml")
    from_recipe = parse_run_config(["--config", recipe]).to_dict()
    default = parse_run_config(["--ds_config", "ds_configs/zero2.json"]).to_dict()
    assert from_recipe["train"].pop("output_dir") == "outputs/e2e_loradrop"
    default["train"].pop("output_dir")
    with open(os.path.join(REPO_ROOT, "repro", "results", "tuning", "chosen_rates.json")) as handle:
        tuned = float(json.load(handle)["loradrop"]["learning_rate"])
    assert from_recipe["train"].pop("learning_rate") == tuned == 5e-3  # the study's choice (issue 28)
    default["train"].pop("learning_rate")
    assert from_recipe == default


@pytest.mark.parametrize(
    "text, message",
    [
        ("trian:\n  seed: 1\n", r"run.yaml: unknown section 'trian'"),
        ("train:\n  lr: 1\n", r"run.yaml: unknown key train.lr; train has \["),
        ("train:\n  learning_rate: fast\n", r"run.yaml: train.learning_rate: expected a number, got 'fast'"),
        ("train:\n  seed: 1.5\n", r"run.yaml: train.seed: expected an integer, got 1.5"),
        ("train:\n  group_by_length: 1\n", r"run.yaml: train.group_by_length: expected true or false, got 1"),
        ("drop:\n  selection: best\n", r"run.yaml: drop.selection: expected one of \['output_norm'"),
        ("data: [1\n", r"run.yaml:\d+: invalid YAML"),
        ("- 1\n- 2\n", r"run.yaml: expected a mapping of sections"),
        ("train: 3\n", r"run.yaml: section 'train' must be a mapping"),
    ],
)
def test_a_bad_file_names_the_key(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        parse_run_config(["--config", write(tmp_path / "run.yaml", text)])


def test_bad_json_and_a_missing_file(tmp_path):
    with pytest.raises(UsageError, match=r"run.json:2: invalid JSON"):
        parse_run_config(["--config", write(tmp_path / "run.json", '{"train":\n  {seed: 1}}')])
    with pytest.raises(UsageError, match=r"--config '.*nothing.yaml' does not exist"):
        parse_run_config(["--config", str(tmp_path / "nothing.yaml")])
    with pytest.raises(UsageError, match="--config needs a file name"):
        parse_run_config(["--config"])
    # a run's output directory instead of its run_config.json
    run = tmp_path / "outputs"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"--config .*outputs. is a directory; .*outputs/run_config.json"):
        parse_run_config(["--config", str(run)])
    with pytest.raises(UsageError, match=r"unknown argument\(s\) \['--conf', 'x.yaml'\]"):
        parse_run_config(["--conf", "x.yaml"])  # no abbreviations: it would bypass the file


def test_the_command_line_prints_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    config = write(tmp_path / "run.yaml", f"train:\n  output_dir: {out}\n  warmup_ratio: high\n")
    done = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "launch", "train.py"), "--config", config],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {config}: train.warmup_ratio: expected a number, got 'high'"
    )
    assert not out.exists()
