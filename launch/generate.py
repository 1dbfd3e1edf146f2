"""Try a trained model: complete prompts or chat, streaming the answer.

    python launch/generate.py --run outputs/default --task e2e \
        --prompt "name[The Eagle], eatType[coffee shop], food[French]"
    python launch/generate.py --adapter outputs/default/adapter --prompt_file prompts.txt --output out.jsonl
    python launch/generate.py --peft outputs/default/export-peft --chat
    deepspeed --num_gpus 2 launch/generate.py --ds_config ds_configs/zero3.json --run outputs/default --chat

Greedy by default (--do_sample with --temperature / --top_p / --top_k). Run with --help for every flag.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, once per call and rank.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

from ds_loradrop.recipes.cli import parse_generate_config, run_main
from ds_loradrop.recipes.generate import generate

if __name__ == "__main__":
    run_main(lambda: generate(parse_generate_config()))
