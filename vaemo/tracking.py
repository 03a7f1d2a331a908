"""MLflow in one place: where runs go, one run per stage, datasets logged with content digests, the
tag keys lineage reads, the parent and child runs of a pipeline run, and the runs of killed processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelInput, Metric
from mlflow.exceptions import MlflowException

import vaemo
from vaemo import locks, store_templates
from vaemo.artifacts import IngestFolder, ModelFolder, TableVersion

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows the run under its parent
CONTEXT_TAG = "mlflow.data.context"  # MLflow's tag of a dataset input: how the run used it


class Tag:
    """The tag keys vaemo writes on runs, dataset inputs and logged models; lineage reads them back."""

    PREFIX = "vaemo."  # every key below but Prefect's
    STAGE = "vaemo.stage"
    PIPELINE = "vaemo.pipeline"
    ERROR = "vaemo.error"
    FAILED_STAGE = "vaemo.failed_stage"
    SKIPPED = "vaemo.skipped"
    REUSED_RUN = "vaemo.skipped.reused_run_id"
    KEY = "vaemo.key"
    # the process that runs a run (and closes it); a run it left RUNNING when it died is marked KILLED later
    OWNER_HOST, OWNER_PID, OWNER_STARTED = "vaemo.owner.host", "vaemo.owner.pid", "vaemo.owner.started"
    PROTOCOL, MODE, MODALITY = "vaemo.protocol", "vaemo.mode", "vaemo.modality"
    # on dataset inputs
    DIGEST = "vaemo.digest"
    LANCEDB_TABLE, LANCEDB_TAG, LANCEDB_VERSION = "vaemo.lancedb.table", "vaemo.lancedb.tag", "vaemo.lancedb.version"
    STAGE1_MODEL_ID = "vaemo.stage1.model_id"  # on Stage 2 logged models
    # on logged models
    SHARDS_DIGEST = "vaemo.shards.digest"
    CAPTIONS_TAG = "vaemo.captions.tag"
    # the Prefect flow run that made a run
    FLOW_RUN_ID, FLOW_RUN_NAME = "prefect.flow_run_id", "prefect.flow_run_name"
    DEPLOYMENT_ID, DEPLOYMENT = "prefect.deployment_id", "prefect.deployment"
    # families: vaemo.output.<name>..., vaemo.input.<name>.<field>, vaemo.<context>.<name>.digest
    OUTPUT, INPUT = "vaemo.output.", "vaemo.input."

    @staticmethod
    def output_digest(name: str) -> str:
        return f"{Tag.OUTPUT}{name}.digest"

    @staticmethod
    def output_model(name: str) -> str:
        return f"{Tag.OUTPUT}model.{name}"

    @staticmethod
    def input(name: str, part: str) -> str:
        return f"{Tag.INPUT}{name}.{part}"

    @staticmethod
    def used_digest(context: str, name: str) -> str:
        """The digest of a dataset the run used in ``context`` (``output``: one it produced)."""
        return f"{Tag.PREFIX}{context}.{name}.digest"

    @staticmethod
    def child(stage: str) -> str:
        """On a pipeline's parent run: the id of the stage's child run."""
        return f"{Tag.PREFIX}child.{stage}"

    @staticmethod
    def skipped_stage(stage: str) -> str:
        return f"{Tag.SKIPPED}.{stage}"


def client(tracking_uri: str) -> mlflow.MlflowClient:
    """A client of ``tracking_uri`` whose store is ready. The first process on a new SQLite store creates its tables;
    two at once would both migrate it and one fail, so that first access holds a lock beside the file."""
    if not tracking_uri.startswith("sqlite:///"):
        return mlflow.MlflowClient(tracking_uri)
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    with locks.held(database.with_name(database.name + ".lock"), wait=True):
        store_templates.seed(database, store_templates.MLFLOW)
        return mlflow.MlflowClient(tracking_uri)  # makes the store, and its tables when they are missing


def owner_tags() -> dict[str, str]:
    """This process, as the owner of the runs it opens: host, pid and start time (a pid alone may be reused)."""
    return {Tag.OWNER_HOST: socket.gethostname(), Tag.OWNER_PID: str(os.getpid()),
            Tag.OWNER_STARTED: f"{psutil.Process().create_time():.2f}"}


def _owner_ended(tags: dict[str, str]) -> bool:
    """Whether the process that owns a run of this host has ended (its pid is gone, or is another process now)."""
    try:
        return abs(psutil.Process(int(tags[Tag.OWNER_PID])).create_time() - float(tags[Tag.OWNER_STARTED])) > 1
    except psutil.NoSuchProcess:
        return True


def mark_killed_runs(tracking_uri: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process of this host that has ended: killed (SIGKILL, out of memory,
    a power cut), it could not close them. Runs of live processes and of other hosts are left alone; so are runs
    without an owner (made by older versions). Returns the ids of the runs marked."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return []  # no store yet, so no runs (and no reason to create it here)
    store = client(tracking_uri)
    experiments = [e.experiment_id for e in store.search_experiments()]
    if not experiments:
        return []
    running = store.search_runs(
        experiments, f"attributes.status = 'RUNNING' and tags.`{Tag.OWNER_HOST}` = '{socket.gethostname()}'")
    marked = []
    for run in running:
        if _owner_ended(run.data.tags):
            store.set_tag(run.info.run_id, Tag.ERROR, f"its process (pid {run.data.tags[Tag.OWNER_PID]} on "
                                                      f"{run.data.tags[Tag.OWNER_HOST]}) ended without closing it")
            store.set_terminated(run.info.run_id, "KILLED")
            marked.append(run.info.run_id)
    return marked


# The kind of experiment the MLflow UI's model-training view lists (runs, models) with its own items, not guessed
# from the runs (a pipeline with an evaluation stage and logged models reads as GenAI). The addresses vaemo gives
# open that view (vaemo.config.mlflow_ui_page).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def configure(tracking_uri: str, experiment: str, work_dir: Path) -> str:
    """Point MLflow at the store and make sure the experiment keeps its artifacts in the work dir."""
    work_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    store = client(tracking_uri)
    found = store.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND, "_inferred").endswith("_inferred"):  # made before the tag, or guessed
            store.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return found.experiment_id
    # a tracking server decides where artifacts go
    remote = tracking_uri.startswith(("http://", "https://"))
    try:
        return store.create_experiment(
            experiment, artifact_location=None if remote else (work_dir / "mlartifacts").resolve().as_uri(),
            tags={EXPERIMENT_KIND: MODEL_TRAINING})
    except MlflowException:
        found = store.get_experiment_by_name(experiment)  # another process made it meanwhile
        if found is None:
            raise
        return found.experiment_id


@contextmanager
def stage_run(stage: str, *, tracking_uri: str, experiment: str, work_dir: Path, params: dict | None = None,
              tags: dict | None = None, system_metrics: bool = False):
    """One MLflow run for one stage. An exception marks the run FAILED with the error as a tag (KILLED for an
    interruption); a run of a process that dies is marked KILLED by the next command (:func:`mark_killed_runs`)."""
    experiment_id = configure(tracking_uri, experiment, work_dir)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage,
                           tags={Tag.STAGE: stage, **owner_tags(), **(tags or {})}, log_system_metrics=system_metrics)
    try:
        if params:
            mlflow.log_params(_flat(params))
        yield run
    except BaseException as exc:
        mlflow.set_tag(Tag.ERROR, f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")  # Ctrl-C, SIGTERM
        raise
    else:
        mlflow.end_run(status="FINISHED")


def child_tags(parent_run_id: str | None) -> dict:
    """Tags that make a stage's run a child of a pipeline's run (none without a parent)."""
    return {PARENT_TAG: parent_run_id} if parent_run_id else {}


def log_dataset(name: str, path: Path, digest: str, context: str, extra_tags: dict | None = None) -> None:
    """Log a folder as an MLflow dataset whose digest is a hash of its content, not of its name."""
    with warnings.catch_warnings():  # a file URI matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    dataset = MetaDataset(source, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context, tags={Tag.DIGEST: digest, **(extra_tags or {})})
    mlflow.set_tag(Tag.used_digest(context, name), digest)


def log_shards(folder: IngestFolder, context: str, digest: str | None = None, extra_tags: dict | None = None) -> str:
    """An ingest folder's shard set as the dataset ``shards``; returns its digest."""
    digest = digest or folder.digest()
    log_dataset("shards", folder.shards_dir, digest, context=context, extra_tags=extra_tags)
    return digest


