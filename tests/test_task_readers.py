"""Readers on the real files in ../shared/data (counts from its README) and on small files written here
in each published test-split layout."""

import json
import shutil

import pytest

from ds_loradrop.data.tasks import get_task
from ds_loradrop.errors import UsageError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data_root(e2e_dir):
    import os

    return os.path.dirname(e2e_dir)


def test_e2e_validation_groups_references_by_mr(data_root):
    task = get_task("e2e")
    examples = task.load_eval(f"{data_root}/e2e", "validation")
    assert len(examples) == 547  # 4,672 rows, 547 distinct MRs
    assert sum(len(ex.references) for ex in examples) == 4672
    assert (
        min(len(ex.references) for ex in examples) == 2 and max(len(ex.references) for ex in examples) == 43
    )
    assert get_task("e2e").load_train(f"{data_root}/e2e", split="validation").num_rows == 4672
    train = task.load_eval(f"{data_root}/e2e", "train")
    assert len(train) == 4862 and max(len(ex.references) for ex in train) == 46


def test_dart_json_and_xml_dev_agree(data_root, tmp_path):
    task = get_task("dart")
    from_json = task.load_eval(f"{data_root}/dart", "validation")  # the JSON wins when both exist
    assert len(from_json) == 2768 and sum(len(ex.references) for ex in from_json) <= 6980
    xml_only = tmp_path / "dart"
    xml_only.mkdir()
    shutil.copy(f"{data_root}/dart/dart-v1.1.1-full-dev.xml", xml_only / "dart-v1.1.1-full-dev.xml")
    from_xml = task.load_eval(str(xml_only), "validation")
    assert [ex.prompt for ex in from_xml] == [ex.prompt for ex in from_json]
    assert [ex.references for ex in from_xml] == [ex.references for ex in from_json]
    assert from_json[0].prompt == (
        "Triples: Mars Hill College | JOINED | 1973 ; "
        "Mars Hill College | LOCATION | Mars Hill, North Carolina\nText:"
    )
    rows = task.load_train(f"{data_root}/dart", split="validation")
    assert rows.num_rows == sum(len(ex.references) for ex in from_json)
    assert {"webnlg", "e2e"} <= set(rows["stratum"])


def test_dart_train_missing_says_how_to_train_on_dev(data_root):
    with pytest.raises(UsageError, match="only the dev split is published.*--train_split validation"):
        get_task("dart").load_train(f"{data_root}/dart")


def test_dart_test_xml_layout_with_empty_lex(tmp_path):
    (tmp_path / "dart-v1.1.1-full-test.xml").write_text(
        "<?xml version='1.0' encoding='utf-8'?>\n<benchmark><entries>"
        '<entry category="MISC" eid="Id1" size="2"><modifiedtripleset>'
        "<mtriple>Alan Bean | OCCUPATION | Test pilot</mtriple><mtriple>Alan Bean | BIRTH_PLACE | "
        "Wheeler, Texas</mtriple>"
        '</modifiedtripleset><lex comment="webnlg" lid="Id1">Alan Bean was a test pilot born in '
        "Wheeler, Texas.</lex>"
        '<lex comment="webnlg" lid="Id2"/><lex comment="webnlg" lid="Id3">Born in Wheeler, Alan Bean '
        "flew tests.</lex>"
        "</entry></entries></benchmark>"
    )
    [example] = get_task("dart").load_eval(str(tmp_path), "test")
    assert example.id == "dart-Id1" and len(example.references) == 2
    assert example.prompt.startswith("Triples: Alan Bean | OCCUPATION | Test pilot ; Alan Bean | BIRTH_PLACE")


def test_dart_test_json_layout(tmp_path):
    items = [
        {
            "tripleset": [["A", "B", "C"]],
            "subtree_was_extended": False,
            "annotations": [{"source": "e2e", "text": "A b C."}, {"source": "e2e", "text": "C is A's B."}],
        }
    ]
    (tmp_path / "dart-v1.1.1-full-test.json").write_text(json.dumps(items))
    [example] = get_task("dart").load_eval(str(tmp_path), "test")
    assert example.references == ["A b C.", "C is A's B."] and example.prompt == "Triples: A | B | C\nText:"


def test_dialogsum_counts_and_test_layout(data_root, tmp_path):
    task = get_task("dialogsum")
    assert task.load_train(f"{data_root}/dialogsum").num_rows == 12460
    dev = task.load_eval(f"{data_root}/dialogsum", "validation")
    assert len(dev) == 500 and dev[0].id == "dev_0" and all(len(ex.references) == 1 for ex in dev)
    assert dev[0].prompt.startswith("Dialogue:\n#Person1#: ") and dev[0].prompt.endswith("\nSummary:")
    record = {
        "fname": "test_0",
        "dialogue": "#Person1#: Hi.\n#Person2#: Hello.",
        "summary1": "They greet.",
        "topic1": "greeting",
        "summary2": "Two people say hi.",
        "topic2": "hi",
        "summary3": "A greeting.",
        "topic3": "greet",
    }
    (tmp_path / "dialogsum.test.jsonl").write_text(json.dumps(record) + "\n")
    [example] = task.load_eval(str(tmp_path), "test")
    assert example.id == "test_0" and example.references == [
        "They greet.",
        "Two people say hi.",
        "A greeting.",
    ]


