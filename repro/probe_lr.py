"""A learning-rate probe from the training loss only (no evaluation data): the same 30 steps, the same
batches (one rank, same seed) at each learning rate; the loss a step logs is that step's batch loss.

    python repro/probe_lr.py --method lora --learning_rates 5e-4 2e-3 5e-3 2e-2 \
        --output repro/results/probes/lora_lr.json

It is how the study's VeRA learning rate was chosen (repro/results/probes/vera_lr.json); running it for
LoRA too puts both methods' learning rates on the same footing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"train step (\d+)/\d+ loss ([0-9.]+)")


def probe_command(method: str, learning_rate: str, steps: int, output_dir: str) -> list[str]:
    return [
        sys.executable,
        "launch/train.py",
        "--method",
        method,
        "--model",
        "smollm2-135m",
        "--ds_config",
        "ds_configs/zero2.json",
        "--max_train_samples",
        "1200",
        "--max_steps",
        str(steps),
        "--logging_steps",
        "10",
        "--gradient_accumulation_steps",
        "2",
        "--max_eval_samples",
        "1",
        "--no_eval_base_model",
        "--report_to",
        "none",
        "--seed",
        "1",
        "--learning_rate",
        learning_rate,
        "--output_dir",
        output_dir,
    ]


def losses_from_log(text: str) -> dict[str, float]:
    return {step: round(float(loss), 4) for step, loss in STEP_LINE.findall(text)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--learning_rates", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    loss_at_step: dict[str, dict[str, float]] = {}
    for learning_rate in args.learning_rates:
        with tempfile.TemporaryDirectory() as out:
            command = probe_command(args.method, learning_rate, args.steps, out)
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"error: probe at learning rate {learning_rate} failed:\n{done.stderr[-2000:]}")
        loss_at_step[learning_rate] = losses_from_log(done.stdout + done.stderr)
        print(learning_rate, loss_at_step[learning_rate], flush=True)
    last = str(args.steps)
    chosen = min(loss_at_step, key=lambda lr: loss_at_step[lr][last])
    template = probe_command(args.method, "LR", args.steps, "OUT")
    record = {
        "what": f"{args.method} learning-rate probe: training loss only (no evaluation data used)",
        "command": shlex.join(["python", *template[1:]]),
        "global_batch": 8,
        "note": "one rank, same seed, so every learning rate sees the same batches; the loss logged at a "
        f"step is that step's batch loss; {args.steps} steps with their own linear schedule",
        "loss_at_step": loss_at_step,
        "chosen": chosen,
        "why": f"lowest loss at step {last}",
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(args.output, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")


if __name__ == "__main__":
    main()
