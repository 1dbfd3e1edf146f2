"""The end of a run: its trained model logged (and registered) as an MLflow model, on the global rank 0.

A method with a PEFT form is logged as its PEFT export over a reference to the base model (the base model
is read once on rank 0, in the run's dtype); full fine-tuning as its saved checkpoint; a method PEFT does
not have (Tied-LoRA) is named in one warning and a run tag, its adapter still in the run's artifacts.
"""

from __future__ import annotations

import gc
import os
import tempfile

from transformers.integrations import is_deepspeed_zero3_enabled

from ds_loradrop.data import chat
from ds_loradrop.eval.generation import stop_token_ids
from ds_loradrop.models.loading import load_causal_lm
from ds_loradrop.recipes.export import load_peft_model
from ds_loradrop.recipes.setup import RunContext
from ds_loradrop.run_files import FINAL_ADAPTER_DIR, FULL_MODEL_DIR
from ds_loradrop.tracking.logged_model import ModelToLog


def input_example(ctx: RunContext) -> str | None:
    """The run's first evaluation prompt as the model sees it (a chat input rendered with the template)."""
    if not ctx.eval_examples:
        return None
    example = ctx.eval_examples[0]
    if example.messages is not None:
        return chat.render_generation_prompt(ctx.tokenizer, example.messages)
    return example.prompt


def generation_settings(ctx: RunContext, model) -> dict:
    """The settings of the run's own evaluation: greedy, its token budget, its stop and pad tokens."""
    return {
        "max_new_tokens": ctx.cfg.eval.max_new_tokens or ctx.task.max_new_tokens,
        "eos_token_id": stop_token_ids(model, ctx.tokenizer),
        "pad_token_id": ctx.tokenizer.pad_token_id,
        "num_beams": ctx.cfg.eval.num_beams,
    }


def log_run_model(ctx: RunContext) -> bool:
    """Log the finished run's model when the run tracks and ``--mlflow_log_model`` is on; whether one was
    logged. Called on the global rank 0 only. Best effort, like all tracking: a model that cannot be built
    or logged is one warning, and the run still ends FINISHED with its files written."""
    if not (ctx.cfg.tracking.mlflow_log_model and ctx.log.tracks):
        return False
    try:
        return _log_run_model(ctx)
    except Exception as error:  # noqa: BLE001 - the trained run is done and saved; only the model is lost
        reason = str(error).splitlines()[0][:300] if str(error) else ""
        ctx.log.no_model(f"it could not be built ({type(error).__name__}: {reason})")
        return False


def _log_run_model(ctx: RunContext) -> bool:
    # The model is read on rank 0 alone: a ZeRO-3 loading context still alive would partition the read
    # with collectives the other ranks never join. The final stage's is dropped with its model; make sure.
    gc.collect()
    if is_deepspeed_zero3_enabled():
        raise RuntimeError("a ZeRO-3 loading context is still alive; the model cannot be read on one rank")
    tracking = ctx.cfg.tracking
    form = ctx.method.logged_model_form()
    if form is None:
        ctx.log.no_model(
            f"--method {ctx.method.name} has no PEFT form for MLflow's transformers flavour; its adapter is "
            f"the run's artifact {FINAL_ADAPTER_DIR}/ (launch/export.py --format merged makes a checkpoint)"
        )
        return False
    with tempfile.TemporaryDirectory(prefix=".mlflow-model-", dir=ctx.output_dir) as export_dir:
        if form == "checkpoint":
            # the saved checkpoint read back (MLflow 3.17 cannot log a checkpoint directory by path under
            # transformers 5: its pipeline lookup expects a class where transformers now gives a name)
            trained = load_causal_lm(os.path.join(ctx.output_dir, FULL_MODEL_DIR), ctx.dtype).eval()
            base_model_path = None
        else:
            adapter_dir = os.path.join(ctx.output_dir, FINAL_ADAPTER_DIR)
            trained = load_peft_model(adapter_dir, export_dir, ctx.dtype)
            base_model_path = ctx.model_path if os.path.isdir(ctx.model_path) else None  # else the hub's
        model = ModelToLog(
            components={"model": trained, "tokenizer": ctx.tokenizer},
            base_model_path=base_model_path,
            torch_dtype=ctx.dtype,
            generation=generation_settings(ctx, trained),
            input_example=input_example(ctx),
            register_as=tracking.mlflow_register_model,
        )
        return ctx.log.model(model) is not None
