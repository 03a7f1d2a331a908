"""A training stage's progress artifact (flows/common.py) follows the step log the training loop writes, in this
process or another one (torchrun's ranks), and the log's last step is read from its end."""

import json
import threading
import time

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows import common
from tests.conftest import own_prefect_server
from vaemo.artifacts import ModelFolder
from vaemo.train.loop import last_logged_step


def test_last_logged_step_reads_the_last_whole_line(tmp_path):
    assert last_logged_step(tmp_path) == 0  # no log yet
    log = tmp_path / ModelFolder.STEP_LOG
    rows = [json.dumps({"step": step, "loss": 1.0 / step, "note": "x" * 300}) for step in range(1, 40)]
    log.write_text("".join(row + "\n" for row in rows))  # longer than the tail it reads
    assert last_logged_step(tmp_path) == 39
    with open(log, "a") as handle:
        handle.write('{"step": 40, "lo')  # a line being written
    assert last_logged_step(tmp_path) == 39


def latest(key: str):
    with get_client(sync_client=True) as client:
        return client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))[0]


def test_progress_artifact_follows_the_step_log(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.2)
    out = tmp_path / "model"
    out.mkdir()
    seen = []

    def train(steps: int) -> None:  # what the training loop writes, one line per logged step
        for step in range(1, steps + 1):
            with open(out / ModelFolder.STEP_LOG, "a") as handle:
                handle.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
            if step == 3:  # the artifact moves while the training runs (a busy machine may take a while)
                deadline = time.monotonic() + 60
                while (shown := latest("stage-progress").description).endswith("step 0 of 8") and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)
                seen.append(shown)

    @flow
    def training() -> None:
        with common.training_progress("stage-progress", "Stage 1", str(out), total=8):
            worker = threading.Thread(target=train, args=(6,))  # stopped before the end, as a failed run is
            worker.start()
            worker.join()

    with own_prefect_server(tmp_path, monkeypatch) as (server, env):
        monkeypatch.setenv("PREFECT_API_URL", env["PREFECT_API_URL"])
        training()
        final = latest("stage-progress")
    assert seen[0] in [f"Stage 1: step {step} of 8" for step in (1, 2, 3)], seen  # followed while it ran
    assert final.type == "progress" and final.data == 75.0 and final.description == "Stage 1: step 6 of 8"
