"""The ``align`` flow: Stage 2 on the Stage 1 model and the pinned captions, in-process or under torchrun, tracked in MLflow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import gpu_stage_run, torchrun
from vaemo import tracking
from vaemo.align import model as aligned
from vaemo.align import train as stage2
from vaemo.align.data import load_captions
from vaemo.config import AlignConfig, TrackingConfig
from vaemo.ingest.run import shard_set_digest
from vaemo.ingest.shards import load_markers
from vaemo.model import av
from vaemo.plots import training_curves
from vaemo.train.loop import CHECKPOINTS, read_step_log


def folder_digest(folder: Path, names: tuple[str, ...] = (av.WEIGHTS_FILE, av.CONFIG_FILE)) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def log_stage1_input(init: Path, tracking_uri: str) -> str | None:
    """The Stage 1 model as an input (context "init"): the digest of its files, and its logged model id when the
    folder names one in this store (open-source MLflow takes logged models as run inputs only on Databricks, so
    the id is a tag of that input, of the run and of the Stage 2 logged model)."""
    digest = folder_digest(init)
    model_id = tracking.read_model_record(init, tracking_uri)
    tracking.log_dataset("stage1_model", init, digest, context="init", extra_tags={"vaemo.stage1.model_id": model_id} if model_id else None)
    tracking.set_tags({"vaemo.input.stage1.digest": digest, "vaemo.input.stage1.dir": str(init.resolve()),
                       **({"vaemo.input.stage1.model_id": model_id} if model_id else {})})
    return model_id


@flow(name="align", log_prints=True)
def align_flow(
    shards: str,
    db: str,
    init: str,
    out: str,
    settings: AlignConfig = AlignConfig(),
    resume: bool = False,
    work_dir: str = "vaemo-work",
    tracking_cfg: TrackingConfig = TrackingConfig(),
    parent_run_id: str | None = None,
) -> dict:
    """Align the Stage 1 model ``init`` with the captions in ``db`` (pinned tag); the aligned model lands in ``out``."""
    logger = get_run_logger()
    digest = shard_set_digest(load_markers(Path(shards)))
    captions = load_captions(db, shards, settings)  # pins the tag now, so every process reads the same version
    settings = settings.model_copy(update={"caption_tag": captions.tag})
    params = {"shards": shards, "db": db, "init": init, "out": out, "resume": resume, "align": settings.model_dump(mode="json"),
              "caption_tag": captions.tag, "caption_version": captions.version, "text_encoder": captions.text_encoder}
    with gpu_stage_run("align", work_dir, tracking_cfg, params, tracking.child_tags(parent_run_id)) as (run, uri):
        tracking.log_dataset("shards", Path(shards) / "shards", digest, context="training")
        tracking.log_lancedb("captions", Path(db), captions.table, captions.tag, captions.version, context="training")
        stage1_id = log_stage1_input(Path(init), uri)
        logger.info("Stage 2 from %s on %d captioned clips (%s, tag %s, %d skipped: not ok), %d steps, %d process(es)",
                    init, captions.counts["captions_ok"], db, captions.tag, captions.counts["captions_skipped"], settings.steps,
                    settings.processes)
        if settings.processes > 1:
            torchrun("vaemo.align.train", settings, out, ["--shards", shards, "--db", db, "--init", init], uri, run.info.run_id, resume)
            metrics = json.loads((Path(out) / stage2.METRICS).read_text())
        else:
            metrics = stage2.align(Path(shards), db, Path(init), Path(out), settings, resume=resume,
                                   log_step=tracking.step_logger(uri, run.info.run_id))
        tracking.log_metrics_flat({k: v for k, v in metrics.items() if v is not None and k != "captions"})
        tracking.log_metrics_flat(metrics["captions"], "captions.")
        if metrics.get("embeddings"):
            emb = metrics["embeddings"]
            tracking.log_lancedb(emb["table"], Path(db), emb["table"], emb["tag"], emb["version"], context="output")
        tracking.log_figure(training_curves(read_step_log(Path(out)), ("loss", "global", "modality", "rec", "temperature", "lr"), "Stage 2"),
                            "training_curves.png")
        tracking.log_files(sorted((Path(out) / CHECKPOINTS).glob("*.pt")), artifact_path=CHECKPOINTS)
        tracking.log_files([Path(out) / stage2.METRICS])
        files = [Path(out) / name for name in (av.WEIGHTS_FILE, av.CONFIG_FILE, aligned.HEADS_FILE, aligned.ALIGNMENT_FILE)]
        tags = {"vaemo.shards.digest": digest, "vaemo.captions.tag": captions.tag, **({"vaemo.stage1.model_id": stage1_id} if stage1_id else {})}
        model_id = tracking.log_model_files("stage2", files, tags=tags)
        tracking.write_model_record(Path(out), model_id, run.info.run_id, uri)
        create_markdown_artifact(
            key="align-report",
            markdown=(f"# Stage 2 alignment\n\nloss {metrics['loss_first']:.4f} → {metrics['loss_last']:.4f} (global "
                      f"{metrics['global_first']:.4f} → {metrics['global_last']:.4f}, modality {metrics['modality_first']:.4f} → "
                      f"{metrics['modality_last']:.4f}); AV→description top-1 {metrics['text_retrieval_top1']:.3f} (before "
                      f"{metrics.get('init_text_retrieval_top1', float('nan')):.3f}, chance {metrics['text_retrieval_chance']:.3f}) on "
                      f"{metrics['text_retrieval_clips']} captioned clips; captions `{captions.tag}` (version {captions.version}), "
                      f"{captions.counts['captions_skipped']} skipped (not ok); MLflow run `{run.info.run_id}`, logged model `{model_id}`."),
        )
        return {**metrics, "mlflow_run_id": run.info.run_id, "model_id": model_id}
