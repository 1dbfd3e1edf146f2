import pytest

from ds_loradrop.data.batching import tokenize_examples
from ds_loradrop.data.tasks import get_task
from ds_loradrop.data.tasks.e2e import mr_attributes

pytestmark = pytest.mark.unit


def test_reads_the_published_training_csv(e2e_dir):
    examples = get_task("e2e").load_train(e2e_dir)
    # ../shared/data/README.md: 42,061 rows, 4,862 distinct MRs
    assert examples.num_rows == 42061
    prompts = examples["prompt"]
    assert len(set(prompts)) == 4862
    first = examples[0]
    assert first["prompt"].startswith("Meaning representation: name[") and first["prompt"].endswith(
        "\nDescription:"
    )
    assert first["target"].startswith(" ") and len(first["target"]) > 10
    strata = set(examples["stratum"])
    assert all("name" in s.split("|") for s in strata) and 20 < len(strata) < 256


def test_quoted_fields_and_text_that_looks_like_missing_values(tmp_path):
    (tmp_path / "trainset.csv").write_bytes(
        b'mr,ref\r\n"name[Blue Spice], eatType[pub], customer rating[5 out of 5]","Blue Spice, a pub, '
        b'is ""great""."\r\n'
        b"name[NA],None\r\n"
    )
    examples = get_task("e2e").load_train(str(tmp_path))
    assert examples[0]["target"] == ' Blue Spice, a pub, is "great".'
    assert examples[0]["stratum"] == "customer rating|eatType|name"
    assert examples[1]["prompt"].endswith("name[NA]\nDescription:") and examples[1]["target"] == " None"
    assert get_task("e2e").load_train(str(tmp_path), max_samples=1).num_rows == 1


def test_mr_attributes():
    assert mr_attributes("name[The Eagle], customer rating[5 out of 5], area[city centre]") == [
        "area",
        "customer rating",
        "name",
    ]


def test_labels_cover_the_target_only_and_truncation_is_counted(tmp_path):
    from datasets import Dataset

    class CharTokenizer:
        eos_token_id = 2
        bos_token_id = 1

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [([1] if add_special_tokens else []) + [ord(c) for c in t] for t in texts]}

    data = Dataset.from_list(
        [
            {"prompt": "ab", "target": "cd", "stratum": "s"},
            {"prompt": "abcdefgh", "target": "xyz", "stratum": "s"},
            {"prompt": "abcdefghijklmnop", "target": "qrstuvwxyz", "stratum": "s"},
            {"prompt": "ab", "target": "", "stratum": "s"},
        ]
    )
    tokenized, num_truncated = tokenize_examples(data, CharTokenizer(), max_seq_length=10)
    rows = tokenized.to_list()
    assert rows[0]["input_ids"] == [1, 97, 98, 99, 100, 2]
    assert rows[0]["labels"] == [-100, -100, -100, 99, 100, 2]
    assert rows[0]["stratum"] == "s"
    # 9 prompt + 4 target tokens > 10: the prompt keeps BOS and its end, the whole target fits
    assert rows[1]["input_ids"] == [1, 100, 101, 102, 103, 104, 120, 121, 122, 2]
    assert rows[1]["labels"] == [-100] * 6 + [120, 121, 122, 2]
    # 17 + 11 tokens: the prompt keeps half the budget (BOS + its last 4), the target the rest
    assert rows[2]["input_ids"] == [1, 109, 110, 111, 112, 113, 114, 115, 116, 117]
    assert rows[2]["labels"][:5] == [-100] * 5
    # an empty reference still has its EOS to learn; nothing is dropped here
    assert rows[3]["labels"] == [-100, -100, -100, 2]
    assert num_truncated == 2 and len(rows) == 4