def log_table_version(name: str, pinned: TableVersion, context: str) -> None:
    """A LanceDB table version as a dataset: the run's tag and version are its digest (``tag@vN``)."""
    log_dataset(
        name,
        Path(pinned.db),
        pinned.digest,
        context=context,
        extra_tags={Tag.LANCEDB_TABLE: pinned.table, Tag.LANCEDB_TAG: pinned.tag,
                    Tag.LANCEDB_VERSION: str(pinned.version)},
    )


def log_model_input(folder: ModelFolder, name: str, part: str, tracking_uri: str) -> str | None:
    """A model folder the run reads: MLflow's model input when the folder was logged to this store (lineage
    walks back to the run that made it), else a dataset ``name`` with the digest of its files (a model made
    elsewhere). ``part`` names the ``vaemo.input.<part>.*`` run tags; returns the logged model id, if any."""
    digest = folder.digest()
    model_id = folder.logged_model_id(tracking_uri)
    if model_id:
        log_used_model(model_id)
    else:
        log_dataset(name, folder.path, digest, context="input")
    mlflow.set_tags({Tag.input(part, "digest"): digest, Tag.input(part, "dir"): str(folder.path.resolve()),
                     **({Tag.input(part, "model_id"): model_id} if model_id else {})})
    return model_id


