"""Bad input: one clear error before any training or writing."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from ds_loradrop.errors import UsageError
from ds_loradrop.recipes.checks import check_inputs
from ds_loradrop.recipes.cli import parse_run_config

pytestmark = pytest.mark.unit


@pytest.fixture
def base_args(tiny_run_args):
    return [
        *tiny_run_args,
        "--sample_ratio",
        "1.0",
    ]


def check(argv):
    return check_inputs(parse_run_config(argv))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "0"], r"--threshold must be in \(0, 1\], got 0.0"),
        (["--threshold", "1.5"], r"--threshold must be in \(0, 1\], got 1.5"),
        (["--sample_ratio", "0"], r"--sample_ratio must be in \(0, 1\], got 0.0"),
        (["--sample_ratio", "1.01"], r"--sample_ratio must be in \(0, 1\], got 1.01"),
        (["--lora_r", "0"], "--lora_r must be a positive integer, got 0"),
        (["--lora_r", "-4"], "--lora_r must be a positive integer, got -4"),
        (
            ["--lora_targets", "q_proj,qkv_proj"],
            "LoRA target 'qkv_proj' matches no nn.Linear module of LlamaForCausalLM",
        ),
        (
            ["--task", "webnlg"],
            r"unknown task 'webnlg'; known tasks: \['custom', 'dart', 'dialogsum', 'e2e', 'gsm8k'\]",
        ),
        (["--model", "no-such-org/no-such-model"], "unknown model 'no-such-org/no-such-model'"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be > 0"),
    ],
)
def test_bad_flag_values(base_args, extra, message):
    with pytest.raises(UsageError, match=message):
        check(base_args + extra)


def test_missing_data_directory_file_and_columns(base_args, tmp_path):
    with pytest.raises(UsageError, match="data directory .*nowhere.* for task 'e2e' does not exist"):
        check(base_args + ["--data_dir", str(tmp_path / "nowhere")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="train file .*trainset.csv.* for task 'e2e' does not exist"):
        check(base_args + ["--data_dir", str(empty)])
    (empty / "devset.csv").write_text("mr,ref\nname[A],A is a pub.\n")
    (empty / "trainset.csv").write_text("meaning,text\nname[A],A is a pub.\n")
    with pytest.raises(UsageError, match=r"trainset.csv: missing column\(s\) \['mr', 'ref'\]"):
        check(base_args + ["--data_dir", str(empty)])


def test_bad_ds_config_and_batch_conflict(base_args, tmp_path):
    with pytest.raises(UsageError, match="cannot read ds_config"):
        check(base_args + ["--ds_config", str(tmp_path / "none.json")])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UsageError, match="is not valid JSON"):
        check(base_args + ["--ds_config", str(broken)])
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}))
    with pytest.raises(
        UsageError, match="--per_device_train_batch_size 16 conflicts with train_micro_batch_size_per_gpu = 4"
    ):
        check(base_args + ["--ds_config", str(fixed), "--per_device_train_batch_size", "16"])
    assert check(base_args + ["--ds_config", str(fixed)]).batch.micro_batch_size == 4


def test_data_smaller_than_one_global_batch(base_args):
    with pytest.raises(
        UsageError, match=r"the training set \(64 examples\) is smaller than one global batch of 128"
    ):
        check(base_args + ["--per_device_train_batch_size", "128"])
    with pytest.raises(
        UsageError, match=r"the stage-1 sample \(6 examples\) is smaller than one global batch of 32"
    ):
        check(base_args + ["--sample_ratio", "0.1", "--per_device_train_batch_size", "32"])


def test_output_directory_holding_a_run_is_not_overwritten(base_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds a run \\(plan.json\\)"):
        check(base_args)
    assert check(base_args + ["--overwrite_output_dir", "true"]).examples.num_rows == 64
    assert (out / "plan.json").read_text() == "{}"


def test_entry_point_prints_one_line_and_writes_nothing(base_args, tmp_path):
    for extra, message in (
        (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
        (["--lora_targets", "nope"], "LoRA target 'nope' matches no nn.Linear"),
    ):
        result = subprocess.run(
            [sys.executable, os.path.join(REPO_ROOT, "launch", "train.py"), *base_args, *extra],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_training_on_the_evaluated_split_holds_the_evaluated_inputs_out(tmp_path, e2e_dir):
    import os

    dart_dir = os.path.join(os.path.dirname(e2e_dir), "dart")
    args = [
        "--task",
        "dart",
        "--data_dir",
        dart_dir,
        "--train_split",
        "validation",
        "--output_dir",
        str(tmp_path / "out"),
        "--ds_config",
        os.path.join(REPO_ROOT, "ds_configs", "zero3.json"),
        "--model",
        "tiny-llama",
    ]
    with pytest.raises(
        UsageError, match="--eval_split validation is also the training split: pass --max_eval_samples"
    ):
        check(args + ["--max_eval_samples", "0"])  # 0 = every input: nothing would be left to train on
    inputs = check(args + ["--max_eval_samples", "40"])
    held_out = {ex.prompt for ex in inputs.eval_examples}
    assert len(inputs.eval_examples) == 40 and len(held_out) == 40
    assert not held_out & set(inputs.examples["prompt"])
    everything = check(
        args
        + [
            "--max_eval_samples",
            "40",
            "--eval_split",
            "validation",
            "--task",
            "dart",
            "--train_split",
            "validation",
            "--max_train_samples",
            "100000",
        ]
    )
    assert everything.examples.num_rows < 6980
    with pytest.raises(UsageError, match="train file .*dart-v1.1.1-full-train.json.* only the dev split"):
        check(args[:4] + args[6:])
    with pytest.raises(UsageError, match="GSM8K has train and test only"):
        check(
            [
                "--task",
                "gsm8k",
                "--data_dir",
                os.path.join(os.path.dirname(e2e_dir), "gsm8k"),
                "--eval_split",
                "validation",
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0, got inf"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
        (["--collective_timeout_minutes", "0"], "--collective_timeout_minutes must be > 0, got 0.0"),
        (["--save_steps", "0"], "--save_steps must be > 0, got 0"),
        (["--save_total_limit", "-1"], "--save_total_limit must be > 0, got -1"),
        (["--max_seq_length", "4"], "--max_seq_length must be >= 8, got 4"),
        (
            ["--resume", "auto", "--overwrite_output_dir", "true"],
            "--resume continues the run in --output_dir and --overwrite_output_dir deletes it",
        ),
        (
            ["--importance_pass", "last_epoch", "--lora_dropout", "0.1"],
            "--importance_pass last_epoch needs --lora_dropout 0",
        ),
        (
            ["--importance_pass", "last_epoch", "--gradient_checkpointing", "true"],
            (
                "--importance_pass last_epoch records the training forwards, which "
                "--gradient_checkpointing runs twice"
            ),
        ),
        (["--stage1_max_steps", "0"], "--stage1_max_steps must be > 0, got 0"),
        (
            ["--stop_after_stage1", "--method", "lora"],
            "--stop_after_stage1 needs a stage 1: --method loradrop without --plan (got --method lora)",
        ),
        (
            ["--stop_after_stage1", "--plan", "plan.json"],
            (
                "--stop_after_stage1 needs a stage 1: --method loradrop without --plan (got --method "
                "loradrop with --plan)"
            ),
        ),
        (["--max_train_samples", "-1"], "--max_train_samples must be >= 0 (0 = all of them), got -1"),
        (["--max_eval_samples", "-3"], "--max_eval_samples must be >= 0 (0 = all inputs), got -3"),
        (["--mlflow_register_model", " "], "--mlflow_register_model needs a model name"),
        (
            ["--mlflow_register_model", "m", "--report_to", "none"],
            "--mlflow_register_model needs MLflow tracking (--report_to mlflow)",
        ),
        (
            ["--mlflow_register_model", "m", "--mlflow_log_model", "false"],
            "--mlflow_register_model registers the logged model: drop --mlflow_log_model false",
        ),
        (
            ["--mlflow_register_model", "m", "--method", "tied_lora"],
            "--mlflow_register_model: a tied_lora run has no form MLflow's transformers flavour loads",
        ),
    ],
)
def test_more_bad_flag_values(base_args, extra, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        check(base_args + extra)


def test_stage1_takes_its_own_step_cap_else_max_steps(base_args):
    assert parse_run_config(base_args).stage1_max_steps is None
    assert parse_run_config(base_args + ["--max_steps", "5"]).stage1_max_steps == 5
    assert parse_run_config(base_args + ["--max_steps", "5", "--stage1_max_steps", "9"]).stage1_max_steps == 9


def test_zero_train_and_eval_samples_mean_the_whole_split(base_args):
    everything = check(base_args + ["--max_train_samples", "0", "--max_eval_samples", "0"])
    assert everything.examples.num_rows == 42_061  # E2E trainset.csv
    assert len(everything.eval_examples) == 547  # distinct MRs of devset.csv
    default = check([arg for arg in base_args if arg not in ("--max_train_samples", "64")])
    assert default.examples.num_rows == 1200 and len(default.eval_examples) == 200  # the quick start's sizes


def test_no_training_examples_left_after_filtering(base_args, tmp_path, e2e_dir):
    empty = tmp_path / "header_only"
    empty.mkdir()
    (empty / "trainset.csv").write_text("mr,ref\n")
    shutil.copy(os.path.join(e2e_dir, "devset.csv"), empty / "devset.csv")
    with pytest.raises(UsageError, match="header_only/trainset.csv: no records"):
        check(base_args + ["--data_dir", str(empty)])
    # every training example's input is held out for evaluation
    (empty / "trainset.csv").write_text('mr,ref\n"name[A]",A is a pub.\n"name[B]",B is a pub.\n')
    (empty / "devset.csv").write_text('mr,ref\n"name[A]",A is a pub.\n"name[B]",B is a pub.\n')
    with pytest.raises(UsageError, match="no training examples in the validation split"):
        check(
            base_args + ["--data_dir", str(empty), "--train_split", "validation", "--max_eval_samples", "2"]
        )


def test_model_with_pickled_weights_only_is_refused(tmp_path):
    from ds_loradrop.models.loading import load_causal_lm

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        UsageError,
        match=r"has only pickled weights \(pytorch_model.bin\); ds-loradrop loads "
        r"safetensors only",
    ):
        load_causal_lm(str(tmp_path), torch.float32)


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, e2e_dir):
    from ds_loradrop.data.tasks import get_task
    from ds_loradrop.models.loading import TinyLlamaSpec, ensure_tiny_llama, load_tokenizer

    spec = TinyLlamaSpec(vocab_size=512, tokenizer_examples=300)
    path = ensure_tiny_llama(
        get_task("e2e").training_text(e2e_dir, spec.tokenizer_examples), str(tmp_path), spec
    )
    stripped = tmp_path / "no_pad"
    shutil.copytree(path, stripped)
    config = json.loads((stripped / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (stripped / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(stripped))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def _checkpoint(output_dir, name="stage2-step-000004", world_size=1, config=None, ranks=None):
    """A checkpoint directory laid out like checkpoint.save_checkpoint's (contents are not read here)."""
    path = output_dir / "checkpoints" / name
    (path / "ds" / "state").mkdir(parents=True)
    for rank in range(world_size if ranks is None else ranks):
        (path / f"rng_rank{rank}.safetensors").write_bytes(b"")
    state = {"stage": "stage2", "step": 4, "num_steps": 8, "seed": 43, "world_size": world_size}
    (path / "trainer_state.json").write_text(json.dumps(state))
    if config is not None:
        (path / "run_config.json").write_text(json.dumps(config))
    return path


