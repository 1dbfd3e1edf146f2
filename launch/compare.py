"""Compare the runs of an MLflow experiment.

    python launch/compare.py --experiment ds-loradrop [--output_dir comparison] [--tracking_uri URI]

Writes comparison.md, comparison.csv, metric_vs_parameters.png and importance_profiles.png, and prints
the table. The tracking URI defaults to $MLFLOW_TRACKING_URI, else MLflow's default local store.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_loradrop.recipes.cli import run_main
from ds_loradrop.tracking.compare import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="ds-loradrop", help="MLflow experiment name.")
    parser.add_argument("--output_dir", default="comparison", help="Where the table and plots go.")
    parser.add_argument("--tracking_uri", default=None, help="MLflow tracking URI.")
    args = parser.parse_args()
    print(compare(args.experiment, args.tracking_uri, args.output_dir), end="")


if __name__ == "__main__":
    run_main(main)
