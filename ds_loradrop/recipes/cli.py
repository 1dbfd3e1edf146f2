"""Command line of the entry points: dataclass fields become flags (transformers.HfArgumentParser)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from transformers import HfArgumentParser

from ds_loradrop.config import CONFIG_SECTIONS, EvalConfig, RunConfig
from ds_loradrop.errors import Terminated, TrainingDiverged, UsageError


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    """Parse flags into a RunConfig; accepts (and ignores) the ``--local_rank`` DeepSpeed appends."""
    parser = HfArgumentParser(CONFIG_SECTIONS, description="LoRA-drop fine-tuning on DeepSpeed.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher; unused.")
    *sections, _launcher_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    names = [section.name for section in dataclasses.fields(RunConfig)]  # in CONFIG_SECTIONS' order
    return RunConfig(**dict(zip(names, sections)))


def parse_eval_config(argv: list[str] | None = None):
    """(OfflineEvalConfig, EvalConfig) for launch/evaluate.py."""
    from ds_loradrop.recipes.evaluate import OfflineEvalConfig

    parser = HfArgumentParser((OfflineEvalConfig, EvalConfig), description="Evaluate by generation.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher; unused.")
    offline, evaluation, _launcher_args = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    return offline, evaluation


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; a UsageError becomes one ``error: ...`` line on stderr and exit status 2, a diverged
    loss one line and status 3, SIGTERM / SIGINT status 128 + the signal."""
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    except Terminated as stop:
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signal_number)