def test_resume_refuses_missing_partial_foreign_and_mismatched_checkpoints(base_args, tmp_path):
    out = tmp_path / "out"
    resume = [*base_args, "--resume"]
    with pytest.raises(UsageError, match="no such checkpoint directory"):
        check([*resume, str(out / "checkpoints" / "stage2-step-000009")])

    partial = out / "checkpoints" / ".saving-stage2-step-000006"
    partial.mkdir(parents=True)
    with pytest.raises(UsageError, match="is an interrupted save \\(a partial checkpoint\\)"):
        check([*resume, str(partial)])

    other_tool = tmp_path / "other_tool" / "global_step10"
    other_tool.mkdir(parents=True)
    (other_tool / "latest").write_text("global_step10")
    with pytest.raises(
        UsageError,
        match="not a complete ds-loradrop checkpoint: no trainer_state.json \\(a DeepSpeed "
        "checkpoint of another tool\\?\\)",
    ):
        check([*resume, str(other_tool)])

    foreign = _checkpoint(tmp_path / "other_run")
    with pytest.raises(UsageError, match="belongs to another run: this run's checkpoints are in"):
        check([*resume, str(foreign)])

    incomplete = _checkpoint(out, "stage2-step-000002", ranks=0)
    with pytest.raises(UsageError, match="is incomplete: rng_rank0.safetensors missing"):
        check([*resume, str(incomplete)])

    two_ranks = _checkpoint(out, "stage2-step-000003", world_size=2)
    # (a checkpoint without the portable trainable state: from before checkpoints could change shape)
    with pytest.raises(UsageError, match="2 ranks, this job has 1, and it has no trainable_state.*; resume"):
        check([*resume, str(two_ranks)])
    shutil.rmtree(out / "checkpoints")

    # the newest complete checkpoint (--resume auto) was trained for other targets
    trained = parse_run_config(base_args).to_dict()
    trained["lora"]["lora_targets"] = "q_proj"
    _checkpoint(out, config=trained)
    with pytest.raises(UsageError, match=r"--resume with a changed configuration \(lora.lora_targets\)"):
        check([*resume, "auto"])
    assert check([*resume, "auto", "--lora_targets", "q_proj"]).batch.world_size == 1
    assert sorted(os.listdir(out / "checkpoints")) == ["stage2-step-000004"]  # nothing touched


