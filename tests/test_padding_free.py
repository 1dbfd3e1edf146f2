"""--padding_free through the real entry point: the same loss curve as padded batches (float noise), for
LoRA-drop's two stages on one rank and for LoRA on two ZeRO-3 ranks, and the same plan."""

import json
import re

import pytest
from launching import COMMON, TRAIN, direct, global_batch, job_env, launch, one_rank, write_ds_config

pytestmark = pytest.mark.integration

STEP_LOSS = re.compile(r"(stage1|stage2|train) step (\d+)/\d+ loss ([0-9.]+)")


def _losses(stdout: str) -> dict[tuple[str, int], float]:
    return {(stage, int(step)): float(loss) for stage, step, loss in STEP_LOSS.findall(stdout)}


def _flags(e2e_dir, out, ds_config, extra):
    return [
        "--ds_config",
        ds_config,
        "--data_dir",
        e2e_dir,
        "--output_dir",
        str(out),
        *COMMON,
        "--logging_steps",
        "1",
        "--max_eval_samples",
        "2",
        "--max_new_tokens",
        "4",
        "--report_to",
        "none",
        *extra,
    ]


@pytest.mark.parametrize("ranks", [1, 2])
def test_padding_free_gives_the_padded_loss_curve(tmp_path, e2e_dir, ranks):
    env = job_env(tmp_path)
    ds_config = write_ds_config(tmp_path / "ds.json", 2 if ranks == 1 else 3)
    # accumulating on either: packing then spans the micro batches of a step
    method = global_batch(1, 4) if ranks == 1 else ["--method", "lora", *global_batch(2, 2)]
    runs = {}
    for name, extra in (("padded", []), ("padding_free", ["--padding_free"])):
        flags = _flags(e2e_dir, tmp_path / name, ds_config, [*method, *extra])
        if ranks == 1:
            command = one_rank(TRAIN, *flags)
        else:
            command = direct(TRAIN, *flags)
        runs[name] = _losses(launch(command, env).stdout)
    assert len(runs["padded"]) >= 8 and runs["padded"].keys() == runs["padding_free"].keys()
    for key, loss in runs["padded"].items():
        # the logged loss has 4 decimals; the two paths differ by float summation order only
        assert runs["padding_free"][key] == pytest.approx(loss, abs=2e-4), key
    if ranks == 1:  # LoRA-drop: stage 1's importance, hence the plan, is the same
        plans = [json.loads((tmp_path / name / "plan.json").read_text()) for name in runs]
        assert plans[0]["targets"].keys() == plans[1]["targets"].keys()
        for target, value in plans[0]["targets"].items():
            assert plans[1]["targets"][target]["retained"] == value["retained"]
            assert plans[1]["targets"][target]["normalized"] == pytest.approx(value["normalized"], rel=1e-3)