def test_gsm8k_counts_and_test_layout(data_root, tmp_path):
    task = get_task("gsm8k")
    train = task.load_eval(f"{data_root}/gsm8k", "train")
    assert len(train) == 7473
    assert sum("," in ex.references[0] for ex in train) == 79  # thousands separators, per the README
    rows = task.load_train(f"{data_root}/gsm8k")
    assert rows[0]["target"].rstrip().split("\n")[-1].startswith("####")
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}) + "\n"
    )
    [example] = task.load_eval(str(tmp_path), "test")
    assert example.references == ["4"] and example.prompt == "Question: What is 2+2?\nAnswer:"
    with pytest.raises(UsageError, match="GSM8K has train and test only"):
        task.load_eval(str(tmp_path), "validation")


def test_bad_files_name_file_and_line(tmp_path):
    (tmp_path / "test.jsonl").write_text(
        '{"question": "q", "answer": "a #### 1"}\n{"question": "q2", "answer": \n'
    )
    with pytest.raises(UsageError, match=r"test.jsonl:2: invalid JSON"):
        get_task("gsm8k").load_eval(str(tmp_path), "test")
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n{"question": "q2"}\n')
    with pytest.raises(UsageError, match=r"test.jsonl:2: missing field\(s\) \['answer'\]"):
        get_task("gsm8k").load_eval(str(tmp_path), "test")
    (tmp_path / "devset.csv").write_text("mr,ref\nname[A],A.\nname[B],B.,extra\n")
    with pytest.raises(UsageError, match=r"devset.csv:3: malformed row"):
        get_task("e2e").load_eval(str(tmp_path), "validation")
    (tmp_path / "dialogsum.dev.jsonl").write_text('{"fname": "d", "dialogue": "x"}\n')
    with pytest.raises(UsageError, match=r"dialogsum.dev.jsonl:1: missing field 'summary'"):
        get_task("dialogsum").load_eval(str(tmp_path), "validation")
    (tmp_path / "testset_w_refs.csv").write_text("mr,ref\n")
    with pytest.raises(UsageError, match="testset_w_refs.csv: no records"):
        get_task("e2e").load_eval(str(tmp_path), "test")
    with pytest.raises(UsageError, match="unknown split 'dev'"):
        get_task("e2e").load_eval(str(tmp_path), "dev")
    with pytest.raises(UsageError, match="test file .*test.jsonl.* for task 'dialogsum' does not exist"):
        get_task("dialogsum").load_eval(str(tmp_path), "test")


def test_e2e_test_split_layout(tmp_path):
    (tmp_path / "testset_w_refs.csv").write_text(
        'mr,ref\n"name[A], food[Thai]",A serves Thai food.\n"name[A], food[Thai]","Thai food, at '
        'A."\nname[B],B.\n'
    )
    examples = get_task("e2e").load_eval(str(tmp_path), "test")
    assert [len(ex.references) for ex in examples] == [2, 1]
    assert examples[0].references == ["A serves Thai food.", "Thai food, at A."]


def test_a_training_split_is_parsed_once_per_file_version(tmp_path, monkeypatch):
    """A run reads its training split three times (checks, examples, a random preset's tokenizer text) and
    its validation split in between: one parse per split while its file is unchanged, a new one when it
    changes, and the callers' filtering never reaches the kept examples."""
    task = get_task("e2e")
    parses = []
    read = task.read_records
    monkeypatch.setattr(task, "read_records", lambda path: parses.append(path) or read(path))
    train = tmp_path / "trainset.csv"
    train.write_text("mr,ref\nname[A],A is here.\nname[B],B is there.\n")
    first = task.load_train(str(tmp_path), 1)
    everything = task.load_train(str(tmp_path), exclude_prompts={first[0]["prompt"]})
    assert first.num_rows == 1 and everything.num_rows == 1 and len(parses) == 1
    pairs = [(row["prompt"], row["target"]) for row in (first[0], everything[0])]
    assert task.training_text(str(tmp_path)) == [text for pair in pairs for text in pair]
    assert len(parses) == 1
    (tmp_path / "devset.csv").write_text("mr,ref\nname[D],D is near.\n")  # the held-out split, read between
    assert task.load_train(str(tmp_path), split="validation").num_rows == 1 and len(parses) == 2
    assert task.training_text(str(tmp_path), 1) == list(pairs[0]) and len(parses) == 2
    train.write_text("mr,ref\nname[A],A is here.\nname[B],B is there.\nname[C],C too.\n")
    assert task.load_train(str(tmp_path)).num_rows == 3 and len(parses) == 3
