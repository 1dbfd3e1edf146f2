"""launch/generate.py: bad input is one line before anything loads; a run's own prompts, greedy, give the
run's own evaluation predictions, in one process and (tests/test_smollm2.py) on two ranks under ZeRO-3."""

from __future__ import annotations

import json
import os

import pytest
from launching import job_env, launch, one_rank

from ds_loradrop.errors import UsageError
from ds_loradrop.recipes.cli import parse_generate_config
from ds_loradrop.recipes.generate import check_config, read_prompts

GENERATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "generate.py")


@pytest.mark.unit
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to generate with: pass --run, --adapter, --peft or --model"),
        (["--run", "a", "--adapter", "b", "--prompt", "x"], "pass one of --run, --adapter, --peft"),
        (["--model", "m"], "pass exactly one of --prompt, --prompt_file, --chat"),
        (["--model", "m", "--prompt", "x", "--chat"], "pass exactly one of --prompt, --prompt_file, --chat"),
        (["--run", "/no/such/run", "--prompt", "x"], "--run '/no/such/run' is not a directory"),
        (["--model", "m", "--prompt_file", "/no/file"], "--prompt_file '/no/file' does not exist"),
        (["--model", "m", "--prompt", "x", "--task", "sql"], "--task 'sql': expected one of"),
        (["--model", "m", "--prompt", "x", "--do_sample", "--temperature", "0"], "--temperature must be > 0"),
        (["--model", "m", "--prompt", "x", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--model", "m", "--prompt", "x", "--dtype", "int8"], "--dtype 'int8': expected one of"),
        (["--model", "tiny-llama", "--prompt", "x"], "is built from a task's data by a training run"),
        (["--peft", ".", "--prompt", "x", "--ds_config", "c.json"], "--peft loads with PEFT in one process"),
    ],
)
def test_bad_input_is_one_usage_error(args, message):
    with pytest.raises(UsageError) as error:
        check_config(parse_generate_config(args))
    assert message in str(error.value)


@pytest.mark.unit
def test_prompt_files_take_lines_or_json_lines(tmp_path):
    plain, jsonl, empty = tmp_path / "p.txt", tmp_path / "p.jsonl", tmp_path / "e.txt"
    plain.write_text("first prompt\n\nsecond prompt\n")
    jsonl.write_text('{"prompt": "a"}\n{"prompt": "b", "id": 2}\n')
    empty.write_text("\n")
    assert read_prompts(parse_generate_config(["--prompt_file", str(plain)])) == [
        "first prompt",
        "second prompt",
    ]
    assert read_prompts(parse_generate_config(["--prompt_file", str(jsonl)])) == ["a", "b"]
    with pytest.raises(UsageError, match="holds no prompt"):
        read_prompts(parse_generate_config(["--prompt_file", str(empty)]))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1: a JSON line needs a 'prompt' field"):
        read_prompts(parse_generate_config(["--prompt_file", str(tmp_path / "bad.jsonl")]))


def predictions_of(run_dir: str, count: int) -> list[dict]:
    with open(os.path.join(run_dir, "eval", "predictions.jsonl")) as handle:
        return [json.loads(line) for line in handle][:count]


def generate_like_the_evaluation(command_prefix: list[str], run_dir: str, tmp_path, env, max_new_tokens: int):
    """Generate for the run's first evaluated prompts (already in the task's format) as its evaluation did
    (greedy, the same token budget); returns (expected predictions, answers, stdout)."""
    expected = predictions_of(run_dir, 3)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in expected))
    answers = tmp_path / "answers.jsonl"
    result = launch(
        [*command_prefix, "--run", run_dir, "--prompt_file", str(prompts), "--output", str(answers),
         "--max_new_tokens", str(max_new_tokens)],
        env,
    )  # fmt: skip
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    return expected, got, result.stdout


@pytest.mark.distributed
def test_one_process_gives_the_runs_evaluation_predictions(runs, tmp_path):
    out, _ = runs
    expected, got, stdout = generate_like_the_evaluation(
        one_rank(GENERATE), out["zero3_2ranks"], tmp_path, job_env(tmp_path), max_new_tokens=12
    )
    assert [row["completion"] for row in got] == [row["prediction"] for row in expected]
    assert [row["prompt"] for row in got] == [row["prompt"] for row in expected]
    assert stdout.count(">>> Meaning representation:") == 3  # each prompt shown, its answer streamed
