"""``--method full``: full fine-tuning; every weight trains, no adapter is attached or saved."""

from __future__ import annotations

from ds_loradrop.config import RunConfig
from ds_loradrop.errors import UsageError
from ds_loradrop.method.registry import Method, Preparation, register


class FullFinetuning(Method):
    name = "full"
    summary = "full fine-tuning (every weight trains; the run saves a whole model, no adapter)"
    trains_adapters = False
    peft_expressible = False

    def attach(self, cfg: RunConfig, preparation: Preparation, output_dir: str):
        return None

    def rebuild(self, config: dict, need):
        raise UsageError("a full fine-tuning run saves a whole model, not adapters: load its full_model/")


register(FullFinetuning())
