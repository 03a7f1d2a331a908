"""The ``evaluate`` flow: benchmark folds, probe / fine-tune / zero-shot, metrics and figures, tracked in MLflow."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.common import gpu_stage_run, vaemo_flow
from vaemo import tracking
from vaemo.artifacts import IngestFolder, ModelFolder
from vaemo.config import EvaluateConfig, TrackingConfig
from vaemo.eval import REPORT, RESULTS, prepare
from vaemo.eval import evaluate as run_evaluation
from vaemo.eval.report import markdown as report_markdown
from vaemo.eval.report import test_set_line
from vaemo.eval.run import PREDICTIONS
from vaemo.tracking import Tag


def _metric_name(label: str) -> str:
    """A class label as an MLflow metric name part (letters, digits, _ - . space / : only)."""
    return re.sub(r"[^\w\-. /:]", "_", label)


def _table(results: dict) -> list[dict]:
    rows = []
    for fold in results["folds"] + [{"fold": "mean", **results["mean"]}]:
        row = {"fold": fold["fold"]}
        for rule in ("last", "best_val"):
            for key in ("uar", "war", "macro_f1"):
                value = fold[rule][key]
                std = fold[rule].get(f"{key}_std")
                row[f"{rule} {key}"] = f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
        rows.append(row)
    return rows


def _test_set_metrics(test_set: dict) -> dict:
    """``test_set.scored``, ``test_set.reasons.no_face``, ``fold1.test_set.not_evaluated``, ..."""

    def counts(part: dict) -> dict:
        return {**part, "reasons": {_metric_name(k): v for k, v in part["reasons"].items()}}

    return {"test_set": {**counts(test_set["total"]), "no_fold": test_set["no_fold"]},
            **{f"fold{f['fold']}.test_set": counts(f) for f in test_set["folds"]}}


def summary(results: dict, out: str, run_id: str) -> str:
    best, last = results["mean"]["best_val"], results["mean"]["last"]
    return (
        f"evaluate done over {len(results['folds'])} folds: UAR {100 * best['uar']:.2f} ± "
        f"{100 * best['uar_std']:.2f} % "
        f"(best on validation), {100 * last['uar']:.2f} ± {100 * last['uar_std']:.2f} % (last epoch); WAR "
        f"{100 * best['war']:.2f} / {100 * last['war']:.2f} %; chance UAR {100 * results['chance_uar']:.2f} %; "
        f"{test_set_line(results['test_set']['total'], 'test videos')}; {Path(out) / RESULTS}, {Path(out) / REPORT}; "
        f"MLflow run {run_id}"
    )


def check(model: str, data: str, settings: EvaluateConfig, **_) -> None:
    prepare(Path(model), Path(data), settings)


@vaemo_flow("evaluate", check)
def evaluate_flow(model: str, data: str, out: str, settings: EvaluateConfig = EvaluateConfig(),
                  work_dir: str = "vaemo-work", tracking_cfg: TrackingConfig = TrackingConfig(),
                  parent_run_id: str | None = None) -> dict:
    """Evaluate a model folder on an ingest folder under a benchmark protocol; results land in ``out``."""
    logger = get_run_logger()
    prepared = prepare(Path(model), Path(data), settings)
    plan = prepared.plan
    params = {"model": model, "data": data, "out": out, "evaluate": settings.model_dump(mode="json"),
              "fold_rule": plan.rule}
    tags = {Tag.PROTOCOL: settings.protocol, Tag.MODE: settings.mode, Tag.MODALITY: settings.modality}
    with gpu_stage_run("evaluate", work_dir, tracking_cfg, params,
                       {**tags, **tracking.child_tags(parent_run_id)}) as (run, uri):
        tracking.log_shards(IngestFolder(data), "evaluation")
        tracking.log_model_input(ModelFolder(model), "model", "model", uri)
        logger.info("%s %s on %s (%s input): %s, %d labelled clips, classes %s", settings.protocol, settings.mode, data,
                    settings.modality, plan.rule, len(plan.clips), ", ".join(plan.classes))
        progress = create_progress_artifact(progress=0.0, key="evaluate-progress", description="Share of folds done")
        live = settings.mode == "finetune"  # fine-tuning epochs are long: show each as it ends
        history: list[tuple[int, dict]] = []

        def on_epoch(fold: int, epoch: int, row: dict) -> None:
            values = {k: v for k, v in row.items() if k != "epoch"}
            if live:
                tracking.log_history(uri, run.info.run_id, [(epoch, values)], f"fold{fold}.")
            else:
                history.append((epoch, values))

        def on_fold(fold: int, folds: int, entry: dict) -> None:
            tracking.log_history(uri, run.info.run_id, history, f"fold{fold}.")
            history.clear()
            tracking.log_metrics_flat(
                                      {rule: {k: entry[rule][k] for k in ("uar", "war",
                                                                          "macro_f1")} for rule in ("last",
                                                                                                    "best_val")},
                                      f"fold{fold}.test.")
            update_progress_artifact(progress, progress=100.0 * fold / folds)
            logger.info("fold %d/%d: UAR %.2f %% (best_val), %.2f %% (last)", fold, folds,
                        100 * entry["best_val"]["uar"], 100 * entry["last"]["uar"])

        results = run_evaluation(prepared, Path(out), on_epoch=on_epoch, on_fold=on_fold)
        for rule in ("last", "best_val"):
            mean = results["mean"][rule]
            tracking.log_metrics_flat(
                {k: mean[k] for k in ("uar", "uar_std", "war", "war_std", "macro_f1", "macro_f1_std")}, f"{rule}."
            )
            recall = {_metric_name(k): v for k, v in mean["per_class_recall"].items() if v is not None}
            tracking.log_metrics_flat({"per_class_recall": recall}, f"{rule}.")
        tracking.log_metrics_flat(
            {"chance_uar": results["chance_uar"], "model.encoder_params": results["model"]["encoder_params"],
             "data.lost_samples": results["data"]["lost_samples"]}
        )
        tracking.log_metrics_flat(_test_set_metrics(results["test_set"]))
        outputs = Path(out)
        tracking.log_files(
            [outputs / RESULTS, outputs / REPORT, outputs / PREDICTIONS]
            + [outputs / name for name in results["figures"]]
        )
        tracking.log_files([outputs / name for name in results["fold_files"]], artifact_path="folds")
        create_table_artifact(
            key="evaluate-results",
            table=_table(results),
            description=f"{settings.protocol} {settings.mode} ({settings.modality}): per fold and mean, %",
        )
        create_markdown_artifact(key="evaluate-report", markdown=report_markdown(results, embed_figures_from=outputs),
                                 description="Evaluation report")
        return {"mean": results["mean"], "chance_uar": results["chance_uar"], "folds": len(results["folds"]),
                "out": out, "mlflow_run_id": run.info.run_id, "summary": summary(results, out, run.info.run_id)}
