"""Compare the runs of an MLflow experiment, or register its best run.

    python launch/compare.py --experiment ds-loradrop [--output_dir comparison] [--tracking_uri URI]
    python launch/compare.py --experiment ds-loradrop --register_best NAME [--metric eval/bleu]
        [--lower_is_better] [--alias champion]

The first writes comparison.md, comparison.csv, metric_vs_parameters.png and importance_profiles.png, and
prints the table. The second registers the logged MLflow model of the finished run with the best metric as
a new version of the registered model NAME (and points the alias at it). The tracking URI defaults to
$MLFLOW_TRACKING_URI, else MLflow's default local store.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_loradrop.recipes.cli import run_main
from ds_loradrop.tracking.compare import compare
from ds_loradrop.tracking.model_registry import register_best_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="ds-loradrop", help="MLflow experiment name.")
    parser.add_argument("--output_dir", default="comparison", help="Where the table and plots go.")
    parser.add_argument("--tracking_uri", default=None, help="MLflow tracking URI.")
    parser.add_argument(
        "--register_best", default=None, metavar="NAME", help="Register the best run's model as NAME."
    )
    parser.add_argument("--metric", default="eval/bleu", help="The metric --register_best ranks runs by.")
    parser.add_argument("--lower_is_better", action="store_true", help="Rank by the lowest --metric.")
    parser.add_argument("--alias", default=None, help="Point this alias of NAME at the registered version.")
    args = parser.parse_args()
    if args.register_best is None:
        if args.alias is not None or args.lower_is_better:
            parser.error("--alias and --lower_is_better go with --register_best")
        print(compare(args.experiment, args.tracking_uri, args.output_dir), end="")
        return
    registered = register_best_run(
        args.experiment, args.tracking_uri, args.metric, args.register_best, args.lower_is_better, args.alias
    )
    print(registered.describe() + (f" (alias {args.alias!r})" if args.alias else ""))


if __name__ == "__main__":
    run_main(main)