def log_output(name: str, digest: str, details: dict | None = None) -> None:
    """A dataset the run produced, as run tags ``vaemo.output.<name>.digest`` and ``.<detail>``: MLflow's run
    outputs hold models only, and a dataset input would list it among what the run read."""
    mlflow.set_tags({Tag.output_digest(name): digest,
                     **{f"{Tag.OUTPUT}{name}.{key}": str(value) for key, value in (details or {}).items()}})


def log_output_table(name: str, pinned: TableVersion) -> None:
    """A LanceDB table version the run wrote (digest ``tag@vN``)."""
    log_output(name, pinned.digest, {"db": Path(pinned.db).resolve(), "table": pinned.table, "tag": pinned.tag,
                                     "version": pinned.version})


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
    mlflow.log_metrics(
        {k: float(v) for k, v in _flat(data, prefix).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )


def registered_name(experiment: str, stage: str) -> str:
    """The Model Registry name of a stage's models (one registered model per stage, a version per run)."""
    return f"{experiment}-{stage}"


def pipeline_alias(parent_run_id: str | None) -> str | None:
    """The alias a stage's model version gets: the name of the pipeline whose run is the stage run's parent,
    in the registry's alphabet (``tiny@more`` -> ``tiny-more``; ``latest`` and ``v1`` are the registry's own)."""
    pipeline = mlflow.MlflowClient().get_run(parent_run_id).data.tags.get(Tag.PIPELINE) if parent_run_id else None
    if not pipeline:
        return None
    alias = re.sub(r"[^\w-]", "-", pipeline)
    return f"pipeline-{alias}" if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias) else alias


