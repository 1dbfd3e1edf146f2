"""MLflow tracking from the global rank 0 only; a tracking failure never stops training.

- Where: ``--mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own default store
  (``mlflow.db`` in the working directory, which ``mlflow ui`` started there also reads).
- Every other rank gets a :class:`NullTracker`: one run per job, never one per rank or node.
- The first error talking to MLflow is reported once; the tracker then either goes silent or, with
  ``--mlflow_fallback_local``, re-creates the run in a local store under the output directory.
- The run ends FINISHED, FAILED (training raised) or KILLED (SIGTERM / SIGINT).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping

from ds_loradrop.training.distributed import get_logger, is_rank_zero

logger = get_logger()

# An unreachable server must not stall training for minutes of HTTP retries (MLflow defaults: 7
# retries with back-off, 120 s timeout). The user's own settings win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_PARAM_LENGTH = 6000


def flatten(values: Mapping, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(directory: str) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", directory, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


class NullTracker:
    """What every rank but the global rank 0 gets."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping) -> None:
        pass

    def set_tags(self, tags: Mapping) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, dataset, context: str, tags: Mapping[str, str]) -> None:
        pass

    def start_system_metrics(self, resumed: bool) -> None:
        pass

    def log_model(self, model) -> object | None:
        """Log the run's trained model (:class:`~ds_loradrop.tracking.logged_model.ModelToLog`); MLflow's
        ``ModelInfo``, or None when not logged."""
        del model

    def end(self, status: str) -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run, fault-tolerant.

    Args:
        tracking_uri: MLflow tracking URI, or None for ``MLFLOW_TRACKING_URI`` / MLflow's default.
        experiment: experiment name.
        run_name: run name (MLflow picks one if None).
        fallback_dir: if set, a tracking failure moves the run to a local store in this directory.
        run_id: continue this run instead of starting one.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_name: str | None,
        fallback_dir: str | None = None,
        run_id: str | None = None,
    ):
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self._experiment, self._run_name, self._fallback_dir = experiment, run_name, fallback_dir
        self._client = None
        self._failed = False
        self._replay: list[tuple[str, tuple, dict]] = []  # what to re-send after a fallback
        self._system_metrics = None
        self.run_id = run_id
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self._guard(self._start)

    def _start(self) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = self.tracking_uri or mlflow.get_tracking_uri()
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is None:
            experiment = self._client.get_experiment_by_name(self._experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self._client.create_experiment(self._experiment)
            )
            run = self._client.create_run(experiment_id, run_name=self._run_name)
            self.run_id = run.info.run_id
        else:
            self._client.update_run(self.run_id, status="RUNNING")  # a resumed job continues its run
        logger.info(f"MLflow run {self.run_id} in experiment {self._experiment!r} at {self.tracking_uri}")

    def _guard(self, action, *args, **kwargs) -> None:
        if self._failed:
            return
        try:
            action(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any tracking error must leave training running
            self._on_failure(error)

    def _on_failure(self, error: Exception) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        if self._fallback_dir is None:
            self._failed = True
            logger.warning(
                f"MLflow tracking at {self.tracking_uri} failed ({reason}); training goes on without tracking"
            )
            return
        logger.warning(
            f"MLflow tracking at {self.tracking_uri} failed ({reason}); falling back to the local "
            f"store {self._fallback_uri()}"
        )
        sampling = self._system_metrics is not None
        self._stop_system_metrics()  # it wrote to the failed store's run
        self.tracking_uri, self.run_id = self._fallback_uri(), None
        replay, self._replay, self._fallback_dir = self._replay, [], None
        self._guard(self._start)
        for method, args, kwargs in replay:
            self._guard(getattr(self, method), *args, **kwargs)
        if sampling:
            self.start_system_metrics(resumed=False)

    def _fallback_uri(self) -> str:
        return f"sqlite:///{os.path.abspath(os.path.join(self._fallback_dir or '.', 'mlflow.db'))}"

    def _record(self, method: str, *args, **kwargs) -> None:
        if self._fallback_dir is not None and not self._failed:
            self._replay.append((method, args, kwargs))

    def log_params(self, params: Mapping) -> None:
        self._record("log_params", params)

        def send():
            from mlflow.entities import Param

            items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
            for start in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[start : start + 100])

        self._guard(send)

    def set_tags(self, tags: Mapping) -> None:
        self._record("set_tags", tags)

        def send():
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

        self._guard(send)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._record("log_metrics", metrics, step)

        def send():
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
            self._client.log_batch(self.run_id, metrics=items)

        self._guard(send)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._record("log_artifact", path, artifact_path)
        if not os.path.exists(path):
            logger.warning(f"MLflow artifact {path} no longer exists; not logged")
            return
        if os.path.isdir(path):
            self._guard(lambda: self._client.log_artifacts(self.run_id, path, artifact_path))
        else:
            self._guard(lambda: self._client.log_artifact(self.run_id, path, artifact_path))

    def log_dataset(self, dataset, context: str, tags: Mapping[str, str]) -> None:
        """An ``mlflow.data`` dataset as an input of the run (``context``: training, evaluation, ...)."""
        self._record("log_dataset", dataset, context, tags)

        def send():
            from mlflow.entities import DatasetInput, InputTag

            input_tags = [InputTag("mlflow.data.context", context)]
            input_tags += [InputTag(key, str(value)) for key, value in tags.items()]
            # what mlflow.log_input sends, for this client's run rather than the fluent API's active one
            self._client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(), input_tags)])

        self._guard(send)

    def start_system_metrics(self, resumed: bool) -> None:
        """MLflow's sampler of this node's CPU, memory, disk, network (and GPU) into the run, in a thread.
        Best effort: a sampler that cannot start is one warning, and tracking goes on."""
        if self._failed or self.run_id is None:
            return
        try:
            import inspect

            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "10"))
            options = {"sampling_interval": interval, "resume_logging": resumed}
            if "tracking_uri" in inspect.signature(SystemMetricsMonitor).parameters:  # MLflow >= 3
                options["tracking_uri"] = self.tracking_uri
            self._system_metrics = SystemMetricsMonitor(self.run_id, **options)
            self._system_metrics.start()
        except Exception as error:  # noqa: BLE001 - system metrics are optional
            self._system_metrics = None
            logger.warning(f"MLflow system metrics not logged ({type(error).__name__}: {error})")

    def _stop_system_metrics(self) -> None:
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as error:  # noqa: BLE001 - system metrics are optional
                logger.warning(
                    f"MLflow system metrics did not stop cleanly ({type(error).__name__}: {error})"
                )

    def log_model(self, model):
        """Best effort: a model that cannot be logged is one warning; tracking goes on (the model is
        not part of a fallback's replay)."""
        if self._failed or self.run_id is None:
            return None
        from ds_loradrop.tracking.logged_model import log_transformers_model

        try:
            return log_transformers_model(self.tracking_uri, self.run_id, model)
        except Exception as error:  # noqa: BLE001 - the model is optional, the run's metrics are not
            reason = str(error).splitlines()[0][:300] if str(error) else ""
            logger.warning(f"the MLflow model was not logged ({type(error).__name__}: {reason})")
            return None

    def end(self, status: str) -> None:
        self._stop_system_metrics()
        self._guard(lambda: self._client.set_terminated(self.run_id, status=status))


def create_tracker(
    *,
    enabled: bool,
    tracking_uri: str | None,
    experiment: str,
    run_name: str | None,
    fallback_dir: str | None,
    run_id: str | None = None,
) -> NullTracker:
    """An MlflowTracker on the global rank 0 when enabled, a NullTracker everywhere else."""
    if not enabled or not is_rank_zero():
        return NullTracker()
    return MlflowTracker(tracking_uri, experiment, run_name, fallback_dir, run_id)
