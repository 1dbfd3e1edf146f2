import glob
import json
import os

import pytest
from conftest import REPO_ROOT

from ds_loradrop.config import DEFAULT_GRADIENT_ACCUMULATION_STEPS, DEFAULT_MICRO_BATCH_SIZE, TrainConfig
from ds_loradrop.errors import UsageError
from ds_loradrop.training.ds_config import load_ds_config, resolve_ds_config, zero_stage

pytestmark = pytest.mark.unit


def resolve(raw, world_size=2, native_bf16=False, **train):
    return resolve_ds_config(
        raw,
        TrainConfig(**train),
        world_size=world_size,
        hidden_size=64,
        accelerator_has_native_bf16=native_bf16,
    )


def test_shipped_configs_resolve_with_defaults():
    paths = sorted(glob.glob(os.path.join(REPO_ROOT, "ds_configs", "**", "*.json"), recursive=True))
    assert len(paths) == 5, paths
    stages = {}
    for path in paths:
        config, batch = resolve(load_ds_config(path))
        name = os.path.basename(path)
        stages[name] = zero_stage(config)
        assert DEFAULT_MICRO_BATCH_SIZE == 4  # the quick start's global batch of 8 on 2 ranks
        assert (
            config["train_batch_size"]
            == batch.global_batch_size
            == 4 * DEFAULT_GRADIENT_ACCUMULATION_STEPS * 2
        )
        assert config["gradient_clipping"] == 1.0
        # "auto": fp32 on the CPU, bf16 on an accelerator with native bf16; *_bf16.json: bf16 everywhere
        assert config["bf16"]["enabled"] is name.endswith("_bf16.json")
        assert resolve(load_ds_config(path), native_bf16=True)[0]["bf16"]["enabled"] is True
        if name.endswith("_bf16.json"):  # the same settings as the "auto" file, precision forced
            auto = load_ds_config(path.replace("_bf16.json", ".json"))
            assert {**auto, "bf16": {"enabled": True}} == load_ds_config(path)
    assert stages == {
        "zero2.json": 2,
        "zero2_bf16.json": 2,
        "zero3.json": 3,
        "zero3_bf16.json": 3,
        "zero3_offload.json": 3,
    }
    zero3, _ = resolve(load_ds_config(os.path.join(REPO_ROOT, "ds_configs", "zero3.json")))
    # HF Trainer convention for bucket sizes from the hidden size (64 here)
    assert zero3["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert zero3["zero_optimization"]["reduce_bucket_size"] == 64 * 64


def test_auto_takes_the_command_line_value():
    raw = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
    config, batch = resolve(
        raw, per_device_train_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.5
    )
    assert (batch.micro_batch_size, batch.gradient_accumulation_steps, batch.max_grad_norm) == (3, 5, 0.5)
    assert config["train_batch_size"] == 30
    assert raw["train_micro_batch_size_per_gpu"] == "auto"  # the input is not rewritten


def test_concrete_json_values_are_kept_and_conflicts_are_errors():
    raw = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    _, batch = resolve(raw)
    assert batch.global_batch_size == 16
    _, batch = resolve(raw, per_device_train_batch_size=4)
    assert batch.micro_batch_size == 4
    with pytest.raises(
        UsageError, match="--per_device_train_batch_size 8 conflicts with train_micro_batch_size_per_gpu = 4"
    ):
        resolve(raw, per_device_train_batch_size=8)
    with pytest.raises(UsageError, match="--gradient_accumulation_steps 3 conflicts"):
        resolve(raw, gradient_accumulation_steps=3)
    with pytest.raises(
        UsageError, match="train_batch_size = 100 but micro-batch 4 x accumulation 2 x world size 2 = 16"
    ):
        resolve({**raw, "train_batch_size": 100})


def test_optimizer_auto_scheduler_refused_and_unknown_auto():
    config, _ = resolve(
        {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}, learning_rate=1e-3
    )
    assert config["optimizer"]["params"] == {"lr": 1e-3, "weight_decay": 0.0}
    with pytest.raises(UsageError, match="optimizer.params.lr = 0.1 conflicts with --learning_rate"):
        resolve({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}})
    with pytest.raises(UsageError, match="'scheduler' section"):
        resolve({"scheduler": {"type": "WarmupLR"}})
    with pytest.raises(UsageError, match=r"cannot fill: \['zero_optimization.sub_group_size'\]"):
        resolve({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}})


def test_unreadable_and_invalid_json(tmp_path):
    with pytest.raises(UsageError, match="cannot read ds_config"):
        load_ds_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(UsageError, match="is not valid JSON"):
        load_ds_config(str(bad))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(UsageError, match="must hold a JSON object"):
        load_ds_config(str(bad))
