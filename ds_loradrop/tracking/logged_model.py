"""A run's trained model as an MLflow model: transformers flavour, task ``text-generation``.

What is logged (``name="model"``, so ``runs:/<run id>/model`` loads it):
- a PEFT model: the adapter, the tokenizer (with its chat template where it has one) and a reference to the
  base model: its local directory (``base_model_path``; the weights are not copied) or, for a hub id, the hub
  repository and revision; or, for full fine-tuning, the whole saved checkpoint;
- a string-in, string-out signature, an input example (a prompt of the run's task) and the generation
  settings of the run's own evaluation (greedy, its ``max_new_tokens``, its stop tokens, the prompt not
  repeated in the output), so ``mlflow.pyfunc.load_model(uri).predict([prompt])`` gives what the run's
  evaluation generated for that prompt;
- pinned requirements (torch, transformers, peft, without a local build tag such as ``+cpu``).

``mlflow.models.Model.log`` is called rather than ``mlflow.transformers.log_model`` because the latter always
checks the input example by loading the logged model again and generating with it: for a 7B base model that
is a second copy of the weights on rank 0's host and minutes of CPU generation at the end of every run.
The tests load and predict in a fresh process instead (``tests/model_client.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

MODEL_NAME = "model"
REQUIREMENTS = ("torch", "transformers", "peft", "sentencepiece", "accelerate")


@dataclass(frozen=True)
class ModelToLog:
    """What to log.

    Args:
        components: ``{"model": ..., "tokenizer": ...}``: a PEFT model (only the adapter is saved) or a whole
            model (its weights are saved).
        base_model_path: the local base checkpoint a PEFT model refers to; None for a hub id or a whole model.
        torch_dtype: the dtype to load the model in (the run's).
        generation: the run's evaluation settings (max_new_tokens, eos_token_id, pad_token_id).
        input_example: one prompt of the run's task, or None.
        register_as: a registered model to add a version to, or None.
    """

    components: dict
    base_model_path: str | None
    torch_dtype: torch.dtype
    generation: dict
    input_example: str | None = None
    register_as: str | None = None


def pinned_requirements(names: tuple[str, ...] = REQUIREMENTS) -> list[str]:
    """``name==version`` for each installed package of ``names``, the local build tag dropped."""
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pinned


def log_transformers_model(tracking_uri: str, run_id: str, model: ModelToLog):
    """Log ``model`` into run ``run_id``; MLflow's ``ModelInfo`` (``registered_model_version`` set when
    registered)."""
    import mlflow
    import mlflow.transformers
    from mlflow.models import Model, ModelSignature
    from mlflow.transformers.peft import is_peft_model
    from mlflow.types import ColSpec, Schema

    mlflow.set_tracking_uri(tracking_uri)
    # The logged model belongs to the run's experiment (Model.log would put it in the active one, the
    # Default experiment here, where runs:/<run id>/model is not looked up).
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    peft = is_peft_model(model.components["model"])
    return Model.log(
        artifact_path=None,
        name=MODEL_NAME,
        flavor=mlflow.transformers,
        run_id=run_id,
        registered_model_name=model.register_as,
        transformers_model=model.components,
        task="text-generation",
        torch_dtype=model.torch_dtype,
        base_model_path=model.base_model_path,
        signature=ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")])),
        input_example=[model.input_example] if model.input_example else None,
        model_config={**model.generation, "do_sample": False, "return_full_text": False},
        pip_requirements=pinned_requirements(
            REQUIREMENTS if peft else tuple(n for n in REQUIREMENTS if n != "peft")
        ),
        validate_serving_input=False,
    )
