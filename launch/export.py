"""Export a finished run's adapter.

    python launch/export.py --run outputs/default --format peft|merged|loradrop [--output_dir DIR]

peft: a plain PEFT LoRA adapter (shared adapters copied into every layer that uses them; PEFT VeRA for
--method vera; not for tied_lora, which PEFT lacks); merged: the
base model with the adapters folded in; loradrop: the compact form with the plan.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_loradrop.recipes.cli import run_main
from ds_loradrop.recipes.export import FORMATS, export_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="Output directory of a finished launch/train.py run.")
    parser.add_argument("--format", required=True, choices=FORMATS, help="Export format.")
    parser.add_argument("--output_dir", default=None, help="Default: <run>/export-<format>.")
    args = parser.parse_args()
    output_dir = args.output_dir or os.path.join(args.run, f"export-{args.format}")
    print(f"exported to {export_run(args.run, args.format, output_dir)}")


if __name__ == "__main__":
    run_main(main)
