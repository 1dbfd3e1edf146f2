"""What a run tells MLflow, in LoRA-drop terms: configuration, per-stage curves, the plan, evaluations,
parameter counts, plots and files. Rank-agnostic: off rank 0 the tracker is a no-op.

Metric names (the step is the optimizer step of that stage unless noted):
``stage1/loss``, ``stage1/learning_rate``, ``stage1/grad_norm``, ``stage1/target_tokens_per_second`` and
the same under ``stage2/`` (``train/`` for ``--method lora|full``); ``importance/<target>`` and
``normalized_importance/<target>`` with the *layer index* as step; ``retained_layers/<target>``;
``num_layers/<target>``; ``trainable_parameters``, ``lora_parameters``, ``trainable_share_of_lora``;
``eval/<metric>`` (step = the final stage's step of the evaluation); ``base_eval/<metric>`` (the model
before training, same inputs);
``memory/peak_bytes_rank<r>`` and ``memory/peak_gib_max`` (peak RSS on CPU, ``max_memory_allocated`` on
GPU; which one is the tag ``memory/peak_kind``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from ds_loradrop.config import RunConfig
from ds_loradrop.method.plan import Plan
from ds_loradrop.run_files import (
    BASE_EVAL_DIR,
    DS_CONFIG_NAME,
    EVAL_DIR,
    FINAL_ADAPTER_DIR,
    FULL_MODEL_DIR,
    METRICS_NAME,
    PLAN_NAME,
    PLOTS_DIR,
    PREDICTIONS_NAME,
    PREDICTIONS_SAMPLE_NAME,
    RUN_CONFIG_NAME,
    SUMMARY_NAME,
    TRACKING_RECORD,
)
from ds_loradrop.tracking.logged_model import MODEL_NAME, ModelToLog
from ds_loradrop.tracking.mlflow_tracker import NullTracker, create_tracker, flatten, git_commit
from ds_loradrop.tracking.model_registry import LOGGED_MODEL_ID_TAG, LOGGED_MODEL_TAG
from ds_loradrop.training.distributed import get_logger, is_rank_zero

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = get_logger()
PREDICTION_SAMPLE_LINES = 50


def describe(summary, cfg: RunConfig) -> str:
    """One paragraph for the MLflow UI's description: method, kept layers, parameters, metric vs base."""
    parts = [f"{summary.method} on {cfg.data.task} with {cfg.model.model}"]
    if summary.retained and summary.num_layers:
        kept = ", ".join(f"{t} {len(r)}/{summary.num_layers[t]}" for t, r in summary.retained.items())
        parts.append(f"layers with their own adapter: {kept}")
    counted = f"{summary.trainable_parameters:,} trainable parameters"
    if summary.lora_parameters:
        share = 100 * summary.trainable_parameters / summary.lora_parameters
        counted += f" ({share:.1f}% of LoRA's {summary.lora_parameters:,})"
    parts.append(counted)
    scores = []
    for name in cfg.data.build_task().metrics:
        value = summary.eval_metrics.get(name)
        if not isinstance(value, (int, float)):
            continue
        base = summary.base_eval_metrics.get(name)
        scores.append(f"{name} {value:.2f}" + (f" (base model {base:.2f})" if base is not None else ""))
    if scores:
        count = summary.eval_metrics.get("num_examples")
        parts.append("; ".join(scores) + (f" on {count} inputs" if count else ""))
    return ". ".join(parts) + "."


