"""Run a training job that restarts itself from its newest complete checkpoint after losing a rank.

    python launch/restart.py --max_restarts 3 -- deepspeed --num_gpus 8 launch/train.py --config ...
    python launch/restart.py --max_restarts 3 -- launch/node_launch.sh --config ...   # each node (Slurm)

``--resume auto`` is added to the command. Success (0), a usage error (2) and a diverged loss (3) end the
job at once; any other failure restarts it, up to --max_restarts times. See ds_loradrop/recipes/restart.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_loradrop.errors import USAGE_EXIT_STATUS, UsageError
from ds_loradrop.recipes.restart import RestartPolicy, supervise

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_restarts", type=int, default=3, help="Restarts after failures (default 3).")
    parser.add_argument(
        "--restart_delay", type=float, default=5.0, help="Seconds between a failure and the restart."
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the launch command.")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        status = supervise(command, RestartPolicy(args.max_restarts, args.restart_delay))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT_STATUS)
    sys.exit(status)
