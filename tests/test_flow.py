"""The real `vaemo ingest` command: a Prefect flow on Dask, MLflow in SQLite, and clear refusals."""

import json
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import ROOT, cli_env, own_prefect_server, vaemo_command
from vaemo.config import IngestConfig
from vaemo.ingest.run import IngestRun

TIMEOUT = 600


def vaemo(work: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(vaemo_command("--work-dir", str(work), *args), capture_output=True, text=True,
                          timeout=TIMEOUT, env=env or cli_env(work))


@pytest.fixture(scope="module")
def source(corpus, bad_cases, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flow-src")
    for path in sorted(corpus.glob("*.mp4")):
        shutil.copy(path, folder / path.name)
    for case in ("zero_byte", "silent_audio", "spaces_and_quotes", "flv_mp3"):
        shutil.copy(bad_cases[case], folder / bad_cases[case].name)
    return folder


def test_ingest_command_runs_the_flow_and_tracks_it(source, tmp_path):
    work = tmp_path / "work"
    done = vaemo(work, "ingest", str(source), "--dataset", "generic", "--out", str(work / "out"), "--workers", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    stats = json.loads((work / "out" / "stats.json").read_text())
    assert stats["status_counts"] == {"empty_file": 1, "ok": 5, "silent_audio": 1}
    assert f"{stats['clips']} clips" in done.stdout

    # Prefect: a completed flow run with its progress, table and report artifacts.
    db = sqlite3.connect(work / "prefect" / "prefect.db")
    assert db.execute("select state_type from flow_run where name is not null").fetchall() == [("COMPLETED",)]
    [(name,)] = db.execute("select name from flow_run").fetchall()
    assert re.fullmatch(r"ingest-\d{4}-\d\d-\d\dT\d\d:\d\d", name), "named after the stage and its start"
    keys = {row[0] for row in db.execute("select key from artifact")}
    assert {"ingest-progress", "ingest-stats", "ingest-report"} <= keys
    task_states = [row[0] for row in db.execute("select state_type from task_run")]
    assert task_states and set(task_states) == {"COMPLETED"} and len(task_states) == stats["batches"]

    # MLflow: one finished run with the config, stats, manifest and the shard set with its digest.
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["vaemo"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["ingest.crop_size"] == "160" and run.data.metrics["clips"] == stats["clips"]
    assert run.data.tags["vaemo.output.shards.digest"] == stats["shard_set_digest"]
    assert run.data.tags["prefect.flow_run_id"]
    assert run.inputs.dataset_inputs == [] and run.data.tags["vaemo.output.shards.clips"] == str(stats["clips"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"manifest.parquet", "stats.json", "ingest_config.json"} <= artifacts
    assert (work / "mlartifacts").is_dir()  # artifacts live beside the store, not in the cwd

    # The same command again does no work.
    again = vaemo(work, "ingest", str(source), "--dataset", "generic", "--out", str(work / "out"), "--workers", "2")
    assert (
        again.returncode == 0
        and json.loads((work / "out" / "stats.json").read_text())["last_run"]["processed_videos"] == 0
    )


def test_bad_arguments_get_a_message_not_a_traceback(tmp_path, source):
    work = tmp_path / "work"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no videos here")
    for args, expected in [(["ingest", str(empty), "--out", str(tmp_path / "o")], "no video"),
                           (["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "does not exist"),
                           (
                            ["--config", str(tmp_path / "nope.yaml"), "ingest", str(empty), "--out",
                             str(tmp_path / "o")],
                            "not found"),
                           (["serve", "--config", str(ROOT / "pipelines.yaml")], "needs a running prefect server")]:
        done = vaemo(work, *args)
        assert done.returncode == 2 and expected in done.stderr.lower(), done.stderr
        assert "Traceback" not in done.stderr

    busy_out = tmp_path / "busy"
    with IngestRun(source, busy_out, "generic", IngestConfig()):
        done = vaemo(work, "ingest", str(source), "--dataset", "generic", "--out", str(busy_out))
    assert done.returncode == 2 and "another ingest run" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_ingest_on_an_existing_dask_cluster(source, tmp_path, monkeypatch):
    """A cluster started elsewhere (here: a separate LocalCluster) runs the batch tasks."""
    from distributed import Client, LocalCluster

    work = tmp_path / "work"
    with own_prefect_server(work, monkeypatch) as (server, env):
        monkeypatch.setenv("PREFECT_API_URL", server.api_url)  # the cluster's workers report here too
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                worker_pids = set(client.run(os.getpid).values())
                done = vaemo(work, "ingest", str(source), "--dataset", "generic", "--out", str(work / "out"),
                             "--dask-address", cluster.scheduler_address, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    markers = [json.loads(p.read_text()) for p in (work / "out" / "batches").glob("*.json")]
    assert markers and {m["worker_pid"] for m in markers} <= worker_pids
    assert pd.read_parquet(work / "out" / "manifest.parquet")["status"].eq("ok").sum() == 5
