"""Every file and directory name a run writes under its ``--output_dir`` (and an adapter directory holds),
in one place. Pure names and joins; the bottom layer with ``errors``.

    run_config.json          the run configuration and what was resolved
    ds_config.json           the DeepSpeed config with "auto" filled
    plan.json                the LoRA-drop plan (loradrop)
    sparse_masks.safetensors SNIP's masks (sparse_lora)
    stage1_adapter/          the stage-1 LoRA (loradrop)
    adapter/                 the final adapter (adapter_model.safetensors, adapter_config.json, plan.json)
    best_adapter/            the best adapter by --save_best_by, with best.json
    model/                   the fine-tuned model (full)
    eval/                    predictions.jsonl, predictions_sample.jsonl, metrics.json; base/, step-N/
    checkpoints/             complete DeepSpeed checkpoints (see training/checkpoint.py)
    plots/                   importance and loss plots
    tracking.json            the MLflow run this directory belongs to
    summary.json             what the run measured
"""

from __future__ import annotations

import os

RUN_CONFIG_NAME = "run_config.json"
DS_CONFIG_NAME = "ds_config.json"
PLAN_NAME = "plan.json"
MASKS_NAME = "sparse_masks.safetensors"
STAGE1_ADAPTER_DIR = "stage1_adapter"
FINAL_ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"
FULL_MODEL_DIR = "model"
EVAL_DIR = "eval"
BASE_EVAL_DIR = os.path.join(EVAL_DIR, "base")
CHECKPOINT_DIR = "checkpoints"
PLOTS_DIR = "plots"
TRACKING_RECORD = "tracking.json"
SUMMARY_NAME = "summary.json"

# Inside an adapter directory and an evaluation directory.
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PREDICTIONS_NAME = "predictions.jsonl"
PREDICTIONS_SAMPLE_NAME = "predictions_sample.jsonl"
METRICS_NAME = "metrics.json"
BEST_RECORD = "best.json"  # in best_adapter/: the metric, its value and the step

# What --overwrite_output_dir removes and what makes a directory "hold a run".
RUN_FILES = (
    RUN_CONFIG_NAME,
    SUMMARY_NAME,
    PLAN_NAME,
    FINAL_ADAPTER_DIR,
    BEST_ADAPTER_DIR,
    STAGE1_ADAPTER_DIR,
    FULL_MODEL_DIR,
    EVAL_DIR,
    CHECKPOINT_DIR,
    PLOTS_DIR,
    TRACKING_RECORD,
    DS_CONFIG_NAME,
    MASKS_NAME,
)


def step_eval_dir(step: int) -> str:
    return os.path.join(EVAL_DIR, f"step-{step}")
