"""The ``ingest`` flow: one task per batch of videos on a Dask cluster (a single batch in the flow's own process),
stats to Prefect and MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.states import Failed
from prefect_dask import DaskTaskRunner
from tqdm import tqdm

from flows.common import stage_run, vaemo_flow
from vaemo import tracking
from vaemo.artifacts import IngestFolder
from vaemo.config import DaskConfig, IngestConfig, TrackingConfig
from vaemo.errors import StorageError, VaemoError
from vaemo.ingest import shards
from vaemo.ingest.run import IngestRun, check_source


def _worth_a_retry(task, task_run, state) -> bool:
    return not isinstance(state.data, VaemoError)  # a full disk or a superseded run stays so on a retry


@task(name="ingest-batch", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, retry_condition_fn=_worth_a_retry)
def ingest_batch(batch: shards.BatchSpec, out_dir: str, cfg: IngestConfig) -> dict:
    marker = shards.run_batch(batch, Path(out_dir), cfg)
    statuses: dict[str, int] = {}
    for video in marker["videos"]:
        statuses[video["status"]] = statuses.get(video["status"], 0) + 1
    return {"batch_id": marker["batch_id"], "videos": len(marker["videos"]),
            "clips": sum(v["n_clips"] for v in marker["videos"]), "statuses": statuses, "seconds": marker["seconds"]}


def task_runner(dask: DaskConfig) -> DaskTaskRunner:
    if dask.address:
        return DaskTaskRunner(address=dask.address)
    # A local cluster's scheduler and nannies log their shutdown at INFO, including a harmless
    # "comm closed" traceback when a worker's last message races the close; errors stay visible.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": dask.workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None}
    )


def on_cluster(dask: DaskConfig):
    """The ingest flow with its batches on ``dask``'s cluster. The task runner makes its cluster (or connects) at its
    first submit, so a run of one batch, which calls its task in the flow's process, starts none."""
    return ingest_flow.with_options(task_runner=task_runner(dask))


def summary(stats: dict, out: str) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in stats["status_counts"].items())
    return f"ingest done: {stats['clips']} clips in {stats['shards']} shards under {out} ({counts})"


def _markdown(stats: dict, out_dir: str, run_id: str) -> str:
    rows = "\n".join(f"| {status} | {count} |" for status, count in stats["status_counts"].items())
    last = stats["last_run"]
    return (
        f"# Ingest of `{out_dir}`\n\n"
        f"{stats['videos']} videos, {stats['clips']} clips in {stats['shards']} shards; "
        f"this run processed {last['processed_videos']} videos in {last['seconds']} s "
        f"and skipped {last['skipped_videos']} already ingested.\n\n"
        f"Shard set digest `{stats['shard_set_digest']}`; MLflow run `{run_id}`.\n\n"
        f"| status | videos |\n|---|---|\n{rows}\n"
    )


def check(source: str, dataset: str, labels: str | None, **_) -> None:
    check_source(Path(source), dataset, Path(labels) if labels else None)


@vaemo_flow("ingest", check)
def ingest_flow(source: str, out: str, dataset: str = "auto", labels: str | None = None, work_dir: str = "vaemo-work",
                settings: IngestConfig = IngestConfig(), tracking_cfg: TrackingConfig = TrackingConfig(),
                workers: int = 1, parent_run_id: str | None = None):
    """Ingest a folder of videos into face + voice WebDataset shards under ``out``."""
    logger = get_run_logger()
    folder = IngestFolder(out)
    params = {"source": source, "out": out, "dataset": dataset, "labels": labels, "ingest": settings.model_dump()}
    with stage_run("ingest", work_dir, tracking_cfg, params, tracking.child_tags(parent_run_id)) as (run, _):
        with IngestRun(Path(source), folder.path, dataset, settings, Path(labels) if labels else None) as ingest_run:
            plan = ingest_run.plan(parallelism=workers)
            if plan.removed:
                logger.warning("Removed leftovers of an interrupted run: %s", ", ".join(plan.removed))
            if plan.retired:
                logger.warning("Source files changed since they were ingested: their batches %s are done again",
                               ", ".join(plan.retired))
            logger.info("%d videos found (%d left out by the dataset's rules, %d not readable files), %d already "
                        "ingested, %d to process in %d batches", len(plan.records), plan.left_out, plan.refused,
                        plan.skipped, plan.pending_videos, len(plan.batches))
            failed = _run_batches(plan, out, settings)
            stats = ingest_run.finalize(plan, failed)
        tracking.log_metrics_flat({k: v for k, v in stats.items() if k != "last_run"})
        tracking.log_metrics_flat(stats["last_run"], "last_run.")
        tracking.log_json(stats, folder.STATS)
        tracking.log_json(settings.model_dump(), "ingest_config.json")
        tracking.log_files([folder / folder.MANIFEST, folder / folder.CLIPS])
        tracking.log_output("shards", stats["shard_set_digest"], {"dir": folder.shards_dir.resolve(),
                                                                  "clips": stats["clips"]})
        create_table_artifact(key="ingest-stats",
                              table=[{"status": k, "videos": v} for k, v in stats["status_counts"].items()],
                              description="Videos per status")
        create_markdown_artifact(
            key="ingest-report", markdown=_markdown(stats, out, run.info.run_id), description="Ingest summary"
        )
        if failed:
            message = (
                f"{len(failed)} batches failed; their videos are 'pending' in the manifest and a re-run resumes them"
            )
            return Failed(message=message, data=stats)
        return {**stats, "mlflow_run_id": run.info.run_id, "summary": summary(stats, out)}


def _outcomes(plan, out: str, cfg: IngestConfig):
    """(batch, final state) of every batch as it ends: one batch runs here, in the flow's process, unless the flow
    runs on an existing cluster (a local cluster's start and stop would cost more than its help); more are submitted
    to the task runner."""
    batch_task = ingest_batch.with_options(timeout_seconds=cfg.batch_timeout_seconds)
    runner = FlowRunContext.get().task_runner
    if len(plan.batches) == 1 and not (isinstance(runner, DaskTaskRunner) and runner.address):
        yield plan.batches[0], batch_task(plan.batches[0], out, cfg, return_state=True)
        return
    futures = {batch_task.submit(batch, out, cfg): batch for batch in plan.batches}
    for future in as_completed(list(futures)):
        future.wait()
        yield futures[future], future.state


def _run_batches(plan, out: str, cfg: IngestConfig) -> dict[str, str]:
    """Run every batch, follow completion with a terminal bar and a Prefect progress artifact."""
    failed: dict[str, str] = {}
    if not plan.batches:
        return failed
    progress = create_progress_artifact(progress=0.0, key="ingest-progress", description="Share of batches done")
    with tqdm(total=plan.pending_videos, unit="video", desc="ingest") as bar:
        for done, (batch, state) in enumerate(_outcomes(plan, out, cfg), start=1):
            if state.is_completed():
                bar.set_postfix(clips=state.result()["clips"], refresh=False)
            elif isinstance(error := state.result(raise_on_failure=False), StorageError):
                raise error  # every later batch would fail the same way; the committed ones stay
            else:
                failed[batch.batch_id] = f"batch failed: {state.message}"
            bar.update(len(batch.videos))
            update_progress_artifact(progress, progress=100.0 * done / len(plan.batches))
    return failed