@pytest.mark.parametrize(
    "task, max_seq_length, lora_r",
    [("e2e", 128, 8), ("dart", 256, 8), ("dialogsum", 768, 16), ("gsm8k", 512, 8)],
)
def test_sequence_length_and_rank_default_to_the_tasks_and_flags_win(task, max_seq_length, lora_r):
    cfg = parse_run_config(["--task", task])
    assert (cfg.data.max_seq_length, cfg.lora.lora_r, cfg.lora.lora_alpha) == (
        max_seq_length,
        lora_r,
        2.0 * lora_r,
    )
    given = parse_run_config(
        ["--task", task, "--max_seq_length", "64", "--lora_r", "4", "--lora_alpha", "32"]
    )
    assert (given.data.max_seq_length, given.lora.lora_r, given.lora.lora_alpha) == (64, 4, 32.0)


def test_resume_accepts_a_run_config_from_before_newer_settings_and_ignores_the_cache_switch(tmp_path):
    """A run written before a setting existed resumes (the missing key counts as its default);
    --cache_tokenized changes nothing learned and may differ; a real change is still refused."""
    from ds_loradrop.recipes.checks import check_resume_matches

    cfg = parse_run_config(["--max_train_samples", "64"])
    saved = cfg.to_dict()
    for key in ("cache_tokenized", "dataset_format", "stratify_by", "eval_metric"):
        del saved["data"][key]
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(saved))
    check_resume_matches(cfg, str(path))
    check_resume_matches(
        parse_run_config(["--max_train_samples", "64", "--cache_tokenized", "false"]), str(path)
    )
    with pytest.raises(UsageError, match=r"changed configuration \(data.max_train_samples\)"):
        check_resume_matches(parse_run_config(["--max_train_samples", "65"]), str(path))


def test_resume_reads_the_method_of_a_run_config_that_kept_it_under_drop(tmp_path):
    from ds_loradrop.recipes.checks import check_resume_matches

    cfg = parse_run_config(["--method", "lora"])
    saved = cfg.to_dict()
    saved["drop"]["method"] = saved.pop("finetuning")["method"]
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(saved))
    check_resume_matches(cfg, str(path))
    with pytest.raises(UsageError, match=r"changed configuration \(finetuning.method\)"):
        check_resume_matches(parse_run_config(["--method", "loradrop"]), str(path))


def test_a_rendezvous_port_in_use_is_one_error_line(base_args, tmp_path):
    """Another job on the machine holds the launcher's port (deepspeed's default 29500 is everyone's):
    rank 0 says so in one line and which flag to change, instead of torch's traceback."""
    from launching import TRAIN, one_rank

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        result = subprocess.run(
            one_rank(TRAIN, *base_args), env=env, capture_output=True, text=True, timeout=300, check=False
        )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    expected = f"error: the rendezvous port {port} on 127.0.0.1 is in use (another job on this machine?)"
    assert lines[-1].startswith(expected) and "--master_port" in lines[-1], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "run_config.json").exists()
