"""Export a finished run's adapter as a plain PEFT adapter, a merged checkpoint, or the compact form.

- ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` that plain ``PeftModel.from_pretrained``
  loads: every layer that uses a shared adapter carries its own copy of it; layers without an adapter
  (``--low_importance drop``) are left out of ``target_modules`` (exact module names). A pruned LoRA
  (``sparse_lora``) is a LoRA with zeros; VeRA is PEFT's VeRA (the shared pair saved with it). PEFT has no
  Tied-LoRA: that method exports as ``merged`` or ``loradrop``.
- ``merged``: the base model with each adapted projection's update folded in (``W + (alpha/r) B A`` for
  LoRA), saved as a normal Hugging Face checkpoint (safetensors) with the tokenizer.
- ``loradrop``: the compact form as trained (own adapters, each shared adapter once, the plan).

Only safetensors are read and written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from ds_loradrop.errors import UsageError
from ds_loradrop.method.adapter_files import attach_saved_adapters, read_adapter_config, saved_method
from ds_loradrop.method.lora import LoRALinear
from ds_loradrop.method.placement import cast_adapters, merged_weight
from ds_loradrop.method.registry import Method
from ds_loradrop.models.loading import load_causal_lm, load_tokenizer
from ds_loradrop.run_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, FINAL_ADAPTER_DIR, PLAN_NAME

FORMATS = ("peft", "merged", "loradrop")


def run_adapter_dir(run_dir: str) -> str:
    directory = os.path.join(run_dir, FINAL_ADAPTER_DIR)
    if not os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS_NAME)):
        raise UsageError(
            f"run {run_dir!r} has no final adapter ({directory}/{ADAPTER_WEIGHTS_NAME}); was it finished?"
        )
    return directory


def load_adapted_model(adapter_dir: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(base model with the saved adapters attached, adapter config), on the CPU, unpartitioned; the
    adapters in the base model's ``dtype``, as in training."""
    config = read_adapter_config(adapter_dir)
    model = load_causal_lm(config["base_model"], dtype, trust_remote_code)
    attach_saved_adapters(model, adapter_dir)
    cast_adapters(model, dtype)
    return model.eval(), config


def _module_names(model) -> dict[tuple[str, int], str]:
    return {(m.target, m.layer): name for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def check_format(fmt: str, method: Method) -> None:
    if fmt == "peft" and not method.peft_expressible:
        raise UsageError(
            f"--format peft cannot express a {method.name} adapter (PEFT has no such method); the formats "
            f"that work for it are merged and loradrop"
        )


def export_peft(adapter_dir: str, output_dir: str, dtype: torch.dtype = torch.float32):
    """Write the PEFT adapter; returns the model it was read from (base model with the adapters attached)."""
    model, config = load_adapted_model(adapter_dir, dtype)
    method = saved_method(config, adapter_dir)
    check_format("peft", method)
    modules = [name for name in sorted(_module_names(model).values()) if model.get_submodule(name).adapter]
    state, peft_config = method.peft_export(model, config, modules)
    os.makedirs(output_dir, exist_ok=True)
    peft_config.save_pretrained(output_dir)
    save_file(state, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return model


def load_peft_model(adapter_dir: str, export_dir: str, dtype: torch.dtype = torch.float32):
    """The run's adapter exported to ``export_dir`` and loaded back with ``PeftModel.from_pretrained`` over
    the base model (read once), as a user of the export would load it."""
    from peft import PeftModel

    model = export_peft(adapter_dir, export_dir, dtype)
    _remove_wrappers(model)
    return PeftModel.from_pretrained(model, export_dir).eval()


def _remove_wrappers(model) -> None:
    """Put each adapted projection's base layer back in place of its wrapper."""
    for name in _module_names(model).values():
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, model.get_submodule(name).base)


def export_merged(adapter_dir: str, output_dir: str) -> None:
    model, config = load_adapted_model(adapter_dir)
    with torch.no_grad():
        for name in _module_names(model).values():
            wrapper = model.get_submodule(name)
            wrapper.base.weight.copy_(merged_weight(wrapper))
    _remove_wrappers(model)
    model.config.use_cache = True
    model.save_pretrained(output_dir, safe_serialization=True)
    load_tokenizer(config["base_model"]).save_pretrained(output_dir)


def export_loradrop(adapter_dir: str, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, PLAN_NAME):
        if os.path.isfile(os.path.join(adapter_dir, name)):
            shutil.copy2(os.path.join(adapter_dir, name), os.path.join(output_dir, name))


def export_run(run_dir: str, fmt: str, output_dir: str) -> str:
    """Export the run's final adapter in ``fmt`` to ``output_dir`` (which must not hold files yet)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    adapter_dir = run_adapter_dir(run_dir)
    check_format(fmt, saved_method(read_adapter_config(adapter_dir), adapter_dir))
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise UsageError(f"export directory {output_dir!r} is not empty")
    # Written beside the target and renamed into place: a failed export leaves nothing half-written.
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".exporting-", dir=parent)
    try:
        {"peft": export_peft, "merged": export_merged, "loradrop": export_loradrop}[fmt](adapter_dir, staging)
        with open(os.path.join(staging, "export.json"), "w") as handle:
            json.dump({"run": os.path.abspath(run_dir), "format": fmt}, handle, indent=2)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty, checked above
        os.rename(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
