"""Resuming on another number of ranks and another ZeRO stage (ranks started by tests/rank_launcher.py).

Sources: the session's reference runs (tests/conftest.py ``runs``: 1 rank ZeRO-3 and 2 ranks ZeRO-2, both
checkpointing every 4 steps) and a 4-rank ZeRO-3 run made here. A copy of a run directory is cut back to a
checkpoint (the later checkpoints and the final files removed) and continued with ``--resume auto`` on
another shape; it must end where the uninterrupted run on the new shape ends.

Tolerance 5e-5: the reference runs themselves differ by up to 1.75e-5 between 1 and 2 ranks (gradients
summed in another order; Adam turns that noise in the near-zero first gradients of lora_A into ~1e-5), and
a resumed run carries the first shape's rounding up to the checkpoint. Resuming with Adam's moments reset,
or with the LR schedule restarted, moves the adapters by ~1e-3 (lr 3e-3), 20x the tolerance.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import SHARED_DATA
from launching import COMMON, TRAIN, direct, global_batch, job_env, launch, one_rank
from mlflow import MlflowClient
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

TOLERANCE = 5e-5
E2E_DIR = os.path.join(SHARED_DATA, "e2e")
FINAL_FILES = ("adapter", "summary.json", "eval", "plots")


def cut_back(source: str, target: str, keep_newest: str) -> str:
    """A copy of run ``source`` as it was when checkpoint ``keep_newest`` was the newest."""
    shutil.copytree(source, target)
    checkpoints = os.path.join(target, "checkpoints")
    names = sorted(os.listdir(checkpoints), key=lambda n: (not n.startswith("stage1"), n))
    for name in names[names.index(keep_newest) + 1 :]:
        shutil.rmtree(os.path.join(checkpoints, name))
    for name in FINAL_FILES:
        path = os.path.join(target, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return target


def adapters(run: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))


def assert_adapters_close(candidate: str, reference: str, tolerance: float = TOLERANCE) -> float:
    got, want = adapters(candidate), adapters(reference)
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= tolerance, f"{candidate} vs {reference}: max |Δ| {worst:.2e} > {tolerance:.0e}"
    return worst


def resume_args(config: str, batch: list[str], output_dir: str, *extra) -> list[str]:
    return [
        "--ds_config",
        config,
        *batch,
        "--output_dir",
        output_dir,
        "--data_dir",
        E2E_DIR,
        *COMMON,
        "--resume",
        "auto",
        *extra,
    ]


@pytest.fixture(scope="module")
def reshaped(runs, tmp_path_factory):
    """Each continued run (output directory, stdout) by name."""
    out, _ = runs
    root = tmp_path_factory.mktemp("reshaped")
    env = job_env(root)
    zero2, zero3 = out["zero2_config"], out["zero3_config"]
    results = {}

    # 4 ranks, ZeRO-3, global batch 8 (micro 2 x 4), its own MLflow store
    store = f"sqlite:///{root / 'mlflow.db'}"
    four = str(root / "four_ranks")
    tracking = ("--mlflow_tracking_uri", store, "--mlflow_experiment", "reshape", "--run_name", "four")
    launch(
        direct(TRAIN, "--ds_config", zero3, *global_batch(4, 2), "--save_steps", "4",
                  "--output_dir", four, "--data_dir", E2E_DIR, *COMMON, *tracking, ranks=4),
        env,
    )  # fmt: skip
    results["four_ranks"] = (four, "")

    # 2 ranks ZeRO-2 -> 1 rank ZeRO-3, in the middle of stage 2
    target = cut_back(out["zero2_torchrun"], str(root / "two_to_one"), "stage2-step-000004")
    command = one_rank(TRAIN, *resume_args(zero3, global_batch(1, 4), target, "--report_to", "none"))
    log = launch(command, env).stdout
    results["two_to_one"] = (target, log)

    # 4 ranks ZeRO-3 -> 2 ranks ZeRO-2, in the middle of stage 2, the same MLflow run continued; the
    # 4-rank command line as it was (micro batch 2, no accumulation): the global batch of 8 is kept by
    # accumulating 2
    target = cut_back(four, str(root / "four_to_two"), "stage2-step-000004")
    log = launch(direct(TRAIN, *resume_args(zero2, global_batch(4, 2), target, *tracking)), env)
    log = log.stdout + log.stderr
    results["four_to_two"] = (target, log)

    # 1 rank ZeRO-3 -> 2 ranks ZeRO-2, between stage 1 and stage 2
    target = cut_back(out["one_rank"], str(root / "one_to_two"), "stage1-step-000008")
    command = direct(TRAIN, *resume_args(zero2, global_batch(2, 2), target, "--report_to", "none"))
    log = launch(command, env).stdout
    results["one_to_two"] = (target, log)
    results["store"] = (store, "")
    return results


def test_two_ranks_zero2_resumed_on_one_rank_zero3_ends_as_the_one_rank_run(runs, reshaped):
    out, _ = runs
    target, log = reshaped["two_to_one"]
    assert (
        "stage2: resumed from" in log
        and "at step 4/8 (portable state: 2 ranks, ZeRO-2 -> 1 rank, ZeRO-3)" in log
    )
    assert_adapters_close(target, out["one_rank"])
    # and it left the 2-rank trajectory where that one went on
    assert_adapters_close(target, out["zero2_torchrun"])


def test_four_ranks_zero3_resumed_on_two_ranks_zero2_continues_its_mlflow_run(runs, reshaped):
    out, _ = runs
    target, log = reshaped["four_to_two"]
    assert "(portable state: 4 ranks, ZeRO-3 -> 2 ranks, ZeRO-2)" in log
    assert "on 2 rank(s): gradient accumulation 1 -> 2 keeps its global batch of 8" in log
    assert_adapters_close(target, out["zero2_torchrun"])
    assert_adapters_close(reshaped["four_ranks"][0], out["one_rank"])
    client = MlflowClient(tracking_uri=reshaped["store"][0])
    found = client.search_runs([client.get_experiment_by_name("reshape").experiment_id])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    history = client.get_metric_history(found[0].info.run_id, "stage2/loss")
    # steps 5 and 8 logged by the 4-rank run before it was cut back, and again by the resumed job: into
    # the same run, which the resumed job finished
    assert [m.step for m in history] == [5, 8, 5, 8]


def test_one_rank_resumed_between_the_stages_on_two_ranks(runs, reshaped):
    out, _ = runs
    target, log = reshaped["one_to_two"]
    # stage 1 is finished: its adapter and plan are reused, stage 2 runs whole on the new shape
    assert "stage1" not in "".join(line for line in log.splitlines() if "resumed from" in line)
    with (
        open(os.path.join(target, "plan.json")) as handle,
        open(os.path.join(out["one_rank"], "plan.json")) as ref,
    ):
        assert json.load(handle)["targets"] == json.load(ref)["targets"]
    assert_adapters_close(target, out["zero2_torchrun"])


def test_a_checkpoint_refuses_another_global_batch_size(runs, tmp_path):
    from ds_loradrop.errors import UsageError
    from ds_loradrop.training.checkpoint import check_resumable

    out, _ = runs
    checkpoint = os.path.join(out["zero2_torchrun"], "checkpoints", "stage2-step-000004")
    state = check_resumable(checkpoint, out["zero2_torchrun"], 1, 8)
    assert (state.world_size, state.zero_stage, state.global_batch_size) == (2, 2, 8)
    with pytest.raises(UsageError, match="trained with a global batch of 8; this job's is 4"):
        check_resumable(checkpoint, out["zero2_torchrun"], 1, 4)
    # a checkpoint without the portable state (written before it existed) still needs its own ranks
    old = shutil.copytree(checkpoint, tmp_path / "checkpoints" / "stage2-step-000004")
    for name in ("trainable_state.safetensors", "trainable_state.json", "manifest.json"):
        os.remove(old / name)
    with pytest.raises(UsageError, match="written by 2 ranks, this job has 1, and it has no trainable_state"):
        check_resumable(str(old), str(tmp_path), 1, 8)
