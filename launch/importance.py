"""The LoRA-drop importance profile of any saved LoRA adapter, and the plan it gives for a threshold.

    python launch/importance.py --run outputs/default --threshold 0.8 --output_dir outputs/plan-t0.8
    python launch/importance.py --adapter my_peft_adapter --model meta-llama/Llama-2-7b-hf --task e2e \
        --threshold 0.9 --output_dir outputs/plan

--run takes a training run's output directory: its stage1_adapter/ and the data and sample settings of
its run_config.json (the flags below override them). --adapter takes any adapter directory, this
project's or a plain PEFT LoRA adapter. Writes plan.json (train it with launch/train.py --plan PATH,
which skips stage 1) and plots/importance.png.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_loradrop.recipes.cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="A training run's output directory.")
    parser.add_argument(
        "--adapter", default=None, help="Adapter directory (default with --run: its stage1_adapter/)."
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where plan.json and plots/ go (must not hold a plan)."
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Rows per forward.")
    parser.add_argument("--model", default=None, help="Base model (default: the adapter's base model).")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "bf16"),
        help="What the model and adapters compute in (bf16: as a bf16 run's stage 1); sums are fp32/fp64.",
    )
    parser.add_argument("--model_cache_dir", default=None, help="Cache of the presets.")
    parser.add_argument(
        "--task", default=None, help="e2e, dart, dialogsum or gsm8k (default: the run's, else e2e)."
    )
    parser.add_argument(
        "--data_dir", default=None, help="The task's files (default: the run's, else the usual)."
    )
    parser.add_argument("--train_split", default=None, help="Split the stage-1 sample is drawn from.")
    parser.add_argument(
        "--max_train_samples", type=int, default=None, help="First N training rows (0 = all)."
    )
    parser.add_argument(
        "--max_seq_length", type=int, default=None, help="Tokens per row (default: the task's)."
    )
    parser.add_argument(
        "--sample_ratio", type=float, default=None, help="Stratified sample ratio (default 0.1)."
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="Seed of the sample (default: the run's, else 42)."
    )
    parser.add_argument("--threshold", type=float, default=None, help="T (default: the run's, else 0.9).")
    parser.add_argument("--selection", default=None, help="output_norm, inverse, random or last_k.")
    parser.add_argument("--low_importance", default=None, help="share or drop.")
    return parser.parse_args(argv)


def main() -> None:
    from ds_loradrop.errors import UsageError
    from ds_loradrop.recipes.importance import DTYPES, adapter_importance, run_config_for
    from ds_loradrop.tracking.experiment_log import PLOTS_DIR
    from ds_loradrop.tracking.plots import plot_importance

    args = parse_args()
    if args.run is None and args.adapter is None:
        raise UsageError("pass --run (a training run's directory) or --adapter (an adapter directory)")
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be > 0, got {args.batch_size}")
    adapter = args.adapter or os.path.join(args.run, "stage1_adapter")
    plan_path = os.path.join(args.output_dir, "plan.json")
    if os.path.exists(plan_path):
        raise UsageError(f"{plan_path!r} exists; choose another --output_dir")
    cfg = run_config_for(args.run, vars(args))
    plan = adapter_importance(
        adapter, cfg, batch_size=args.batch_size, model=args.model, dtype=DTYPES[args.dtype]
    )
    os.makedirs(os.path.join(args.output_dir, PLOTS_DIR), exist_ok=True)
    plan.save(plan_path)
    plot_importance(plan, os.path.join(args.output_dir, PLOTS_DIR, "importance.png"))
    for name, target in plan.targets.items():
        print(f"{name}: retained {len(target.retained)}/{len(target.normalized)} {target.retained}")
    print(f"wrote {plan_path}")


if __name__ == "__main__":
    run_main(main)
