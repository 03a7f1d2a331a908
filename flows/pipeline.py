"""The ``vaemo_pipeline`` flow: the stages of a named pipeline, each as a subflow, run by the library's
pipeline runner (vaemo.pipeline: keys, skips, resume, markers).

MLflow: one parent run per pipeline run (tagged with the Prefect flow-run id and deployment), one
child run per stage (``mlflow.parentRunId``). One run of a pipeline per work directory at a time
(a file lock; a second run is refused). ``vaemo_new_corpus`` runs a named pipeline on a corpus
given as a parameter (the "new-corpus" deployment of ``vaemo serve``).
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import get_run_context
from prefect.states import Failed

from flows.align import align_flow
from flows.caption import caption_flow
from flows.common import flow_run_tags, publish_mlflow_link, run_name, vaemo_flow
from flows.evaluate import evaluate_flow
from flows.ingest import on_cluster
from flows.pretrain import pretrain_flow
from vaemo import tracking
from vaemo.config import CorpusConfig, Settings
from vaemo.errors import VaemoError
from vaemo.eval import REPORT
from vaemo.pipeline import (
    STAGES,
    PipelineFailed,
    Step,
    StepFailed,
    StepOutcome,
    layout,
    one_run_at_a_time,
    preflight,
    run_pipeline,
)

# The flow that runs each stage of the library's table (vaemo.pipeline.stages.STAGES).
SUBFLOWS = {"ingest": lambda settings: on_cluster(settings.dask), "pretrain": lambda _: pretrain_flow,
            "caption": lambda _: caption_flow, "align": lambda _: align_flow, "evaluate": lambda _: evaluate_flow}


def _executor(settings: Settings, pipeline: str, parent_run_id: str):
    common = {"work_dir": str(settings.work_dir), "tracking_cfg": settings.tracking, "parent_run_id": parent_run_id}

    def execute(step: Step, resume: bool) -> dict:
        extra = {"resume": resume} if step.trained else {}
        subflow = SUBFLOWS[step.stage](settings).with_options(flow_run_name=lambda: run_name(pipeline, step.label))
        state = subflow(**step.params, **extra, **common, return_state=True)
        if state.is_completed():
            return state.result()
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, BaseException) and not isinstance(outcome, VaemoError):
            raise outcome  # a bug in the stage: its traceback, not a one-line failure
        raise StepFailed(state.message or state.name)

    return execute


def _publish_steps(settings: Settings, pipeline: str, experiment_id: str, outcomes: list[StepOutcome]) -> None:
    """A table artifact in the flow run: one row per step, with how it went and the link to its MLflow run."""
    work = Path(settings.work_dir)
    rows = [{"stage": step.stage, "corpus": step.corpus,
             "outcome": f"skipped (reusing run {step.reused_run_id})" if step.outcome == "skipped" else step.outcome,
             "seconds": round(step.seconds, 1),
             "mlflow_run": settings.tracking.run_url(work, experiment_id, step.run_id) if step.run_id else ""}
            for step in outcomes]
    create_table_artifact(rows, key="pipeline-steps", description=f"The steps of pipeline {pipeline}: each ran, was "
                          "skipped (its key matched the marker of the run whose outputs it reuses) or failed")


def _summary(settings: Settings, name: str, result: dict) -> str:
    children = ", ".join(f"{label} {run_id}" + (" (skipped)" if label in result["skipped"] else "")
                         for label, run_id in result["children"].items())
    dirs = layout(settings.work_dir, name)
    lines = [f"pipeline {name} done: MLflow run {result['mlflow_run_id']} (Prefect flow run {result['flow_run_id']}); "
             f"stages: {children}",
             f"look at the MLflow run {result['mlflow_run_id']} in {settings.mlflow_uri()} (`vaemo ui` serves it), "
             f"`vaemo lineage {result['mlflow_run_id']}`, and the outputs in {dirs['root']}:"]
    outputs = (("shards", dirs["corpora"]), ("Stage 1 model", dirs["pretrain"]), ("LanceDB captions", dirs["caption"]),
               ("Stage 2 model", dirs["align"]), ("evaluation report", dirs["evaluate"] / REPORT))
    return "\n".join(lines + [f"  {what}: {path}" for what, path in outputs if path.exists()])


def check(pipeline: str, settings: Settings) -> None:
    preflight(settings, pipeline)


@vaemo_flow("vaemo_pipeline", check, subject=lambda parameters: parameters["pipeline"])
def vaemo_pipeline(pipeline: str, settings: Settings) -> dict:
    """Run the stages of the named ``pipeline`` of ``settings`` in order, each skipped when its key matches its marker.

    One run per pipeline and work directory at a time: a second one is refused (its outputs are shared).
    """
    logger = get_run_logger()
    try:
        with one_run_at_a_time(settings, pipeline):
            spec = settings.pipelines[pipeline]
            runs = tracking.PipelineRuns(pipeline, settings.mlflow_uri(), settings.tracking.experiment,
                                         Path(settings.work_dir), flow_run_tags(),
                                         {"pipeline": pipeline, "stages": ",".join(spec.stages),
                                          "corpora": ",".join(spec.corpora)})
            publish_mlflow_link("pipeline-mlflow-run", f"pipeline {pipeline}", settings.tracking,
                                Path(settings.work_dir), runs.experiment_id, runs.parent_id)
            logger.info("pipeline %s: stages %s on corpora %s; MLflow parent run %s", pipeline, spec.stages,
                        spec.corpora, runs.parent_id)
            try:
                result = run_pipeline(pipeline, settings, STAGES, _executor(settings, pipeline, runs.parent_id), runs)
            except PipelineFailed as failure:  # the table shows the steps up to the failed one
                _publish_steps(settings, pipeline, runs.experiment_id, failure.outcomes)
                raise
            _publish_steps(settings, pipeline, runs.experiment_id, result["outcomes"])
    except VaemoError as exc:  # a stage failed (PipelineFailed), or another run holds the lock
        return Failed(message=str(exc))
    result["flow_run_id"] = str(get_run_context().flow_run.id)
    return {**result, "summary": _summary(settings, pipeline, result)}


@flow(name="vaemo_new_corpus", log_prints=True)
def vaemo_new_corpus(pipeline: str, corpus_name: str, corpus: CorpusConfig, settings: Settings) -> dict:
    """Run a named pipeline's stages and settings on a corpus that is not in pipelines.yaml yet.

    Its outputs and markers live under ``pipelines/<pipeline>@<corpus_name>``, so the pipeline's own
    outputs are untouched and a re-run on the same folder (say, after more videos arrived) only does
    the new work.
    """
    if pipeline not in settings.pipelines:
        return Failed(message=f"no pipeline {pipeline!r} (known: {sorted(settings.pipelines)})")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", corpus_name):
        return Failed(message=f"corpus name {corpus_name!r}: use letters, digits, '.', '_' and '-'")
    name = f"{pipeline}@{corpus_name}"
    spec = settings.pipelines[pipeline].model_copy(update={"corpora": [corpus_name], "schedule": None})
    extended = settings.model_copy(update={"corpora": {**settings.corpora, corpus_name: corpus},
                                           "pipelines": {**settings.pipelines, name: spec}})
    return vaemo_pipeline(pipeline=name, settings=extended, return_state=True)

