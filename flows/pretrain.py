"""The ``pretrain`` flow: Stage 1 on the ingest shards, in-process or under torchrun, tracked in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import gpu_stage_run, torchrun
from vaemo import tracking
from vaemo.config import PretrainConfig, TrackingConfig
from vaemo.ingest.run import shard_set_digest
from vaemo.ingest.shards import load_markers
from vaemo.model import av
from vaemo.plots import training_curves
from vaemo.train import pretrain as stage1
from vaemo.train.loop import CHECKPOINTS, read_step_log


@flow(name="pretrain", log_prints=True)
def pretrain_flow(
    shards: str,
    out: str,
    settings: PretrainConfig = PretrainConfig(),
    resume: bool = False,
    work_dir: str = "vaemo-work",
    tracking_cfg: TrackingConfig = TrackingConfig(),
    parent_run_id: str | None = None,
) -> dict:
    """Pre-train the unified AV encoder on an ingest folder's shards; the model lands in ``out``."""
    logger = get_run_logger()
    digest = shard_set_digest(load_markers(Path(shards)))
    model_cfg = stage1.model_config(settings)
    params = {"shards": shards, "out": out, "resume": resume, "pretrain": settings.model_dump(), "model": model_cfg.model_dump(),
              "audio_norm": f"mean={model_cfg.audio_mean} std={model_cfg.audio_std} double_std={model_cfg.audio_double_std}"}
    with gpu_stage_run("pretrain", work_dir, tracking_cfg, params, tracking.child_tags(parent_run_id)) as (run, uri):
        tracking.log_dataset("shards", Path(shards) / "shards", digest, context="training")
        info = av.model_info(model_cfg)
        tracking.log_metrics_flat({"params": info["params"], "pretrain_gflops": info["pretrain_gflops"]}, "model.")
        logger.info("Stage 1 %s (%s parameters) on %s, %d steps, %d process(es)", settings.model,
                    f"{info['params']['total']:,}", shards, settings.steps, settings.processes)
        if settings.processes > 1:
            torchrun("vaemo.train.pretrain", settings, out, ["--shards", shards], uri, run.info.run_id, resume)
            metrics = json.loads((Path(out) / stage1.METRICS).read_text())
        else:
            metrics = stage1.pretrain(Path(shards), Path(out), settings, resume=resume, log_step=tracking.step_logger(uri, run.info.run_id))
        tracking.log_metrics_flat({k: v for k, v in metrics.items() if v is not None})
        tracking.log_figure(training_curves(read_step_log(Path(out)), ("loss", "rec_video", "rec_audio", "contrastive", "lr"), "Stage 1"), "training_curves.png")
        tracking.log_files(sorted((Path(out) / CHECKPOINTS).glob("*.pt")), artifact_path=CHECKPOINTS)
        tracking.log_files([Path(out) / stage1.METRICS])
        model_files = [Path(out) / av.WEIGHTS_FILE, Path(out) / av.CONFIG_FILE]
        model_id = tracking.log_model_files("stage1", model_files, tags={"vaemo.shards.digest": digest})
        tracking.write_model_record(Path(out), model_id, run.info.run_id, uri)  # Stage 2 names it as its input
        create_markdown_artifact(
            key="pretrain-report",
            markdown=(f"# Stage 1 `{settings.model}`\n\nloss {metrics['loss_first']:.4f} → {metrics['loss_last']:.4f}; "
                      f"video→audio top-1 {metrics['av_retrieval_top1']:.3f} (chance {metrics['av_retrieval_chance']:.3f}); "
                      f"MLflow run `{run.info.run_id}`, logged model `{model_id}`."),
        )
        return {**metrics, "mlflow_run_id": run.info.run_id, "model_id": model_id}

