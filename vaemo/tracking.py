"""MLflow in one place: where runs go, one run per stage, datasets logged with content digests."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric


def configure(tracking_uri: str, experiment: str, work_dir: Path) -> str:
    """Point MLflow at the store and make sure the experiment keeps its artifacts in the work dir."""
    work_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        if tracking_uri.startswith(("http://", "https://")):
            return client.create_experiment(experiment)  # the tracking server decides where artifacts go
        artifacts = (work_dir / "mlartifacts").resolve().as_uri()
        return client.create_experiment(experiment, artifact_location=artifacts)
    return found.experiment_id


@contextmanager
def stage_run(stage: str, *, tracking_uri: str, experiment: str, work_dir: Path, params: dict | None = None, tags: dict | None = None, system_metrics: bool = False):
    """One MLflow run for one stage. An exception marks the run FAILED with the error as a tag."""
    experiment_id = configure(tracking_uri, experiment, work_dir)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags={"vaemo.stage": stage, **(tags or {})}, log_system_metrics=system_metrics)
    try:
        if params:
            mlflow.log_params(_flat(params))
        yield run
    except BaseException as exc:
        mlflow.set_tag("vaemo.error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows the run under its parent


def child_tags(parent_run_id: str | None) -> dict:
    """Tags that make a stage's run a child of a pipeline's run (none without a parent)."""
    return {PARENT_TAG: parent_run_id} if parent_run_id else {}


def fail_run(message: str) -> None:
    """Close the active run as FAILED when a stage refuses to work without raising."""
    mlflow.set_tag("vaemo.error", message[:5000])
    mlflow.end_run(status="FAILED")


def log_dataset(name: str, path: Path, digest: str, context: str, extra_tags: dict | None = None) -> None:
    """Log a folder as an MLflow dataset whose digest is a hash of its content, not of its name."""
    with warnings.catch_warnings():  # a file URI matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    dataset = MetaDataset(source, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context, tags={"vaemo.digest": digest, **(extra_tags or {})})
    mlflow.set_tag(f"vaemo.{context}.{name}.digest", digest)


def log_lancedb(name: str, db: Path, table: str, tag: str, version: int, context: str) -> None:
    """A LanceDB table version as a dataset: the run's tag and version are its digest (``tag@vN``)."""
    log_dataset(name, db, f"{tag}@v{version}", context=context,
                extra_tags={"vaemo.lancedb.table": table, "vaemo.lancedb.tag": tag, "vaemo.lancedb.version": str(version)})


def log_params(params: dict) -> None:
    mlflow.log_params(_flat(params))


def log_table(frame, artifact_file: str) -> None:
    """A small table (pandas) people read in the MLflow UI's artifact view."""
    mlflow.log_table(data=frame, artifact_file=artifact_file)


def log_json(data: dict, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent) if "/" in artifact_file else None)


def log_files(paths: list[Path], artifact_path: str | None = None) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_metrics_flat(data: dict, prefix: str = "") -> None:
    mlflow.log_metrics({k: float(v) for k, v in _flat(data, prefix).items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def log_model_files(name: str, files: list[Path], tags: dict | None = None) -> str:
    """Log model files (safetensors + config) as an MLflow logged model of the active run."""
    run = mlflow.active_run()
    model = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id, experiment_id=run.info.experiment_id, tags=tags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for path in files:
                shutil.copy(path, Path(tmp) / path.name)
            mlflow.MlflowClient().log_model_artifacts(model.model_id, tmp)
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    mlflow.set_tag(f"vaemo.output.model.{name}", model.model_id)
    return model.model_id


MODEL_RECORD = "mlflow_model.json"  # beside a model folder's weights: the MLflow logged model they were logged as


def write_model_record(folder: Path, model_id: str, run_id: str, tracking_uri: str) -> None:
    """Let a later stage that starts from this folder name the logged model as its input."""
    (Path(folder) / MODEL_RECORD).write_text(json.dumps({"model_id": model_id, "run_id": run_id, "tracking_uri": tracking_uri}))


def read_model_record(folder: Path, tracking_uri: str) -> str | None:
    """The logged model id of a model folder, when it was logged to this tracking store; else None."""
    path = Path(folder) / MODEL_RECORD
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return None
    return record.get("model_id") if record.get("tracking_uri") == tracking_uri else None


def set_tags(tags: dict) -> None:
    mlflow.set_tags(tags)


def log_figure(figure, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def step_logger(tracking_uri: str, run_id: str):
    """Per-step metrics from a training process into an existing run (thread- and process-safe client)."""
    client = mlflow.MlflowClient(tracking_uri)

    def log(step: int, values: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in values.items()])

    return log


def log_history(tracking_uri: str, run_id: str, rows: list[tuple[int, dict[str, float]]], prefix: str = "") -> None:
    """Many steps of metrics in one write (a per-step write to SQLite costs tens of milliseconds)."""
    stamp = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}{k}", float(v), stamp, step) for step, values in rows for k, v in values.items()]
    client = mlflow.MlflowClient(tracking_uri)
    for begin in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[begin : begin + 1000])


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out
