"""Plan the per-GPU and per-node CPU memory of a LoRA-drop run under ZeRO-2 / ZeRO-3, with and without
offload.

    python launch/plan_memory.py --model llama-2-7b|MODEL_DIR|config.json --gpus 1 2 8 16 [--json]

Formulas: ds_loradrop/training/memory_plan.py. The "full fine-tuning (DeepSpeed estimator)" rows are
DeepSpeed's own model-states estimate, which assumes every parameter is trained.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_loradrop.errors import UsageError
from ds_loradrop.recipes.cli import run_main
from ds_loradrop.training.memory_plan import (
    DEEPSPEED_MAX_LIVE_PARAMETERS,
    DTYPE_BYTES,
    MemoryEstimate,
    ModelShape,
    TrainingSetup,
    activation_bytes,
    full_lora_parameters,
    load_model_shape,
    markdown_table,
    node_layout,
    plan_lora_drop,
    trainable_parameters,
)

FULL_FINETUNING_SETUPS = (  # (label, ZeRO stage, offload_optimizer, offload_param)
    ("full fine-tuning (DeepSpeed estimator) ZeRO-2", 2, False, False),
    ("full fine-tuning (DeepSpeed estimator) ZeRO-2 + offload_optimizer", 2, True, False),
    ("full fine-tuning (DeepSpeed estimator) ZeRO-3", 3, False, False),
    ("full fine-tuning (DeepSpeed estimator) ZeRO-3 + offload_optimizer", 3, True, False),
    ("full fine-tuning (DeepSpeed estimator) ZeRO-3 + offload_optimizer + offload_param", 3, True, True),
)


def deepspeed_model_states(
    shape: ModelShape, stage: int, gpus: int, gpus_per_node: int, offload_optimizer: bool, offload_param: bool
) -> tuple[int, int]:
    """(GPU bytes per rank, CPU bytes per node) from DeepSpeed's estimator, every parameter trained.

    The ``*_all_cold`` functions only print a table and return None; these are the functions they call
    for each row (zero_init=True, additional_buffer_factor=1.5, their defaults).
    """
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's logger writes to stdout on import
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    per_node, nodes = node_layout(gpus, gpus_per_node)
    if stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            shape.total_params, per_node, nodes, cpu_offload=offload_optimizer
        )
    else:
        cpu, gpu, _largest_layer_memory = estimate_zero3_model_states_mem_needs(
            shape.total_params,
            shape.largest_module_params,
            per_node,
            nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param,
            zero_init=True,
        )
    return gpu, cpu


def full_finetuning_estimates(
    shape: ModelShape, setup: TrainingSetup, gpus: int, gpus_per_node: int
) -> list[MemoryEstimate]:
    """DeepSpeed's model states for full fine-tuning, with the same activations as LoRA-drop."""
    activations = activation_bytes(shape, setup, False), activation_bytes(shape, setup, True)
    estimates = []
    for label, stage, offload_optimizer, offload_param in FULL_FINETUNING_SETUPS:
        gpu, cpu = deepspeed_model_states(shape, stage, gpus, gpus_per_node, offload_optimizer, offload_param)
        estimates.append(MemoryEstimate(label, gpus, gpu, *activations, cpu))
    return estimates


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error: ...`` line (exit status 2, via run_main)."""

    def error(self, message: str):
        raise UsageError(message)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b", help="Preset name, model directory or config.json.")
    parser.add_argument("--gpus", type=positive_int, nargs="+", default=[1, 2, 8, 16], help="GPU counts.")
    parser.add_argument("--gpus_per_node", type=positive_int, default=8)
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank r.")
    parser.add_argument("--lora_targets", default="q_proj,v_proj", help="Comma-separated projection names.")
    parser.add_argument(
        "--retained_fraction",
        type=float,
        default=0.5,
        help="Share of the full LoRA parameters LoRA-drop keeps (the paper: about half).",
    )
    parser.add_argument("--micro_batch_size", type=int, default=4, help="Sequences per GPU per step.")
    parser.add_argument("--seq_length", type=int, default=512, help="Tokens per sequence.")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="Training dtype.")
    parser.add_argument(
        "--attention",
        default="sdpa",
        choices=("sdpa", "eager"),
        help="eager keeps the s x s attention probabilities; sdpa/flash does not.",
    )
    parser.add_argument(
        "--max_live_parameters",
        type=int,
        default=DEEPSPEED_MAX_LIVE_PARAMETERS,
        help="ZeRO-3: the ds_config's stage3_max_live_parameters (DeepSpeed's default 1e9), the gathered "
        "parameters a rank may hold while training.",
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a Markdown table.")
    args = parser.parse_args(argv)
    targets = tuple(name.strip() for name in args.lora_targets.split(",") if name.strip())
    setup = TrainingSetup(
        args.lora_r,
        targets,
        args.retained_fraction,
        args.micro_batch_size,
        args.seq_length,
        args.dtype,
        args.attention,
        args.max_live_parameters,
    )
    for gpus in args.gpus:
        node_layout(gpus, args.gpus_per_node)  # reject a bad GPU count before the slow model build
    shape = load_model_shape(args.model)
    estimates = [
        estimate
        for gpus in args.gpus
        for estimate in plan_lora_drop(shape, setup, gpus, args.gpus_per_node)
        + full_finetuning_estimates(shape, setup, gpus, args.gpus_per_node)
    ]
    counts = {
        "total_params": shape.total_params,
        "full_lora_params": full_lora_parameters(shape, setup.lora_targets, setup.lora_r),
        "trainable_params": trainable_parameters(shape, setup),
    }
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    **counts,
                    "setup": dataclasses.asdict(setup),
                    "estimates": [e.as_dict() for e in estimates],
                },
                indent=2,
            )
        )
        return
    print(
        f"{args.model}: {counts['total_params']:,} parameters; LoRA {counts['full_lora_params']:,}, "
        f"LoRA-drop trains {counts['trainable_params']:,} ({setup.retained_fraction:g} retained); "
        f"micro-batch {setup.micro_batch_size} x {setup.seq_length} tokens, {setup.dtype}, "
        f"{args.gpus_per_node} GPUs per node\n"
    )
    print(markdown_table(estimates))


if __name__ == "__main__":
    run_main(main)
