"""Register the best run of an experiment: the finished run with a logged MLflow model that has the best
value of a chosen metric becomes a new version of a registered model (optionally under an alias)."""

from __future__ import annotations

from dataclasses import dataclass

from ds_loradrop.errors import UsageError

LOGGED_MODEL_TAG = "mlflow_model"  # set by ExperimentLog.model: the run's runs:/ model URI
LOGGED_MODEL_ID_TAG = "mlflow_model_id"  # and the logged model's id (models:/<id>)


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    run_id: str
    run_name: str
    metric: str
    value: float

    def describe(self) -> str:
        return (
            f"registered run {self.run_name} ({self.run_id}, {self.metric} {self.value:.4g}) as "
            f"models:/{self.name}/{self.version}"
        )


def best_run(runs, metric: str, lower_is_better: bool):
    """The run with the best ``metric`` among ``runs`` (MLflow ``Run`` objects) that logged a model; ties go
    to the earlier run. None if no run qualifies."""
    candidates = [run for run in runs if metric in run.data.metrics and LOGGED_MODEL_ID_TAG in run.data.tags]
    if not candidates:
        return None
    sign = 1.0 if lower_is_better else -1.0
    return min(candidates, key=lambda run: (sign * run.data.metrics[metric], run.info.start_time))


def register_best_run(
    experiment: str,
    tracking_uri: str | None,
    metric: str,
    name: str,
    lower_is_better: bool = False,
    alias: str | None = None,
) -> Registered:
    """Register the best finished run of ``experiment`` by ``metric`` as a version of ``name``."""
    import mlflow
    from mlflow import MlflowClient

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UsageError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    runs = client.search_runs(
        [found.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=10000
    )
    best = best_run(runs, metric, lower_is_better)
    if best is None:
        raise UsageError(
            f"no finished run of experiment {experiment!r} has both the metric {metric!r} and a logged "
            f"MLflow model (runs log one unless --mlflow_log_model false)"
        )
    mlflow.set_tracking_uri(tracking_uri)
    # by the logged model's id: MLflow 3 resolves runs:/<id>/model for loading but not for registering
    version = mlflow.register_model(f"models:/{best.data.tags[LOGGED_MODEL_ID_TAG]}", name)
    value = best.data.metrics[metric]
    client.set_model_version_tag(name, version.version, metric, str(value))
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return Registered(name, str(version.version), best.info.run_id, best.info.run_name, metric, value)
