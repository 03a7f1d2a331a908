"""`vaemo run --config pipelines.yaml --pipeline NAME`: all five stages as subflows of one flow, one MLflow parent
run with a child run per stage, skipping on a re-run, and `vaemo lineage` from the evaluation back to shards,
captions and Stage 1."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import mlflow

from tests.conftest import cli_env, fast_stages, own_prefect_server, vaemo_command

TIMEOUT = 600
STAGES = ["align", "caption", "evaluate", "ingest", "pretrain"]


def write_config(
    path: Path, work: Path, source: Path, labels: Path, tiny_mllm: Path, short_prompt: Path, folds: int
) -> Path:
    config = {
        "work_dir": str(work),
        "dask": {"workers": 1},
        "corpora": {"labelled": {"path": str(source), "dataset": "generic", "labels": str(labels)}},
        "stages": fast_stages(tiny_mllm, short_prompt),
        "pipelines": {
            "full": {"corpora": ["labelled"], "stages": ["ingest", "pretrain", "caption", "align", "evaluate"],
                     "stage_overrides": {"evaluate": {"folds": folds}}}
        },
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def run_pipeline(config: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(vaemo_command("run", "--config", str(config), "--pipeline", "full"), capture_output=True,
                          text=True, env=env, timeout=TIMEOUT)


def children(client: mlflow.MlflowClient, parent: str) -> dict[str, mlflow.entities.Run]:
    experiment = client.get_experiment_by_name("vaemo")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    found = {run.data.tags["vaemo.stage"]: run for run in runs}
    assert len(found) == len(runs), [r.data.tags["vaemo.stage"] for r in runs]
    return found


def parent_of(done: subprocess.CompletedProcess) -> str:
    return re.search(r"pipeline full done: MLflow run (\w+)", done.stdout).group(1)


def test_pipeline_fails_resumes_skips_and_walks_lineage(labelled_source, tiny_mllm, short_prompt, tmp_path):
    source, labels = labelled_source
    work = tmp_path / "work"
    env = cli_env(work)
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    root = work / "pipelines" / "full"

    # 1. Five folds over three speakers: evaluation fails after the other stages ran.
    failing = run_pipeline(
        write_config(tmp_path / "failing.yaml", work, source, labels, tiny_mllm, short_prompt, folds=5), env
    )
    assert failing.returncode == 1, failing.stdout[-4000:] + failing.stderr[-4000:]
    assert "vaemo: pipeline full did not complete: stage evaluate failed" in failing.stderr
    experiment = client.get_experiment_by_name("vaemo")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`vaemo.stage` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    failed_parent = parents[0]
    assert (
        failed_parent.data.tags["vaemo.failed_stage"] == "evaluate" and failed_parent.data.tags["prefect.flow_run_id"]
    )
    assert "prefect.deployment" in failed_parent.data.tags
    runs = children(client, failed_parent.info.run_id)
    assert sorted(runs) == STAGES, sorted(runs)
    assert runs["evaluate"].info.status == "FAILED" and "speakers" in runs["evaluate"].data.tags["vaemo.error"]
    assert all(
        runs[s].info.status == "FINISHED" and runs[s].data.tags.get("vaemo.skipped") != "true"
        for s in STAGES
        if s != "evaluate"
    )
    assert all(
        (root / part / "stage.json").is_file() for part in ("corpora/labelled", "stage1", "captions-db", "stage2")
    )
    assert not (root / "eval" / "stage.json").exists()
    shards = sorted((root / "corpora" / "labelled" / "shards").glob("*.tar"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    assert shards

    # 2. Fixed: the re-run resumes at evaluation; every earlier stage is skipped.
    config = write_config(tmp_path / "pipelines.yaml", work, source, labels, tiny_mllm, short_prompt, folds=3)
    resumed = run_pipeline(config, env)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    parent = parent_of(resumed)
    assert client.get_run(parent).info.status == "FINISHED"
    second = children(client, parent)
    assert sorted(second) == STAGES
    assert all(second[s].data.tags.get("vaemo.skipped") == "true" for s in STAGES if s != "evaluate")
    assert second["evaluate"].data.tags.get("vaemo.skipped") != "true" and second["evaluate"].info.status == "FINISHED"
    assert second["pretrain"].data.tags["vaemo.skipped.reused_run_id"] == runs["pretrain"].info.run_id

    # 3. Nothing changed: everything is skipped, no shard is written.
    again = run_pipeline(config, env)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    third = children(client, parent_of(again))
    assert sorted(third) == STAGES and all(r.data.tags.get("vaemo.skipped") == "true" for r in third.values())
    assert third["evaluate"].data.tags["vaemo.skipped.reused_run_id"] == second["evaluate"].info.run_id
    assert {p.name: p.stat().st_mtime_ns for p in (root / "corpora" / "labelled" / "shards").glob("*.tar")} == stamps

    # lineage: from the evaluation back to the exact shards, captions and Stage 1 model
    shard_digest = runs["ingest"].data.tags["vaemo.output.shards.digest"]
    captions_tag = json.loads((root / "captions-db" / "stage.json").read_text())["result"]["tag"]
    stage1_id = runs["pretrain"].data.tags["vaemo.output.model.stage1"]
    for run_id in (second["evaluate"].info.run_id, third["evaluate"].info.run_id):
        shown = subprocess.run(vaemo_command("--work-dir", str(work), "lineage", run_id), capture_output=True,
                               text=True, env=env, timeout=120)
        assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
        out = shown.stdout
        assert shard_digest in out and captions_tag in out and stage1_id in out, out
        for stage in ("evaluate run", "align run", "caption run", "pretrain run", "ingest run"):
            assert stage in out, out


def test_prefect_shows_each_step_its_mlflow_run_and_the_library_warnings(corpus, tmp_path, monkeypatch):
    """A short pipeline, failing at evaluation (it has no model), then with ingest only: each pipeline flow run
    links its MLflow parent run and tables its steps, flow runs are named by pipeline and time, and a warning of
    the library (a label row naming no video) is in the ingest flow run's logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from vaemo.config import TrackingConfig

    work = tmp_path / "work"
    labels = tmp_path / "labels.csv"
    labels.write_text("path\n" + "".join(f"{p.name}\n" for p in sorted(corpus.glob("*.mp4"))) + "gone.mp4\n")

    def config(stages: list[str]) -> Path:
        path = tmp_path / f"{len(stages)}-stages.yaml"
        path.write_text(json.dumps({
            "work_dir": str(work), "dask": {"workers": 1},
            "corpora": {"c": {"path": str(corpus), "dataset": "generic", "labels": str(labels)}},
            "pipelines": {"short": {"corpora": ["c"], "stages": stages}}}))
        return path

    with own_prefect_server(work, monkeypatch) as (server, env):
        runs = [subprocess.run(vaemo_command("run", "--config", str(config(stages)), "--pipeline", "short"),
                               capture_output=True, text=True, env=env, timeout=TIMEOUT)
                for stages in (["ingest", "evaluate"], ["ingest"])]
        assert [r.returncode for r in runs] == [1, 0], [r.stdout[-3000:] + r.stderr[-3000:] for r in runs]

        mlflow_client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        experiment = mlflow_client.get_experiment_by_name("vaemo").experiment_id
        parents = mlflow_client.search_runs([experiment], "tags.`vaemo.stage` = 'pipeline'",
                                            order_by=["attributes.start_time ASC"])
        failed_steps, skipped_steps = (children(mlflow_client, p.info.run_id) for p in parents)
        ingest_run = failed_steps["ingest"]

        def url(run_id: str) -> str:
            return TrackingConfig().run_url(work, experiment, run_id)

        with temporary_settings(updates={PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:

            def artifacts(flow_run_id: str) -> dict:
                found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
                return {a.key: a for a in found}

            expected_rows = [
                [{"stage": "ingest", "corpus": "c", "outcome": "ran", "mlflow_run": url(ingest_run.info.run_id)},
                 {"stage": "evaluate", "corpus": "", "outcome": "failed",
                  "mlflow_run": url(failed_steps["evaluate"].info.run_id)}],
                [{"stage": "ingest", "corpus": "c", "outcome": f"skipped (reusing run {ingest_run.info.run_id})",
                  "mlflow_run": url(skipped_steps["ingest"].info.run_id)}]]
            for parent, rows in zip(parents, expected_rows, strict=True):
                flow_run_id = parent.data.tags["prefect.flow_run_id"]
                assert re.fullmatch(r"short-\d{4}-\d\d-\d\dT\d\d:\d\d", client.read_flow_run(flow_run_id).name)
                published = artifacts(flow_run_id)
                assert published["pipeline-mlflow-run"].data == (
                    f"[MLflow run {parent.info.run_id} (pipeline short)]({url(parent.info.run_id)})")
                table = json.loads(published["pipeline-steps"].data)
                assert [{k: v for k, v in row.items() if k != "seconds"} for row in table] == rows, table
                assert all(row["seconds"] >= 0 for row in table)
            assert json.loads(artifacts(parents[0].data.tags["prefect.flow_run_id"])["pipeline-steps"].data)[0][
                "seconds"] > 0, "ingest took time"

            ingest_flow_run = ingest_run.data.tags["prefect.flow_run_id"]
            assert re.fullmatch(r"short-ingest:c-\d{4}-\d\d-\d\dT\d\d:\d\d", client.read_flow_run(ingest_flow_run).name)
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[ingest_flow_run])))
            warnings = [log for log in logs if log.name.startswith("vaemo.") and log.level >= logging.WARNING]
            assert any("1 rows of" in log.message and "'gone.mp4'" in log.message for log in warnings), [
                (log.name, log.message) for log in logs]
