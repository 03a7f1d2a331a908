"""The ``pretrain`` flow: Stage 1 on the ingest shards, in-process or under torchrun, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import gpu_stage_run, torchrun, vaemo_flow
from vaemo import tracking
from vaemo.artifacts import IngestFolder, ModelFolder
from vaemo.config import PretrainConfig, TrackingConfig
from vaemo.model import av
from vaemo.plots import training_curves
from vaemo.tracking import Tag
from vaemo.train import pretrain as stage1
from vaemo.train.loop import read_step_log


def log_training_files(model: ModelFolder, curves: tuple[str, ...], title: str) -> None:
    """The training curves, checkpoints and metrics of a training run's folder (Stage 1 and Stage 2)."""
    tracking.log_figure(training_curves(read_step_log(model.path), curves, title), "training_curves.png")
    tracking.log_files(model.checkpoints(), artifact_path=model.CHECKPOINTS)
    tracking.log_files([model / model.METRICS])


def check(shards: str, **_) -> None:
    IngestFolder(shards).shard_urls()


@vaemo_flow("pretrain", check)
def pretrain_flow(shards: str, out: str, settings: PretrainConfig = PretrainConfig(), resume: bool = False,
                  work_dir: str = "vaemo-work", tracking_cfg: TrackingConfig = TrackingConfig(),
                  parent_run_id: str | None = None) -> dict:
    """Pre-train the unified AV encoder on an ingest folder's shards; the model lands in ``out``."""
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
        info = av.model_info(model_cfg)
        tracking.log_metrics_flat({"params": info["params"], "pretrain_gflops": info["pretrain_gflops"]}, "model.")
        logger.info("Stage 1 %s (%s parameters) on %s, %d steps, %d process(es)", settings.model,
                    f"{info['params']['total']:,}", shards, settings.steps, settings.processes)
        if settings.processes > 1:
            torchrun("vaemo.train.pretrain", settings, out, ["--shards", shards], uri, run.info.run_id, resume)
            metrics = model.metrics()
        else:
            metrics = stage1.pretrain(
                Path(shards), Path(out), settings, resume=resume, log_step=tracking.step_logger(uri, run.info.run_id)
            )
        tracking.log_metrics_flat({k: v for k, v in metrics.items() if v is not None})
        log_training_files(model, ("loss", "rec_video", "rec_audio", "contrastive", "lr"), "Stage 1")
        model_id = tracking.log_model_files("stage1", model.model_files(), tags={Tag.SHARDS_DIGEST: digest})
        model.write_record(model_id, run.info.run_id, uri)  # Stage 2 names it as its input
        line = (f"pretrain done: loss {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}, video->audio top-1 "
                f"{metrics['av_retrieval_top1']:.3f} (chance {metrics['av_retrieval_chance']:.3f}); model in {out}, "
                f"MLflow run {run.info.run_id}")
        create_markdown_artifact(
            key="pretrain-report", markdown=f"# Stage 1 `{settings.model}`\n\n{line}; logged model `{model_id}`."
        )
        return {**metrics, "mlflow_run_id": run.info.run_id, "model_id": model_id, "summary": line}

