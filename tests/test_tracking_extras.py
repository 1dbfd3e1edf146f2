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


def test_requirements_are_pinned_without_the_local_build_tag(monkeypatch):
    from ds_loradrop.tracking import logged_model

    installed = {"torch": "2.13.0+cpu", "transformers": "5.25.0"}

    def version(name):
        if name not in installed:
            raise logged_model.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(logged_model, "version", version)
    assert logged_model.pinned_requirements(("torch", "transformers", "peft")) == [
        "torch==2.13.0",
        "transformers==5.25.0",
    ]


def test_a_model_that_cannot_be_logged_is_one_warning_and_the_run_stays_tracked(tracker, caplog):
    """A broken model (here: not a model at all) costs the model, not the run's tracking."""
    import torch

    from ds_loradrop.tracking.logged_model import ModelToLog

    broken = ModelToLog(
        {"model": object(), "tokenizer": object()}, None, torch.float32, {"max_new_tokens": 4}
    )
    with caplog.at_level(logging.WARNING, logger="ds_loradrop"):
        assert tracker.log_model(broken) is None
    assert "the MLflow model was not logged (" in caplog.text
    tracker.log_metrics({"loss": 2.5}, step=1)
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.metrics["loss"] == 2.5


def test_the_best_run_is_the_best_metric_among_runs_with_a_logged_model():
    from types import SimpleNamespace

    from ds_loradrop.tracking.model_registry import best_run

    def run(name, bleu, start, logged=True):
        tags = {"mlflow_model_id": f"m-{name}"} if logged else {}
        data = SimpleNamespace(metrics={} if bleu is None else {"eval/bleu": bleu}, tags=tags)
        return SimpleNamespace(data=data, info=SimpleNamespace(run_name=name, start_time=start))

    runs = [run("a", 50.0, 1), run("b", 60.0, 2, logged=False), run("c", 55.0, 3), run("d", None, 4)]
    assert best_run(runs, "eval/bleu", lower_is_better=False).info.run_name == "c"
    assert best_run(runs, "eval/bleu", lower_is_better=True).info.run_name == "a"
    assert (
        best_run([run("e", 55.0, 5), *runs], "eval/bleu", lower_is_better=False).info.run_name == "c"
    )  # tie
    assert best_run(runs, "eval/rouge_l", lower_is_better=False) is None
