"""The ``pretrain`` flow: Stage 1 on the ingest shards, in-process or under torchrun, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from tqdm import tqdm

from flows.common import gpu_stage_run, torchrun, training_progress, vaemo_flow
from flows.ingest import task_runner
from vaemo import tracking
from vaemo.artifacts import IngestFolder, ModelFolder
from vaemo.config import DaskConfig, PretrainConfig, TrackingConfig, TrainConfig
from vaemo.data.config import DataConfig, ViewConfig
from vaemo.data.view import TrainingView, build_group
from vaemo.model import av
from vaemo.plots import training_curves
from vaemo.tracking import Tag
from vaemo.train import pretrain as stage1
from vaemo.train.loop import read_step_log


def log_training_files(model: ModelFolder, curves: tuple[str, ...], title: str, settings: TrainConfig) -> None:
    """The training curves and metrics of a training run's folder (Stage 1 and Stage 2), and its checkpoints when
    ``settings`` say so."""
    tracking.log_figure(training_curves(read_step_log(model.path), curves, title), "training_curves.png")
    if settings.log_checkpoints:
        tracking.log_files(model.checkpoints(), artifact_path=model.CHECKPOINTS)
    tracking.log_files([model / model.METRICS])


@task(name="view-group", retries=1, cache_policy=NO_CACHE)
def view_group(shards: str, sources: list[str], data: DataConfig, cfg: ViewConfig) -> dict:
    marker = build_group(TrainingView(IngestFolder(shards), data, cfg), sources, data, cfg)
    return {"clips": sum(s["samples"] for s in marker["shards"]), "seconds": marker["seconds"]}


@flow(name="training-view")
def view_flow(shards: str, data: DataConfig, cfg: ViewConfig) -> dict:
    """Re-pack the ingest shards no view shard covers yet, one task per group, with a bar and a progress artifact."""
    view = TrainingView(IngestFolder(shards), data, cfg)
    groups = view.plan(cfg.ingest_shards_per_task)
    get_run_logger().info("training view %s: %d group(s) of ingest shards to re-pack", view.path, len(groups))
    progress = create_progress_artifact(progress=0.0, key="view-progress", description="Share of view groups done")
    futures = [view_group.submit(shards, sources, data, cfg) for sources in groups]
    with tqdm(total=len(groups), unit="group", desc="training view") as bar:
        for done, future in enumerate(as_completed(futures), start=1):
            bar.set_postfix(clips=future.result()["clips"], refresh=False)  # a failed group fails the flow
            bar.update(1)
            update_progress_artifact(progress, progress=100.0 * done / len(futures))
    return view.finish()


def ensure_view(shards: str, settings: PretrainConfig, dask: DaskConfig) -> TrainingView:
    """The shards' training view, built on ``dask``'s cluster unless its digest is current; logged as a dataset."""
    data = stage1.data_config(settings, stage1.model_config(settings))
    with TrainingView(IngestFolder(shards), data, settings.view).building() as view:
        if view.is_current():
            get_run_logger().info("training view %s is current (digest %s)", view.path, view.built_digest())
        else:
            view_flow.with_options(task_runner=task_runner(dask))(shards, data, settings.view)
    tracking.log_dataset("training_view", view.shards_dir, view.built_digest(), context="training")
    return view


def check(shards: str, **_) -> None:
    IngestFolder(shards).shard_urls()


@vaemo_flow("pretrain", check)
def pretrain_flow(shards: str, out: str, settings: PretrainConfig = PretrainConfig(), resume: bool = False,
                  work_dir: str = "vaemo-work", tracking_cfg: TrackingConfig = TrackingConfig(),
                  parent_run_id: str | None = None, dask: DaskConfig = DaskConfig()) -> dict:
    """Pre-train the unified AV encoder on an ingest folder's shards (read through their training view, built here
    when missing); the model lands in ``out``."""
    logger = get_run_logger()
    ingest, model = IngestFolder(shards), ModelFolder(out)
    digest = ingest.digest()
    model_cfg = stage1.model_config(settings)
    params = {
        "shards": shards,
        "out": out,
        "resume": resume,
        "pretrain": settings.model_dump(),
        "model": model_cfg.model_dump(),
        "audio_norm": f"mean={model_cfg.audio_mean} std={model_cfg.audio_std} double_std={model_cfg.audio_double_std}",
    }
    with gpu_stage_run("pretrain", work_dir, tracking_cfg, params, tracking.child_tags(parent_run_id),
                       gpus=settings.processes) as (run, uri):
        tracking.log_shards(ingest, "training", digest)
        if settings.view.enabled:
            ensure_view(shards, settings, dask)
        info = av.model_info(model_cfg)
        tracking.log_metrics_flat({"params": info["params"], "pretrain_gflops": info["pretrain_gflops"]}, "model.")
        logger.info("Stage 1 %s (%s parameters) on %s, %d steps, %d process(es)", settings.model,
                    f"{info['params']['total']:,}", shards, settings.steps, settings.processes)
        with training_progress("pretrain-progress", "Stage 1", out, settings.steps):
            if settings.processes > 1:
                torchrun("vaemo.train.pretrain", settings, out, ["--shards", shards], uri, run.info.run_id, resume)
                metrics = model.metrics()
            else:
                with tracking.step_logger(uri, run.info.run_id) as log_step:
                    metrics = stage1.pretrain(Path(shards), Path(out), settings, resume=resume, log_step=log_step)
        tracking.log_metrics_flat({k: v for k, v in metrics.items() if v is not None})
        log_training_files(model, ("loss", "rec_video", "rec_audio", "contrastive", "lr"), "Stage 1", settings)
        model_id = tracking.log_model("stage1", model, tracking.registered_name(tracking_cfg.experiment, "stage1"),
                                      tracking.pipeline_alias(parent_run_id), tags={Tag.SHARDS_DIGEST: digest})
        model.write_record(model_id, run.info.run_id, uri)  # Stage 2 names it as its input
        line = (f"pretrain done: loss {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}, video->audio top-1 "
                f"{metrics['av_retrieval_top1']:.3f} (chance {metrics['av_retrieval_chance']:.3f}); model in {out}, "
                f"MLflow run {run.info.run_id}")
        create_markdown_artifact(
            key="pretrain-report", markdown=f"# Stage 1 `{settings.model}`\n\n{line}; logged model `{model_id}`."
        )
        return {**metrics, "mlflow_run_id": run.info.run_id, "model_id": model_id, "summary": line}

