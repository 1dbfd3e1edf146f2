"""``--task custom``: the three formats from JSONL / JSON / CSV / Parquet files, bad rows named by file and
line, the stage-1 stratum, chat conversations with labels on assistant turns only, exact match."""

from __future__ import annotations

import json

import datasets
import pytest

from ds_loradrop.config import DataConfig
from ds_loradrop.data import chat
from ds_loradrop.data.batching import IGNORE_INDEX, tokenize_examples
from ds_loradrop.errors import UsageError
from ds_loradrop.eval.generation import encode_examples
from ds_loradrop.eval.metrics import exact_match

pytestmark = pytest.mark.unit

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "two plus two"},
    {"role": "assistant", "content": "four"},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A small byte-level BPE tokenizer with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([json.dumps(CONVERSATION)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def task_for(path, **settings):
    return DataConfig(task="custom", dataset=str(path), **settings).build_task()


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_prompt_completion_and_alpaca_rows(tmp_path):
    data = write_jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "Q: 1+1?\nA:", "completion": " 2", "topic": "sums"},
            {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
        ],
    )
    rows = task_for(data).load_train("", None)
    assert rows["prompt"] == ["Q: 1+1?\nA:", "Q: 2+2?\nA:"] and rows["target"] == [" 2", " 4"]
    assert rows["stratum"] == ["words<=1", "words<=1"]
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add.", "input": "1 and 1", "output": "2"},
            {"instruction": "Greet.", "output": "Hi"},
        ],
    )
    rows = task_for(alpaca).load_train("", None)
    assert "### Instruction:\nAdd.\n\n### Input:\n1 and 1\n\n### Response:\n" in rows["prompt"][0]
    assert "### Input" not in rows["prompt"][1] and rows["target"] == ["2", "Hi"]


def test_every_file_kind_reads_the_same_rows(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}", "kind": "a" if i % 2 else "b"} for i in range(4)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    expected = task_for(jsonl, stratify_by="kind").load_train("", None).to_list()
    assert [row["stratum"] for row in expected] == ["b", "a", "b", "a"]
    for suffix in ("json", "csv", "parquet"):
        assert (
            task_for(tmp_path / f"d.{suffix}", stratify_by="kind").load_train("", None).to_list() == expected
        )


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'],
            r"d.jsonl:2: missing field\(s\) \['completion'\]",
        ),
        (['{"prompt": "a", "completion": "b"}', "", "{oops"], r"d.jsonl:3: invalid JSON"),
        (['{"prompt": "a", "completion": 3}'], r"d.jsonl:1: field 'completion' must be text, got int"),
        (['{"text": "a"}'], r"d.jsonl:1: cannot tell the format from the fields \['text'\]"),
        (
            ['{"messages": [{"role": "user", "content": "x"}]}'],
            r"d.jsonl:1: the conversation has no assistant",
        ),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], r"d.jsonl:1: messages\[0\] has role 'robot'"),
        (['{"messages": "hi"}'], r"d.jsonl:1: 'messages' must be a non-empty list"),
        (
            ['{"messages": [{"role": "assistant", "content": "x"}]}'],
            r"d.jsonl:1: the conversation starts with an assistant turn",
        ),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=message):
        task_for(path).load_train("", None)


def test_settings_errors(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UsageError, match=r"d.jsonl:1: no column 'topic' \(--stratify_by\)"):
        task_for(data, stratify_by="topic").load_train("", None)
    with pytest.raises(UsageError, match="--task custom needs --dataset"):
        DataConfig(task="custom").build_task()
    with pytest.raises(UsageError, match="--dataset is a setting of --task custom; this run is --task e2e"):
        DataConfig(task="e2e", dataset=data)
    with pytest.raises(UsageError, match=r"--dataset '.*missing.jsonl' does not exist"):
        task_for(tmp_path / "missing.jsonl").load_train("", None)
    with pytest.raises(UsageError, match="no validation split without --eval_dataset"):
        task_for(data).load_eval("", "validation")


def test_evaluation_holds_out_inputs_with_all_references(tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "x", "completion": "1"},
            {"prompt": "x", "completion": "one"},
            {"prompt": "y", "completion": "2"},
            {"prompt": "z", "completion": "3"},
        ],
    )
    task = task_for(data)
    assert task.default_eval_split == "train"
    examples = task.load_eval("", "train", max_samples=1)
    assert [(ex.prompt, ex.references) for ex in examples] == [("x", ["1", "one"])]
    assert task.load_train("", None, exclude_prompts={"x"})["prompt"] == ["y", "z"]
    assert task_for(data, eval_dataset=data).default_eval_split == "validation"


def test_chat_labels_cover_assistant_turns_only(tmp_path, chat_tokenizer):
    ids, labels = chat.encode_conversation(chat_tokenizer, CONVERSATION)
    whole = chat_tokenizer(
        chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False
    )
    assert ids == whole["input_ids"]
    learned = chat_tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert learned == "hi<|im_end|>\nfour<|im_end|>\n"

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    task = task_for(data, dataset_format="messages")
    rows = task.load_train("", None)
    tokenized, truncated = tokenize_examples(rows, chat_tokenizer, max_seq_length=512)
    assert tokenized[0]["input_ids"] == ids and tokenized[0]["labels"] == labels and truncated == 0
    # cut inside the first assistant turn: the conversation is kept up to there; before it: dropped
    first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    short, truncated = tokenize_examples(rows, chat_tokenizer, max_seq_length=first_learned + 1)
    assert short[0]["labels"] == labels[: first_learned + 1] and truncated == 1
    none_left, _ = tokenize_examples(rows, chat_tokenizer, max_seq_length=first_learned)
    assert len(none_left) == 0

    (example,) = task.load_eval("", "train", max_samples=1)
    assert example.references == ["four"] and example.messages == CONVERSATION[:4]
    (prompt_ids,) = encode_examples(chat_tokenizer, [example], max_prompt_tokens=512)
    rendered = chat_tokenizer.decode(prompt_ids)
    assert rendered.endswith("two plus two<|im_end|>\n<|im_start|>assistant\n") and "four" not in rendered


def test_chat_data_needs_a_chat_template(tmp_path, chat_tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    rows = task_for(data).load_train("", None)
    plain = chat_tokenizer.__class__(
        tokenizer_object=chat_tokenizer.backend_tokenizer, eos_token="<|im_end|>"
    )
    with pytest.raises(UsageError, match="needs a tokenizer with a chat template"):
        tokenize_examples(rows, plain, max_seq_length=64)


def test_exact_match():
    assert exact_match(["The answer.", "no"], [["answer"], ["yes", "maybe"]]) == 50.0
    assert exact_match(["  Paris  "], [["paris"]]) == 100.0


def test_a_small_dataset_of_your_own_trains_the_tiny_preset(tmp_path):
    """The tiny-llama preset's tokenizer is trained on the run's own data: a file of 48 short rows has
    fewer pieces than its 1,024-piece vocabulary, which must not fail (it did: "Vocabulary size too
    high")."""
    import os
    import subprocess

    from conftest import REPO_ROOT
    from launching import one_rank

    data = tmp_path / "qa.jsonl"
    rows = [json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) for i in range(48)]
    data.write_text("\n".join(rows) + "\n")
    result = subprocess.run(
        [*one_rank("launch/train.py"), "--task", "custom", "--dataset", str(data), "--model",
         "tiny-llama", "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--stage1_epochs", "1",
         "--max_eval_samples", "4", "--max_new_tokens", "4", "--report_to", "none"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "DS_LORADROP_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
