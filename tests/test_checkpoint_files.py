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


def _state(world_size=2, **extra):
    return {"stage": "stage2", "step": 4, "num_steps": 8, "seed": 3, "world_size": world_size, **extra}


def _make_whole(root, name, world_size=2):
    """A checkpoint with every file a resume looks for and its manifest."""
    from ds_loradrop.training.checkpoint_integrity import write_manifest

    path = root / "checkpoints" / name
    (path / "ds" / "state").mkdir(parents=True)
    (path / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
    for rank in range(world_size):
        (path / f"rng_rank{rank}.safetensors").write_bytes(b"r" * 100)
    (path / "trainable_state.safetensors").write_bytes(os.urandom(2048))
    (path / "trainable_state.json").write_text("{}")
    (path / STATE_NAME).write_text(json.dumps(_state(world_size, zero_stage=2, global_batch_size=8)))
    write_manifest(str(path))
    return path


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: _flip_a_byte(p / "trainable_state.safetensors"), "does not match its SHA-256"),
        (
            lambda p: (p / "trainable_state.safetensors").write_bytes(b"x" * 10),
            "has 10 bytes, the manifest says 2048",
        ),
        (lambda p: os.remove(p / "rng_rank1.safetensors"), "rng_rank1.safetensors is missing"),
        (lambda p: os.remove(p / "manifest.json"), "no manifest.json"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_and_refused_by_name(tmp_path, damage, reason):
    from ds_loradrop.errors import UsageError
    from ds_loradrop.training.checkpoint import check_resumable, newest_intact

    older = _make_whole(tmp_path, checkpoint_name("stage2", 4))
    newest = _make_whole(tmp_path, checkpoint_name("stage2", 8))
    assert newest_intact(str(tmp_path)) == (str(newest), [])
    check_resumable(str(newest), str(tmp_path), 2, 8)
    damage(newest)
    path, skipped = newest_intact(str(tmp_path))
    assert path == str(older)
    assert [p for p, _ in skipped] == [str(newest)] and reason in skipped[0][1]
    with pytest.raises(UsageError, match="is damaged: .*" + reason.split(" ")[0]):
        check_resumable(str(newest), str(tmp_path), 2, 8)
    # every checkpoint damaged: the run starts from the beginning, saying why
    _flip_a_byte(older / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert newest_intact(str(tmp_path))[0] is None


def test_a_checkpoint_from_before_manifests_is_still_resumable(tmp_path):
    from ds_loradrop.training.checkpoint import check_resumable, newest_intact

    path = tmp_path / "checkpoints" / checkpoint_name("stage2", 4)
    (path / "ds" / "state").mkdir(parents=True)
    for rank in range(2):
        (path / f"rng_rank{rank}.safetensors").write_bytes(b"r")
    (path / STATE_NAME).write_text(json.dumps(_state()))
    assert newest_intact(str(tmp_path)) == (str(path), [])
    assert check_resumable(str(path), str(tmp_path), 2).zero_stage is None


def test_no_space_for_a_checkpoint_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import torch

    from ds_loradrop.errors import StorageFull
    from ds_loradrop.training import checkpoint_integrity

    class Engine:
        module = torch.nn.Linear(1000, 1000)  # 1,001,000 trainable parameters: ~28 MB estimated

    monkeypatch.setattr(checkpoint_integrity, "all_reduce_max", lambda t: t)
    monkeypatch.setattr(checkpoint_integrity.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**6})())
    with pytest.raises(StorageFull, match=r"no space for checkpoint stage2-step-000004 .* no checkpoint was"):
        checkpoint_integrity.check_space(Engine(), str(tmp_path / "run"), "stage2-step-000004", None)
    newest = _make_whole(tmp_path, checkpoint_name("stage2", 2))
    with pytest.raises(StorageFull, match="the newest complete checkpoint .*stage2-step-000002 is intact"):
        checkpoint_integrity.check_space(Engine(), str(tmp_path), "stage2-step-000004", str(newest))
    monkeypatch.setattr(checkpoint_integrity.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**9})())
    checkpoint_integrity.check_space(Engine(), str(tmp_path), "stage2-step-000004", None)
