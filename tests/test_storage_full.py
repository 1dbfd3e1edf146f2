"""A checkpoint that does not fit: a real small file system (tmpfs) under the run's output directory.

The job ends with one ``error:`` line and exit status 4 (which launch/restart.py does not retry), the
checkpoints saved before are intact and verified, nothing half-written is left in place, and the run
continues from them (copied to a disk with room) to the same adapters as the uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from launching import COMMON, TRAIN, global_batch, job_env, one_rank
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield str(mount_point)
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoints_resumable(
    runs, small_disk, tmp_path, e2e_dir
):
    from ds_loradrop.training.checkpoint import list_complete, newest_intact

    out, _ = runs
    run = os.path.join(small_disk, "run")
    command = [*one_rank(TRAIN), "--ds_config", out["zero3_config"], *global_batch(1, 4),
               "--data_dir", e2e_dir, *COMMON, "--save_steps", "2", "--report_to", "none"]  # fmt: skip
    env = job_env(tmp_path)
    result = subprocess.run(
        [*command, "--output_dir", run], env=env, capture_output=True, text=True, check=False
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 4, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: no space for checkpoint stage1-step-"), errors
    saved = list_complete(run)
    assert saved and f"the newest complete checkpoint {saved[-1]} is intact" in errors[0]
    assert "Traceback" not in result.stderr
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith(".saving-")]
    assert newest_intact(run) == (saved[-1], [])
    refused = errors[0].split("no space for checkpoint ")[1].split(" ")[0]
    assert refused > os.path.basename(saved[-1])  # the save after the newest one was refused

    # room again (the run moved to a disk with space): it continues from step 2 to the end
    moved = str(tmp_path / "moved")
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns(".ds_loradrop.lock"))
    resumed = subprocess.run(
        [*command, "--output_dir", moved, "--resume", "auto"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage1: resumed from {os.path.join(moved, 'checkpoints', os.path.basename(saved[-1]))}" in (
        resumed.stdout + resumed.stderr
    )
    got = load_file(os.path.join(moved, "adapter", "adapter_model.safetensors"))
    want = load_file(os.path.join(out["one_rank"], "adapter", "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