def log_model(stage: str, folder: ModelFolder, registered: str, alias: str | None, tags: dict | None = None) -> str:
    """Log a model folder as an MLflow pyfunc model (:mod:`vaemo.pyfunc_model`), an output of the active run,
    registered as a new version of ``registered`` (and given ``alias``: later runs of the same pipeline move it);
    returns the logged model id."""
    import mlflow.pyfunc

    from vaemo import pyfunc_model

    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "model"  # MLflow keeps an artifact folder under its own name
        files.mkdir()
        for path in folder.model_files():
            shutil.copy(path, files / path.name)
        with warnings.catch_warnings():  # the inputs are paths to media: no example can travel with the model
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(  # a model from code: MLflow runs that file to load it, nothing is pickled
                name=stage, python_model=pyfunc_model.__file__, artifacts={"model": str(files)}, tags=tags,
                pip_requirements=[f"vaemo=={vaemo.__version__}"],  # else MLflow would load the model to guess
                signature=pyfunc_model.SIGNATURE, registered_model_name=registered)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(registered, alias, info.registered_model_version)
    mlflow.set_tag(Tag.output_model(stage), info.model_id)
    return info.model_id


def log_used_model(model_id: str) -> None:
    """A logged model of this store as an input of the active run (MLflow's own model input)."""
    mlflow.log_input(model=LoggedModelInput(model_id))


def log_figure(figure, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


class StepMetrics:
    """Per-step metrics from a training process into an existing run, written by a sender process.

    A step only queues its values (the queue's own thread pickles them): the sender, a spawned
    process, writes everything queued since its last write as one batch. Not a thread: MLflow's
    SQLite store spends about 0.2 ms of Python per value, and a thread would hold the GIL the
    training loop needs for that long (``benchmarks/metrics_bench.py``, README). Use it as a context
    manager: leaving sends what is still queued, after a failure too. A write that fails is logged
    by the sender, which then only counts what it drops; leaving raises, saying how many values did
    not arrive, unless the block itself failed. A sender whose parent dies exits by itself.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.run_id = run_id
        self.lost, self.error = 0, None
        context = multiprocessing.get_context("spawn")  # a fork of a training process may hold CUDA state
        self._steps, self._outcome = context.Queue(), context.Queue()
        self._sender = context.Process(target=_send_steps, args=(tracking_uri, run_id, self._steps, self._outcome),
                                       name="mlflow-step-metrics", daemon=True)
        self._sender.start()

    def __call__(self, step: int, values: dict[str, float]) -> None:
        self._steps.put((step, int(time.time() * 1000), {k: float(v) for k, v in values.items()}))

    def close(self) -> None:
        """Send what is queued and stop the sender (waits for its last write)."""
        if self._sender.is_alive():
            self._steps.put(None)
            self._sender.join()
        if self._sender.exitcode == 0 and not self._outcome.empty():
            self.lost, self.error = self._outcome.get()

    def __enter__(self) -> StepMetrics:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc is not None:
            return
        if self._sender.exitcode != 0:
            raise RuntimeError(f"the process sending step metrics to MLflow run {self.run_id} failed "
                               f"(exit code {self._sender.exitcode}; its traceback is above)")
        if self.error is not None:
            raise RuntimeError(f"{self.lost} step metric value(s) did not reach MLflow run {self.run_id}: {self.error}")


def _send_steps(tracking_uri: str, run_id: str, steps, outcome) -> None:
    """The sender process of :class:`StepMetrics`: batches of queued steps into the run until None arrives."""
    client, parent = mlflow.MlflowClient(tracking_uri), multiprocessing.parent_process()
    error, lost, done = None, 0, False
    while not done:
        try:
            pending = [steps.get(timeout=1.0)]
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return  # the training process was killed: nobody will close the queue
            continue
        while not steps.empty():
            pending.append(steps.get())
        done = pending[-1] is None
        metrics = [Metric(k, v, stamp, step) for step, stamp, values in filter(None, pending)
                   for k, v in values.items()]
        if error is None and metrics:
            try:
                write_metrics(client, run_id, metrics)
                continue
            except (MlflowException, OSError) as exc:  # the store is down or locked: training goes on
                log.warning("step metrics no longer reach MLflow run %s: %s", run_id, exc)
                error = f"{type(exc).__name__}: {exc}"
        lost += len(metrics)
    outcome.put((lost, error))


def step_logger(tracking_uri: str, run_id: str) -> StepMetrics:
    """The step logger of a training stage (a context manager; see :class:`StepMetrics`)."""
    return StepMetrics(tracking_uri, run_id)


def write_metrics(client: mlflow.MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Metrics into a run in as few writes as MLflow allows."""
    for begin in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[begin : begin + 1000])


