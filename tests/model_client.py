"""A user of a logged MLflow model, in a fresh process: loads each model URI and generates for the prompts
of a run's predictions file; prints one JSON object {uri: {"pyfunc": [...], "pipeline": [...]}}.

    python tests/model_client.py TRACKING_URI PREDICTIONS_JSONL URI [URI ...] [--pipeline]

``pyfunc``: ``mlflow.pyfunc.load_model(uri).predict(prompts)`` with the settings logged with the model.
``pipeline`` (with ``--pipeline``): ``mlflow.transformers.load_model(uri)`` is a plain transformers
``TextGenerationPipeline``; it is called with greedy settings and the same token budget, as a transformers
user would call it.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    import mlflow

    with_pipeline = "--pipeline" in argv
    tracking_uri, predictions, *uris = [arg for arg in argv if arg != "--pipeline"]
    mlflow.set_tracking_uri(tracking_uri)
    with open(predictions, encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle]
    out = {}
    for uri in uris:
        model = mlflow.pyfunc.load_model(uri)
        flavor = model.metadata.flavors["transformers"]
        out[uri] = {
            "pyfunc": [str(text) for text in model.predict(prompts)],
            "flavor": {key: str(value) for key, value in flavor.items()},
        }
        if with_pipeline:
            budget = model.metadata.flavors["python_function"]["config"]["max_new_tokens"]
            pipeline = mlflow.transformers.load_model(uri)
            outputs = pipeline(prompts, max_new_tokens=budget, do_sample=False, return_full_text=False)
            out[uri]["pipeline"] = [output[0]["generated_text"] for output in outputs]
            out[uri]["pipeline_type"] = type(pipeline).__name__
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
