"""The optional parts of tracking (system metrics, dataset inputs) never switch tracking off: a failure in
them is one warning and the run goes on being tracked."""

from __future__ import annotations

import logging

import pytest
from mlflow import MlflowClient

from ds_loradrop.tracking.mlflow_tracker import MlflowTracker

pytestmark = pytest.mark.unit


@pytest.fixture
def tracker(tmp_path):
    made = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "extras", "run", fallback_dir=None)
    yield made
    made.end("FINISHED")


def test_a_system_metrics_sampler_that_cannot_start_is_one_warning(tracker, monkeypatch, caplog):
    import mlflow.system_metrics.system_metrics_monitor as monitor

    class Broken:
        def __init__(self, *args, **kwargs):
            raise TypeError("unexpected keyword argument 'tracking_uri'")

    monkeypatch.setattr(monitor, "SystemMetricsMonitor", Broken)
    with caplog.at_level(logging.WARNING, logger="ds_loradrop"):
        tracker.start_system_metrics(resumed=False)
    assert "MLflow system metrics not logged (TypeError: unexpected keyword" in caplog.text
    tracker.log_metrics({"loss": 1.5}, step=1)
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(tracker.run_id).data.metrics["loss"] == 1.5  # still tracked


def test_system_metrics_are_sampled_into_the_run(tracker, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker.start_system_metrics(resumed=False)
    time.sleep(1.5)
    tracker.end("FINISHED")
    metrics = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    assert (
        "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    )
