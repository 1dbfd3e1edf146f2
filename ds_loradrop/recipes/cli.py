"""Command line of the entry points: dataclass fields become flags (transformers.HfArgumentParser),
``--config FILE`` (YAML or JSON, sectioned like RunConfig) supplies their defaults."""

from __future__ import annotations

import dataclasses
import sys
import traceback
from collections.abc import Callable

from transformers import HfArgumentParser

from ds_loradrop.config import CONFIG_SECTIONS, EvalConfig, RunConfig
from ds_loradrop.config.files import flag_defaults, read_config_file
from ds_loradrop.errors import (
    DIVERGED_EXIT_STATUS,
    FAILURE_EXIT_STATUS,
    STORAGE_EXIT_STATUS,
    USAGE_EXIT_STATUS,
    StorageFull,
    Terminated,
    TrainingDiverged,
    UsageError,
)
from ds_loradrop.method.registry import registered_methods, with_method_settings
from ds_loradrop.training.distributed import exit_process


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    """Parse ``--config FILE`` and flags (flags win) into a RunConfig; accepts (and ignores) the
    ``--local_rank`` DeepSpeed appends."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # No abbreviated flags: "--conf x.yaml" must not slip past config_file_of.
    parser = HfArgumentParser(
        CONFIG_SECTIONS, description="LoRA-drop fine-tuning on DeepSpeed.", allow_abbrev=False
    )
    parser.add_argument(
        "--config",
        default=None,
        help="A YAML or JSON file sectioned like the settings (model:, data:, finetuning:, lora:, drop:, "
        "train:, eval:, tracking:), e.g. recipes/e2e_loradrop.yaml or a finished run's run_config.json; "
        "flags override it.",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher; unused.")
    offer_registered_methods(parser)
    config_file = config_file_of(argv)
    if config_file is not None:
        names = {field.name: field.default_factory for field in dataclasses.fields(RunConfig)}
        parser.set_defaults(**flag_defaults(read_config_file(config_file), names, config_file))
    *sections, _launcher_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        raise UsageError(f"unknown argument(s) {unknown}; see --help")
    names = [section.name for section in dataclasses.fields(RunConfig)]  # in CONFIG_SECTIONS' order
    return with_method_settings(RunConfig(**dict(zip(names, sections))))


def offer_registered_methods(parser: HfArgumentParser) -> None:
    """``--method`` takes the registered methods, each listed in ``--help`` with its summary."""
    methods = registered_methods()
    action = next(action for action in parser._actions if "--method" in action.option_strings)
    action.choices = list(methods)
    listed = "; ".join(f"{name}: {method.summary}" for name, method in methods.items())
    action.help = f"{action.help} {listed}".replace("%", "%%")


def config_file_of(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config F`` or ``--config=F``), if any."""
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UsageError("--config needs a file name")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_eval_config(argv: list[str] | None = None):
    """(OfflineEvalConfig, EvalConfig) for launch/evaluate.py."""
    from ds_loradrop.recipes.evaluate import OfflineEvalConfig

    parser = HfArgumentParser((OfflineEvalConfig, EvalConfig), description="Evaluate by generation.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher; unused.")
    offline, evaluation, _launcher_args = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    return offline, evaluation


def parse_generate_config(argv: list[str] | None = None):
    """GenerateConfig for launch/generate.py."""
    from ds_loradrop.recipes.generate import GenerateConfig

    parser = HfArgumentParser(GenerateConfig, description="Complete prompts or chat with a trained model.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher; unused.")
    config, _launcher_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return config


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; a UsageError becomes one ``error: ...`` line on stderr and exit status 2, a diverged
    loss one line and status 3, a checkpoint that does not fit one line and status 4, SIGTERM / SIGINT
    status 128 + the signal, any other exception its traceback and status 1 (also after a failed
    collective, when the process group is still alive)."""
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        exit_process(USAGE_EXIT_STATUS)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        exit_process(DIVERGED_EXIT_STATUS)
    except StorageFull as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        exit_process(STORAGE_EXIT_STATUS)
    except Terminated as stop:
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        exit_process(128 + stop.signal_number)
    except Exception:  # noqa: BLE001 - the entry point's last handler: its traceback, then status 1
        traceback.print_exc()
        exit_process(FAILURE_EXIT_STATUS)
