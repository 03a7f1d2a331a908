"""The ``caption`` flow: chain-of-thought affective descriptions for a subset of clips, into LanceDB."""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from tqdm import tqdm

from flows.common import gpu_stage_run, vaemo_flow
from vaemo import tracking
from vaemo.artifacts import IngestFolder, TableVersion
from vaemo.caption.replicas import gpus_used
from vaemo.caption.run import CaptionRun, check_settings
from vaemo.config import CaptionConfig, TrackingConfig


def check(shards: str, settings: CaptionConfig, **_) -> None:
    IngestFolder(shards).shard_urls()
    check_settings(settings)


@vaemo_flow("caption", check)
def caption_flow(shards: str, db: str, settings: CaptionConfig = CaptionConfig(), force: bool = False,
                 work_dir: str = "vaemo-work", tracking_cfg: TrackingConfig = TrackingConfig(),
                 parent_run_id: str | None = None) -> dict:
    """Describe the selected clips of an ingest folder with a multimodal LLM; rows land in ``db``."""
    logger = get_run_logger()
    ingest = IngestFolder(shards)
    params = {"shards": shards, "db": db, "force": force, "caption": settings.model_dump(mode="json")}
    start = time.perf_counter()
    with gpu_stage_run("caption", work_dir, tracking_cfg, params, tracking.child_tags(parent_run_id),
                       gpus=gpus_used(settings)) as (mlrun, _):
        tracking.log_shards(ingest, "input")
        with CaptionRun(shards, db, settings, force) as run:
            tracking.log_files([run.prompt.path], artifact_path="prompt")
            tracking.log_params(
                {"prompt_version": run.prompt_version, "prompt_digest": run.prompt.digest, "model_key": run.model}
            )
            plan = run.plan()
            logger.info("%d clips selected, %d already described, %d to describe from %d shard(s) in chunks of %d",
                        len(plan.selected), plan.already_stored, plan.clips_todo, len(plan.todo),
                        settings.batch_clips)
            progress = create_progress_artifact(0.0, key="caption-progress", description="clips described")
            if plan.todo:
                with tqdm(total=plan.clips_todo, desc="caption", unit="clip") as bar, run.generators() as generators:
                    def stored(counts: dict[str, int]) -> None:
                        bar.update(sum(counts.values()))
                        update_progress_artifact(progress, 100.0 * bar.n / plan.clips_todo)
                        logger.info("chunk stored: %s", counts)

                    run.caption_all(plan, generators, stored)
            summary = run.finalize(plan, time.perf_counter() - start)
            sample = run.sample_rows()
        tracking.log_metrics_flat(
            {k: summary[k] for k in ("selected", "captioned_now", "already_stored", "generated_tokens", "lost_samples")}
        )
        tracking.log_metrics_flat(summary["status_counts"], "status.")
        tracking.log_metrics_flat(
            {k: summary[k] for k in ("clips_per_second", "tokens_per_second") if summary[k] is not None}
        )
        # requests per generate call, clips/s and tokens/s per replica and in total, the share spent waiting
        tracking.log_metrics_flat(summary["engines"], "engine.")
        tracking.log_output_table("captions", TableVersion(db, summary["table"], summary["tag"], summary["version"]))
        tracking.log_json(summary, "caption_summary.json")
        if not sample.empty:
            tracking.log_table(sample.astype(str), "caption_samples.json")
            create_table_artifact(key="caption-samples", table=sample.astype(str).to_dict(orient="records"),
                                  description="descriptions written by this run")
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["status_counts"].items()))
        line = (
            f"caption done: {summary['selected']} clips selected ({counts}), {summary['captioned_now']} described now; "
            f"LanceDB {db} table {summary['table']} tag {summary['tag']}; MLflow run {mlrun.info.run_id}"
        )
        create_markdown_artifact(
            key="caption-report",
            markdown=(
                f"# Captions `{summary['prompt_version']}` by `{summary['model']}`\n\n{line} (version "
                f"{summary['version']})."
            ),
        )
        return {**summary, "mlflow_run_id": mlrun.info.run_id, "summary": line}
