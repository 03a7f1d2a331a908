"""Kill real ingest runs with SIGKILL at different moments; the re-run leaves every clip exactly once."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import webdataset as wds

from tests.conftest import cli_env, vaemo_command

TIMEOUT = 600


def start(work: Path, source: Path, config: Path) -> subprocess.Popen:
    args = vaemo_command("--config", str(config), "--work-dir", str(work), "ingest", str(source), "--dataset",
                         "generic", "--out", str(work / "out"))
    # A session of its own, so the kill reaches the Dask workers and the Prefect server too.
    log_path = work.parent / f"run-{time.monotonic_ns()}.log"  # read when a run ends early
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            args, env=cli_env(work), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    process.log_path = log_path
    return process


def kill_when(process: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert process.poll() is None, f"the run ended before {what}: {process.log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_runs_resume_without_losing_or_duplicating_clips(corpus, bad_cases, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for path in sorted(corpus.glob("*.mp4")):
        shutil.copy(path, source / path.name)
    for case in ("several_faces", "rotated", "variable_fps", "non_ascii_name", "no_face"):
        shutil.copy(bad_cases[case], source / bad_cases[case].name)
    config = tmp_path / "pipelines.yaml"
    config.write_text("stages:\n  ingest:\n    videos_per_batch: 1\ndask:\n  workers: 2\n")
    work, out = tmp_path / "work", tmp_path / "work" / "out"

    # Kill 1: right after the first batch committed.
    kill_when(start(work, source, config), lambda: any((out / "batches").glob("*.json")), "a committed batch")
    committed = len(list((out / "batches").glob("*.json")))
    assert committed >= 1 and not (out / "manifest.parquet").exists()

    # Kill 2: while a batch is being written (a shard under .tmp), after at least one more commit.
    kill_when(
        start(work, source, config),
        lambda: len(list((out / "batches").glob("*.json"))) > committed and any((out / ".tmp").glob("*/*.tar")),
        "a shard in progress",
    )

    final = subprocess.run(
        vaemo_command("--config", str(config), "--work-dir", str(work), "ingest", str(source), "--dataset", "generic",
                      "--out", str(out)),
        env=cli_env(work),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == len(list(source.iterdir())) and "pending" not in set(manifest["status"])
    assert stats["last_run"]["skipped_videos"] >= committed + 1  # earlier work was kept, not redone

    keys = [
        s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False)
    ]
    assert len(keys) == len(set(keys)), "a clip was written twice"
    expected = set(pd.read_parquet(out / "clips.parquet")["clip_id"])
    assert set(keys) == expected and len(keys) == manifest["n_clips"].sum() == stats["clips"]
    assert manifest.loc[manifest.status == "ok", "n_clips"].gt(0).all() and (manifest.status == "ok").sum() == 7
    listed = {s["name"] for p in (out / "batches").glob("*.json") for s in json.loads(p.read_text())["shards"]}
    assert listed == {p.name for p in (out / "shards").glob("*.tar")}
    assert not list((out / ".tmp").glob("*"))