def log_history(tracking_uri: str, run_id: str, rows: list[tuple[int, dict[str, float]]], prefix: str = "") -> None:
    """Many steps of metrics in one write (a per-step write to SQLite costs tens of milliseconds)."""
    stamp = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}{k}", float(v), stamp, step) for step, values in rows for k, v in values.items()]
    write_metrics(mlflow.MlflowClient(tracking_uri), run_id, metrics)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


class PipelineRuns:
    """The MLflow side of one pipeline run: a parent run, and a child run per step (skipped ones included).

    Stage flows open their own child runs (``child_tags(parent_id)``); this class makes the ones of
    skipped steps, which reuse the outputs and lineage tags of the run that made them, and of steps
    that failed before they could open one.
    """

    def __init__(self, name: str, tracking_uri: str, experiment: str, work_dir: Path, tags: dict[str, str],
                 params: dict):
        self.experiment_id = configure(tracking_uri, experiment, Path(work_dir))
        self.client = mlflow.MlflowClient(tracking_uri)
        self.tags = tags  # every run of this pipeline run carries them (the Prefect flow run)
        parent = self.client.create_run(self.experiment_id, run_name=f"pipeline {name}", tags={
            Tag.STAGE: "pipeline", Tag.PIPELINE: name, Tag.DEPLOYMENT: tags.get(Tag.DEPLOYMENT_ID, "none"),
            **owner_tags(), **tags})
        self.parent_id = parent.info.run_id
        for key, value in params.items():
            self.client.log_param(self.parent_id, key, value)

    def _child(self, run_name: str, stage: str, tags: dict, status: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            Tag.STAGE: stage, **tags, **child_tags(self.parent_id), **self.tags})
        self.client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    def skipped(self, step, marker: dict) -> dict:
        """A FINISHED child run that records the skip and carries the reused run's input and output tags."""
        reused = marker.get("run_id", "")
        try:
            source = self.client.get_run(reused).data.tags
            lineage = {k: v for k, v in source.items() if k.startswith((Tag.OUTPUT, Tag.INPUT))}
        except MlflowException:  # the store may have lost the old run; the skip still stands
            lineage = {}
        run_id = self._child(step.label, step.stage,
                             {Tag.SKIPPED: "true", Tag.REUSED_RUN: reused, Tag.KEY: marker["key"], **lineage},
                             "FINISHED")
        return {**marker.get("result", {}), "mlflow_run_id": run_id}

    def done(self, label: str, result: dict) -> None:
        self.client.set_tag(self.parent_id, Tag.child(label), result.get("mlflow_run_id", ""))
        if result.get("skipped"):
            self.client.set_tag(self.parent_id, Tag.skipped_stage(label), "true")

    def failed(self, label: str, message: str) -> str | None:
        """Mark the parent FAILED; a step that failed before it opened its own run gets a FAILED child run here.
        Returns the failed step's child run id (none for a failure of the pipeline itself)."""
        stage = label.split(":")[0]
        failed_here = (f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{Tag.STAGE}` = '{stage}' "
                       "and attributes.status = 'FAILED'")
        started = self.client.search_runs([self.experiment_id], filter_string=failed_here)
        child = started[0].info.run_id if started else None
        if not started and stage != "pipeline":
            child = self._child(label, stage, {Tag.ERROR: message[:5000]}, "FAILED")
        self.client.set_tag(self.parent_id, Tag.ERROR, f"{label}: {message}"[:5000])
        self.client.set_tag(self.parent_id, Tag.FAILED_STAGE, label)
        self.client.set_terminated(self.parent_id, "FAILED")
        return child

    def finished(self) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED")
