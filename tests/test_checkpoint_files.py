import json
import os

import pytest

from ds_loradrop.training.checkpoint import STATE_NAME, checkpoint_name, latest_checkpoint, list_complete

pytestmark = pytest.mark.unit


def _make(root, name, complete=True):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    if complete:
        (path / STATE_NAME).write_text(json.dumps({"stage": "x"}))
    return str(path)


def test_newest_complete_checkpoint_orders_by_stage_then_step(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    _make(tmp_path, checkpoint_name("stage1", 30))
    _make(tmp_path, checkpoint_name("stage2", 4))
    newest = _make(tmp_path, checkpoint_name("stage2", 12))
    _make(tmp_path, ".saving-" + checkpoint_name("stage2", 14))  # an interrupted save
    _make(tmp_path, checkpoint_name("stage2", 16), complete=False)  # no trainer state: incomplete
    assert latest_checkpoint(str(tmp_path)) == newest
    assert [os.path.basename(p) for p in list_complete(str(tmp_path))] == [
        "stage1-step-000030",
        "stage2-step-000004",
        "stage2-step-000012",
    ]
