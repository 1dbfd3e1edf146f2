"""``--save_best_by``: keep the final stage's best adapter by a metric measured at every evaluation
(the validation loss, lower is better; a generation metric, higher is better) in ``best_adapter/``, with
``best.json`` saying which metric, its value and the step. A resumed run continues from the recorded best."""

from __future__ import annotations

import json
import os
import shutil

from ds_loradrop.method.adapter_files import save_adapters
from ds_loradrop.run_files import BEST_ADAPTER_DIR, BEST_RECORD
from ds_loradrop.training.distributed import barrier, get_logger, is_rank_zero

logger = get_logger()

LOWER_IS_BETTER = ("val_loss",)


class BestAdapter:
    def __init__(self, metric: str, output_dir: str, layout, save_settings: dict):
        self.metric = metric
        self.directory = os.path.join(output_dir, BEST_ADAPTER_DIR)
        self.layout = layout
        self.save_settings = save_settings  # settings, base_model, plan of save_adapters
        self.best = read_best(self.directory)

    def is_better(self, value: float) -> bool:
        if self.best is None or self.best["metric"] != self.metric:
            return True
        if self.metric in LOWER_IS_BETTER:
            return value < self.best["value"]
        return value > self.best["value"]

    def consider(self, step: int, metrics: dict) -> None:
        """Save the adapter if ``metrics`` (equal on every rank) beat the best so far. Every rank calls."""
        value = metrics.get(self.metric)
        if value is None or not self.is_better(value):
            return
        # written beside, then swapped in: a kill never leaves weights and best.json that disagree
        staging, retired = self.directory + ".saving", self.directory + ".old"
        save_adapters(self.layout, staging, **self.save_settings)
        self.best = {"metric": self.metric, "value": value, "step": step}
        if is_rank_zero():
            with open(os.path.join(staging, BEST_RECORD), "w") as handle:
                json.dump(self.best, handle, indent=2)
            if os.path.isdir(self.directory):
                os.rename(self.directory, retired)
            os.rename(staging, self.directory)
            shutil.rmtree(retired, ignore_errors=True)
        barrier()
        logger.info(f"best adapter so far by {self.metric} ({value:.4f} at step {step}): {self.directory}")


def read_best(directory: str) -> dict | None:
    path = os.path.join(directory, BEST_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)
