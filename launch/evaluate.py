"""Evaluate a saved adapter (or the base model) by generation.

    deepspeed --num_gpus 2 launch/evaluate.py --task e2e --split validation \
        --adapter outputs/default/adapter --output_dir outputs/eval
    python launch/evaluate.py --task gsm8k --split test --model meta-llama/Llama-2-7b-hf --output_dir out

Writes predictions.jsonl and metrics.json. Run with --help for every flag.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, once per call and rank.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

from ds_loradrop.recipes.cli import parse_eval_config, run_main
from ds_loradrop.recipes.evaluate import evaluate_saved

if __name__ == "__main__":
    run_main(lambda: evaluate_saved(*parse_eval_config()))
