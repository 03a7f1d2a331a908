"""The ``align`` flow: Stage 2 on the Stage 1 model and the pinned captions, in-process or under torchrun,
tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import gpu_stage_run, torchrun, training_progress, vaemo_flow
from flows.pretrain import log_training_files
from vaemo import tracking
from vaemo.align import train as stage2
from vaemo.align.data import load_captions
from vaemo.artifacts import IngestFolder, ModelFolder, TableVersion
from vaemo.config import AlignConfig, TrackingConfig
from vaemo.model import av
from vaemo.tracking import Tag


def summary(metrics: dict, out: str, run_id: str) -> str:
    m = metrics
    return (
        f"align done: loss {m['loss_first']:.4f} -> {m['loss_last']:.4f} (global {m['global_first']:.4f} -> "
        f"{m['global_last']:.4f}, modality {m['modality_first']:.4f} -> {m['modality_last']:.4f}); AV->description "
        "top-1 "
        f"{m['text_retrieval_top1']:.3f} (before {m.get('init_text_retrieval_top1', float('nan')):.3f}, chance "
        f"{m['text_retrieval_chance']:.3f}) on {m['text_retrieval_clips']} captioned clips; model in {out}, MLflow "
        f"run {run_id}"
    )


def check(shards: str, db: str, init: str, settings: AlignConfig, **_) -> None:
    IngestFolder(shards).shard_urls()
    ModelFolder(init).require("--init", "`vaemo pretrain`")
    av.load_config(init)
    load_captions(db, shards, settings)


@vaemo_flow("align", check)
def align_flow(shards: str, db: str, init: str, out: str, settings: AlignConfig = AlignConfig(), resume: bool = False,
               work_dir: str = "vaemo-work", tracking_cfg: TrackingConfig = TrackingConfig(),
               parent_run_id: str | None = None) -> dict:
    """Align the Stage 1 model ``init`` with the captions in ``db`` (pinned tag); the aligned model lands in ``out``."""
    logger = get_run_logger()
    ingest, stage1, model = IngestFolder(shards), ModelFolder(init), ModelFolder(out)
    captions = load_captions(db, shards, settings)  # pins the tag now, so every process reads the same version
    settings = settings.model_copy(update={"caption_tag": captions.tag})
    params = {"shards": shards, "db": db, "init": init, "out": out, "resume": resume,
              "align": settings.model_dump(mode="json"), "caption_tag": captions.tag,
              "caption_version": captions.version, "text_encoder": captions.text_encoder}
    with gpu_stage_run("align", work_dir, tracking_cfg, params, tracking.child_tags(parent_run_id),
                       gpus=settings.processes) as (run, uri):
        digest = tracking.log_shards(ingest, "training")
        tracking.log_table_version("captions", captions.pinned, context="training")
        stage1_id = tracking.log_model_input(stage1, "stage1_model", "stage1", uri)
        logger.info("Stage 2 from %s on %d captioned clips (%s, tag %s, %d skipped: not ok), %d steps, %d process(es)",
                    init, captions.counts["captions_ok"], db, captions.tag, captions.counts["captions_skipped"],
                    settings.steps, settings.processes)
        with training_progress("align-progress", "Stage 2", out, settings.steps):
            if settings.processes > 1:
                torchrun("vaemo.align.train", settings, out, ["--shards", shards, "--db", db, "--init", init], uri,
                         run.info.run_id, resume)
                metrics = model.metrics()
            else:
                with tracking.step_logger(uri, run.info.run_id) as log_step:
                    metrics = stage2.align(Path(shards), db, Path(init), Path(out), settings, resume=resume,
                                           log_step=log_step)
        tracking.log_metrics_flat({k: v for k, v in metrics.items() if v is not None and k != "captions"})
        tracking.log_metrics_flat(metrics["captions"], "captions.")
        if metrics.get("embeddings"):
            emb = metrics["embeddings"]
            tracking.log_output_table(emb["table"], TableVersion(db, emb["table"], emb["tag"], emb["version"]))
        log_training_files(model, ("loss", "global", "modality", "rec", "temperature", "lr"), "Stage 2", settings)
        tags = {Tag.SHARDS_DIGEST: digest, Tag.CAPTIONS_TAG: captions.tag,
                **({Tag.STAGE1_MODEL_ID: stage1_id} if stage1_id else {})}
        model_id = tracking.log_model("stage2", model, tracking.registered_name(tracking_cfg.experiment, "stage2"),
                                      tracking.pipeline_alias(parent_run_id), tags=tags)
        model.write_record(model_id, run.info.run_id, uri)
        line = summary(metrics, out, run.info.run_id)
        create_markdown_artifact(key="align-report", markdown=(
            f"# Stage 2 alignment\n\n{line}; captions `{captions.tag}` (version {captions.version}), "
            f"{captions.counts['captions_skipped']} skipped (not ok); logged model `{model_id}`."))
        return {**metrics, "mlflow_run_id": run.info.run_id, "model_id": model_id, "summary": line}