class ExperimentLog:
    def __init__(self, tracker: NullTracker, config: RunConfig | None = None, resumed: bool = False):
        self.tracker = tracker
        self.config = config
        self.resumed = resumed
        self.curves: dict[str, list[tuple[int, float]]] = {}

    @classmethod
    def start(
        cls,
        cfg: RunConfig,
        ds_config: dict,
        *,
        world_size: int,
        num_nodes: int,
        model_path: str,
        resume: bool = False,
        restarts: int = 0,
    ) -> ExperimentLog:
        """Start (or, when resuming, continue) the run's MLflow run and log its configuration; ``restarts``:
        how many times a self-restarting job has started again (tag and metric ``restarts``)."""
        tracking = cfg.tracking
        record = os.path.join(cfg.train.output_dir, TRACKING_RECORD)
        previous = None
        if resume and is_rank_zero() and os.path.isfile(record):
            with open(record) as handle:
                previous = json.load(handle)
        tracker = create_tracker(
            enabled=tracking.report_to == "mlflow",
            tracking_uri=(previous or {}).get("tracking_uri") or tracking.mlflow_tracking_uri,
            experiment=tracking.mlflow_experiment,
            run_name=tracking.run_name,
            fallback_dir=cfg.train.output_dir if tracking.mlflow_fallback_local else None,
            run_id=(previous or {}).get("run_id"),
        )
        if tracker.run_id is not None:
            os.makedirs(cfg.train.output_dir, exist_ok=True)
            with open(record, "w") as handle:
                json.dump({"run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri}, handle)
        params = {
            **flatten(cfg.to_dict()),
            **flatten(ds_config, "ds."),
            "world_size": world_size,
            "model_path": model_path,
        }
        if previous is None:
            tracker.log_params(params)
        else:
            # MLflow params are write-once; the continued run keeps those of its first start.
            tracker.set_tags({"resumed": "true"})
        tracker.set_tags(
            {
                "git_commit": git_commit(REPO_DIR),
                "num_nodes": num_nodes,
                "world_size": world_size,
                "method": cfg.finetuning.method,
                "task": cfg.data.task,
                "restarts": restarts,
            }
        )
        tracker.set_tags(
            {
                # what the MLflow UI shows as the run's source, and how to start it again
                "mlflow.source.name": os.path.relpath(
                    os.path.abspath(sys.argv[0]), os.path.dirname(REPO_DIR)
                ),
                "mlflow.source.type": "LOCAL",
                "mlflow.source.git.commit": git_commit(REPO_DIR),
                "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
            }
        )
        tracker.log_metrics({"restarts": restarts}, step=restarts)
        if tracking.mlflow_system_metrics:
            tracker.start_system_metrics(resumed=previous is not None)
        return cls(tracker, cfg, resumed=previous is not None)

    def datasets(
        self, cfg: RunConfig, sources: dict[str, str], data: dict, *, stage1_sample_size: int | None
    ):
        """The run's data as MLflow inputs: ``data`` maps a context (training, evaluation, validation) to its
        rows (a ``datasets.Dataset`` or a list of dicts), ``sources`` the context to its file or hub id."""
        if self.tracker.run_id is None or self.resumed:  # off rank 0; a continued run has its inputs
            return
        try:
            self._log_datasets(cfg, sources, data, stage1_sample_size)
        except Exception as error:  # noqa: BLE001 - lineage is tracking: it never stops training
            logger.warning(f"MLflow dataset inputs not logged ({type(error).__name__}: {error})")

    def _log_datasets(
        self, cfg: RunConfig, sources: dict, data: dict, stage1_sample_size: int | None
    ) -> None:
        import mlflow.data
        import pandas

        for context, rows in data.items():
            if rows is None or len(rows) == 0:
                continue
            frame = rows.to_pandas() if hasattr(rows, "to_pandas") else pandas.DataFrame(rows)
            for column in frame.columns:  # lists (several references) as JSON text
                if frame[column].map(lambda value: isinstance(value, list)).any():
                    frame[column] = frame[column].map(json.dumps)
            dataset = mlflow.data.from_pandas(
                frame, source=sources[context], name=f"{cfg.data.task}/{context}"
            )
            tags = {"rows": len(frame)}
            if context == "training" and stage1_sample_size is not None:
                tags["stage1_sample_size"] = stage1_sample_size
            self.tracker.log_dataset(dataset, context, tags)

    def stage_metrics(self, stage: str, metrics: dict[str, float], step: int) -> None:
        for name, curve in (("loss", stage), ("val_loss", f"{stage} validation")):
            if name in metrics:
                self.curves.setdefault(curve, []).append((step, metrics[name]))
        self.tracker.log_metrics({f"{stage}/{name}": value for name, value in metrics.items()}, step)

    def plan(self, plan: Plan, output_dir: str) -> None:
        from ds_loradrop.tracking.plots import plot_importance

        for name, target in plan.targets.items():
            for layer, (g, y) in enumerate(zip(target.importance, target.normalized)):
                self.tracker.log_metrics({f"importance/{name}": g, f"normalized_importance/{name}": y}, layer)
            self.tracker.log_metrics({f"retained_layers/{name}": len(target.retained)})
        self.tracker.log_artifact(os.path.join(output_dir, PLAN_NAME))
        path = os.path.join(output_dir, PLOTS_DIR, "importance.png")
        if _draw(plot_importance, plan, path):
            self.tracker.log_artifact(path, PLOTS_DIR)

    def evaluation(self, metrics: dict, step: int) -> None:
        self.tracker.log_metrics(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step
        )

    def base_evaluation(self, metrics: dict) -> None:
        """The model before training, on the same inputs as ``eval/``."""
        self.tracker.log_metrics(
            {f"base_eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        )

    @property
    def tracks(self) -> bool:
        """Whether this process tracks a run (the global rank 0 with MLflow on and a started run)."""
        return self.tracker.run_id is not None

    def model(self, model: ModelToLog) -> str | None:
        """Log the run's trained model; its ``runs:/`` URI (also the run's tag ``mlflow_model``), or None."""
        info = self.tracker.log_model(model)
        if info is None:
            return None
        uri = f"runs:/{self.tracker.run_id}/{MODEL_NAME}"
        line = f"MLflow model logged: mlflow.pyfunc.load_model({uri!r})"
        tags = {LOGGED_MODEL_TAG: uri, LOGGED_MODEL_ID_TAG: info.model_id}
        if model.register_as is not None and info.registered_model_version is not None:
            line += f"; registered as models:/{model.register_as}/{info.registered_model_version}"
            tags["mlflow_registered_model"] = f"{model.register_as}/{info.registered_model_version}"
        logger.info(line)
        self.tracker.set_tags(tags)
        return uri

    def no_model(self, reason: str) -> None:
        """Say once, in the log and on the run, why no MLflow model was logged."""
        logger.warning(f"no MLflow model logged: {reason}")
        self.tracker.set_tags({LOGGED_MODEL_TAG: f"not logged: {reason}"})

    def finish(self, summary, output_dir: str, model_logged: bool = False) -> None:
        """Counts, configs, adapter (a full model's directory unless it is the logged MLflow model), a sample
        of predictions and the loss plot; then FINISHED."""
        from ds_loradrop.tracking.plots import plot_losses

        counts = {"trainable_parameters": summary.trainable_parameters}
        if summary.lora_parameters:
            counts["lora_parameters"] = summary.lora_parameters
            counts["trainable_share_of_lora"] = summary.trainable_parameters / summary.lora_parameters
        counts.update({f"retained_layers/{t}": len(r) for t, r in summary.retained.items()})
        counts.update({f"num_layers/{t}": n for t, n in summary.num_layers.items()})
        counts["data/num_truncated"] = summary.num_truncated
        for rank, peak in enumerate(summary.peak_memory_bytes):
            counts[f"memory/peak_bytes_rank{rank}"] = peak
        if summary.peak_memory_bytes:
            counts["memory/peak_gib_max"] = max(summary.peak_memory_bytes) / 2**30
            self.tracker.set_tags({"memory/peak_kind": summary.peak_memory_kind})
        self.tracker.log_metrics(counts)
        for name in (RUN_CONFIG_NAME, DS_CONFIG_NAME, SUMMARY_NAME):
            self.tracker.log_artifact(os.path.join(output_dir, name))
        for directory in (FINAL_ADAPTER_DIR,) if model_logged else (FINAL_ADAPTER_DIR, FULL_MODEL_DIR):
            if os.path.isdir(os.path.join(output_dir, directory)):
                self.tracker.log_artifact(os.path.join(output_dir, directory), directory)
        predictions = os.path.join(output_dir, EVAL_DIR, PREDICTIONS_NAME)
        if os.path.isfile(predictions):
            sample = os.path.join(output_dir, EVAL_DIR, PREDICTIONS_SAMPLE_NAME)
            with open(predictions, encoding="utf-8") as source, open(sample, "w", encoding="utf-8") as target:
                target.writelines(line for _, line in zip(range(PREDICTION_SAMPLE_LINES), source))
            self.tracker.log_artifact(sample, EVAL_DIR)
            self.tracker.log_artifact(os.path.join(output_dir, EVAL_DIR, METRICS_NAME), EVAL_DIR)
        base_metrics = os.path.join(output_dir, BASE_EVAL_DIR, METRICS_NAME)
        if os.path.isfile(base_metrics):
            self.tracker.log_artifact(base_metrics, "eval/base")
        loss_plot = os.path.join(output_dir, PLOTS_DIR, "loss.png")
        if _draw(plot_losses, self.curves, loss_plot):
            self.tracker.log_artifact(loss_plot, PLOTS_DIR)
        tags = {"completed": "all"}
        if self.config is not None:
            tags["mlflow.note.content"] = describe(summary, self.config)
        self.tracker.set_tags(tags)
        self.tracker.end("FINISHED")

    def stopped_after_stage1(self, output_dir: str) -> None:
        """A run ended by ``--stop_after_stage1``: its configs, FINISHED with tag ``completed=stage1``
        (a resume that trains stage 2 continues this MLflow run and sets ``completed=all``)."""
        for name in (RUN_CONFIG_NAME, DS_CONFIG_NAME):
            self.tracker.log_artifact(os.path.join(output_dir, name))
        self.tracker.set_tags({"completed": "stage1"})
        self.tracker.end("FINISHED")

    def end(self, status: str) -> None:
        self.tracker.end(status)


def _draw(plot, value, path: str) -> bool:
    """Draw a plot into ``path``; a plotting error is reported and costs only the plot."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plot(value, path)
    except Exception as error:  # noqa: BLE001 - a plot must never stop a training job
        logger.warning(f"could not draw {path}: {type(error).__name__}: {error}")
        return False
    return True
