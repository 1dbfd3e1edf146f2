"""LoRA-drop fine-tuning.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3.json [flags]
    torchrun --nproc_per_node 2 launch/train.py [flags]
    python launch/train.py [flags]

Run with --help for every flag.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, once per step and rank.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

from ds_loradrop.recipes.cli import parse_run_config, run_main
from ds_loradrop.recipes.train import run

if __name__ == "__main__":
    run_main(lambda: run(parse_run_config()))
