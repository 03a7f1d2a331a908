"""Stage 1 end to end on real shards: CLI + flow + MLflow, kill-and-resume, DDP on gloo, embeddings."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.conftest import ROOT, cli_env, vaemo_command
from vaemo.artifacts import IngestFolder
from vaemo.config import PretrainConfig
from vaemo.data.view import TrainingView
from vaemo.data.view import build as build_view
from vaemo.train.pretrain import data_config, model_config

TIMEOUT = 600
SMALL = {"batch_size": 2, "num_workers": 0, "warmup_steps": 2, "eval_clips": 16}


def settings_file(tmp_path: Path, **values) -> Path:
    path = tmp_path / f"settings-{len(list(tmp_path.glob('settings-*')))}.json"
    path.write_text(PretrainConfig(**{**SMALL, **values}).model_dump_json())
    return path


def stage1(shards: Path, out: Path, settings: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vaemo.train.pretrain", "--shards", str(shards), "--out", str(out), "--settings",
            str(settings), *extra]


def step_log(out: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_pretrain_command_trains_and_tracks(shards, tmp_path):
    work, out = tmp_path / "work", tmp_path / "model"
    config = tmp_path / "pipelines.yaml"
    config.write_text(
        "stages:\n  pretrain:\n    batch_size: 2\n    num_workers: 1\n    checkpoint_every: 2\n    warmup_steps: 1\n"
        "    log_checkpoints: true\n"
    )
    done = subprocess.run(
        vaemo_command("--config", str(config), "--work-dir", str(work), "pretrain", "--shards", str(shards), "--preset",
                      "tiny", "--out", str(out), "--steps", "4"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(work),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"loss_first", "loss_last", "av_retrieval_top1", "av_retrieval_chance"} <= set(metrics)
    assert metrics["av_retrieval_chance"] == pytest.approx(1 / 3) and metrics["steps"] == 4
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step-00000002.pt", "step-00000004.pt"]

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["vaemo"], output_format="list")[0]
    assert run.info.status == "FINISHED" and run.data.params["pretrain.model"] == "tiny"
    cfg = PretrainConfig(model="tiny")  # the view's settings do not depend on the batch or the steps
    assert run.data.tags["vaemo.training.shards.digest"] == IngestFolder(shards).digest()
    view = TrainingView(IngestFolder(shards), data_config(cfg, model_config(cfg)), cfg.view)
    assert run.data.tags["vaemo.training.training_view.digest"] == view.built_digest() == view.expected_digest()
    client = mlflow.MlflowClient()
    for name in set(step_log(out)[1]) - {"step"}:  # every value of every step, sent in the background, arrived
        history = client.get_metric_history(run.info.run_id, name)  # (the run's summary is logged at step 0)
        assert [m.step for m in history if m.step] == [1, 2, 3, 4], name
    assert {"training_curves.png", "metrics.json", "checkpoints"} <= {  # log_checkpoints: true
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/step-00000002.pt", "checkpoints/step-00000004.pt"}
    model = mlflow.get_logged_model(run.data.tags["vaemo.output.model.stage1"])
    listed = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert model.status.to_proto() != 0 and {"MLmodel", "pyfunc_model.py", "artifacts"} <= listed, listed
    files = {a.path for a in client.list_logged_model_artifacts(model.model_id, "artifacts/model")}
    assert files == {"artifacts/model/model.safetensors", "artifacts/model/config.json"}, files


def test_killed_training_resumes_on_the_same_loss_curve(shards, tmp_path):
    settings = settings_file(tmp_path, steps=8, checkpoint_every=4)
    whole = subprocess.run(
        stage1(shards, tmp_path / "whole", settings), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    process = subprocess.Popen(
        stage1(shards, out, settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoints" / "step-00000004.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists()  # it really was interrupted

    resumed = subprocess.run(stage1(shards, out, settings, "--resume"), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 4
    reference, again = step_log(tmp_path / "whole"), step_log(out)
    assert sorted(again) == list(range(1, 9))
    for step in range(5, 9):
        assert again[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4, abs=1e-5), step
    ranks = [json.loads((d / "ranks" / "rank-0.json").read_text())["weights_sha256"] for d in (tmp_path / "whole", out)]
    assert ranks[0] == ranks[1]


def test_two_process_ddp_shards_data_and_agrees_on_weights(shards, tmp_path):
    out, ingest = tmp_path / "ddp", tmp_path / "ingest"
    # The view is written inside the ingest folder, and the fixture is shared: a copy without other tests' views.
    shutil.copytree(shards, ingest, ignore=shutil.ignore_patterns("views"))
    # One epoch: the view's shards (one clip each here) are split between the ranks.
    settings = settings_file(tmp_path, steps=1, batch_size=1, view={"samples_per_shard": 1})
    cfg = PretrainConfig.model_validate_json(settings.read_text())
    build_view(IngestFolder(ingest), data_config(cfg, model_config(cfg)), cfg.view)  # torchrun's ranks need it built
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            *stage1(ingest, out, settings)[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    seen = [set(r["clips_seen"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1], seen
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2


def test_model_info_and_embeddings(shards, corpus, tmp_path):
    info = subprocess.run(vaemo_command("model-info", "--preset", "base"), capture_output=True, text=True,
                          timeout=TIMEOUT, env=cli_env(tmp_path))
    assert info.returncode == 0 and "params.total" in info.stdout and "pretrain_gflops" in info.stdout
    total = int(next(line for line in info.stdout.splitlines() if "params.total" in line).split()[-1].replace(",", ""))
    assert total <= 40_000_000

    from vaemo.embed import encode
    from vaemo.model import av

    model_dir = tmp_path / "m"
    av.save(av.AVMAE(av.config_for("tiny")), model_dir)
    from_shards = {m: encode(shards, model_dir, m) for m in ("av", "video", "audio")}
    assert len(from_shards["av"]) == 3 and set(from_shards["av"]) == set(from_shards["audio"])
    assert not np.allclose(
        from_shards["video"][next(iter(from_shards["video"]))], from_shards["audio"][next(iter(from_shards["audio"]))]
    )

    video = sorted(corpus.glob("*.mp4"))[0]
    out = tmp_path / "emb.npz"
    done = subprocess.run(
                          vaemo_command("embed", str(video), "--model", str(model_dir), "--out", str(out), "--modality",
                                        "video"),
                          capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = np.load(out)
    assert saved["embedding"].shape == (len(saved["clip_id"]), 128) and len(saved["clip_id"]) >= 1
    # The same clip from the file and from the shards gets the same video embedding.
    clip = str(saved["clip_id"][0])
    assert np.allclose(saved["embedding"][0], from_shards["video"][clip], atol=1e-4)
