"""Broken shards and small corpora: every sample a shard loses is counted, warned about once per shard and
reported; a corpus smaller than a batch trains; no training loop waits forever for a batch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import lancedb
import mlflow
import pytest
import torch

from tests.conftest import ROOT, cli_env, ingest_folder, vaemo_command
from tests.test_caption import GOOD, ScriptedEngine
from tests.test_data import write_shard
from tests.test_pretrain import settings_file, stage1
from vaemo import synth
from vaemo.artifacts import IngestFolder
from vaemo.caption.run import caption
from vaemo.config import CaptionConfig, FinetuneConfig, IngestConfig, PretrainConfig
from vaemo.data.config import DataConfig
from vaemo.data.loader import ShardLosses, make_loader
from vaemo.embed import encode
from vaemo.errors import ArtifactError
from vaemo.eval.finetune import finetune_fold
from vaemo.eval.protocols import EvaluationError
from vaemo.model import av
from vaemo.train.loop import train

CFG = DataConfig()
TIMEOUT = 600


@pytest.fixture(scope="module")
def one_shard(corpus, tmp_path_factory) -> Path:
    """The corpus ingested as one batch: one real shard of three clips (flac, json, mp4 each) and its marker."""
    out = tmp_path_factory.mktemp("one-shard")
    ingest_folder(corpus, out, IngestConfig(videos_per_batch=3))
    return out


def broken_copy(folder: Path, dest: Path, member: int, how: str) -> tuple[Path, Path]:
    """A copy of an ingest folder whose one shard breaks at tar member ``member``: its header damaged
    ("header": the tar stream just ends there) or the file cut inside the member's data ("cut").
    Given a shard (``dest`` the same path), that shard is broken in place."""
    if folder.is_dir():
        shutil.copytree(folder, dest)
        (shard,) = (dest / "shards").glob("*.tar")
    else:
        shard = dest
    with tarfile.open(shard) as tar:
        info = tar.getmembers()[member]
    data = bytearray(shard.read_bytes())
    if how == "header":
        data[info.offset + 148 : info.offset + 156] = b"XXXXXXXX"  # the header checksum field
    else:
        del data[info.offset_data + info.size // 2 :]
    shard.write_bytes(bytes(data))
    return dest, shard


def keys_before_the_break(shard: Path) -> set[str]:
    """The samples whose first member a plain tar reader still finds (read independently of vaemo)."""
    keys = set()
    with contextlib.suppress(tarfile.ReadError), tarfile.open(shard) as tar:
        for member in tar:
            keys.add(member.name.split(".")[0])
    return keys


def loss_warnings(caplog, shard: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"shard {shard} lost")]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how, member", [("header", 3), ("cut", 4)])
def test_a_shard_broken_mid_file_counts_each_lost_sample_once(one_shard, tmp_path, caplog, how, member):
    folder, shard = broken_copy(one_shard, tmp_path / "broken", member, how)
    expected = IngestFolder(folder).shard_samples()[shard.name]
    read = keys_before_the_break(shard)
    assert expected == 3 and 0 < len(read) < expected
    lost = expected - len(read)
    partial = member % 3 != 0  # the break cut a sample short: read, then rejected by the decoder
    urls = IngestFolder(folder).shard_urls()
    with caplog.at_level(logging.WARNING, logger="vaemo.data.loader"):
        # Evaluation, in the main process and with two workers (one idle): every good clip once.
        for workers in (0, 2):
            losses = ShardLosses()
            batches = list(make_loader(urls, CFG, train=False, batch_size=2, num_workers=workers, losses=losses,
                                       timeout=60 if workers else 0))
            clips = [c for b in batches for c in b["clip_id"]]
            assert len(clips) == len(read) - partial and set(clips) <= read
            assert sum(b["skipped"] for b in batches) == partial
            assert losses.summary() == {"lost_samples": lost, "lost_by_shard": {shard.name: lost}}
        assert len(loss_warnings(caplog, shard)) == 2  # once per run (two runs above)
        # Training: two epochs, two workers resampling the one shard (read many times by both): counted once.
        caplog.clear()
        losses = ShardLosses()
        for epoch in range(2):
            for batch in make_loader(urls, CFG, train=True, seed=epoch, batch_size=2, num_workers=2, losses=losses,
                                     timeout=60):
                assert set(batch["clip_id"]) <= read
        assert losses.total == lost and len(loss_warnings(caplog, shard)) == 1


@pytest.mark.timeout(TIMEOUT)
def test_pretraining_reports_the_lost_samples_in_metrics_and_mlflow(one_shard, tmp_path):
    folder, shard = broken_copy(one_shard, tmp_path / "broken", 3, "header")
    lost = 3 - len(keys_before_the_break(shard))
    work, out = tmp_path / "work", tmp_path / "model"
    config = tmp_path / "pipelines.yaml"
    config.write_text("stages:\n  pretrain:\n    batch_size: 2\n    num_workers: 1\n    warmup_steps: 1\n")
    done = subprocess.run(
        vaemo_command("--config", str(config), "--work-dir", str(work), "pretrain", "--shards", str(folder), "--preset",
                      "tiny", "--out", str(out), "--steps", "2"),
        capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(work),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, output[-3000:]
    # One warning for the shard, though two epochs and the retrieval pass each read it.
    assert output.count(f"shard {shard} lost {lost} of its 3 samples") == 1, output[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lost_samples"] == lost == 2 and metrics["lost_by_shard"] == {shard.name: lost}
    assert metrics["steps"] == 2 and metrics["av_retrieval_clips"] == 1
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["vaemo"], output_format="list")
    assert run.data.metrics["lost_samples"] == lost
    # Evaluation's features come from the same loader: the same count.
    losses = ShardLosses()
    assert len(encode(folder, out, losses=losses)) == 1 and losses.total == lost


@pytest.mark.timeout(TIMEOUT)
def test_ranks_with_workers_report_the_losses_of_every_rank_once(tmp_path):
    """Two shards of three clips, each broken after its second clip; two ranks with one DataLoader worker each."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    synth.demo_corpus(corpus, n_videos=6, seed=2)
    ingest_folder(corpus, tmp_path / "ingest", IngestConfig(videos_per_batch=6, samples_per_shard=3))
    folder = tmp_path / "ingest"
    shards = sorted((folder / "shards").glob("*.tar"))
    assert list(IngestFolder(folder).shard_samples().values()) == [3, 3]
    for shard in shards:
        broken_copy(shard, shard, 6, "header")
    out = tmp_path / "ddp"
    # Rank 0 learns of the shard rank 1 trained on only by the ranks' gathering: without it that shard's count
    # is missing, or, when rank 0's retrieval pass reads that shard again, it is warned about a second time.
    # The mp4 path: the ranks read the ingest shards themselves (the view, one shard here, is tested in test_view).
    settings = settings_file(tmp_path, steps=2, batch_size=1, num_workers=1, eval_clips=2, view={"enabled": False})
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            *stage1(folder, out, settings)[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [set(json.loads((out / "ranks" / f"rank-{r}.json").read_text())["clips_seen"]) for r in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank read its own shard
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lost_samples"] == 2 and metrics["lost_by_shard"] == {s.name: 1 for s in shards}
    for shard in shards:
        assert done.stderr.count(f"shard {shard} lost 1 of its 3 samples (2 read)") == 1


@pytest.mark.timeout(300)
def test_captioning_counts_a_broken_shard_with_the_same_check(one_shard, tmp_path, caplog):
    folder, shard = broken_copy(one_shard, tmp_path / "broken", 4, "cut")
    read = keys_before_the_break(shard)
    lost = 3 - len(read)
    engine = ScriptedEngine([json.dumps(GOOD)] * 3)
    with caplog.at_level(logging.WARNING, logger="vaemo.data.loader"):
        summary = caption(folder, tmp_path / "db", CaptionConfig(count=3, model="scripted"), engine=engine)
    assert summary["lost_samples"] == lost == 1 and summary["lost_by_shard"] == {shard.name: lost}
    assert len(loss_warnings(caplog, shard)) == 1
    assert summary["status_counts"] == {"ok": 1, "failed": 2} and len(engine.requests) == 1
    rows = lancedb.connect(str(tmp_path / "db")).open_table("captions").to_pandas().set_index("clip_id")
    reasons = rows.loc[rows["status"] == "failed", "reason"].tolist()
    assert sorted(r.split(":")[0] for r in reasons) == ["lost", "unreadable media"]
    assert any(r.startswith(f"lost: shard {shard.name} gave 2 of its 3 samples (shard read error") for r in reasons)


@pytest.mark.timeout(180)
def test_a_corpus_smaller_than_a_batch_trains_on_partial_batches(shards, tmp_path):
    """Three clips in three shards, batch_size 8 and two workers: each worker trains on what it holds."""
    out = tmp_path / "model"
    # The mp4 path's three shards (a training view would pack them into one shard, which the readers resample).
    settings = settings_file(tmp_path, batch_size=8, num_workers=2, steps=3, warmup_steps=1, view={"enabled": False})
    done = subprocess.run(stage1(shards, out, settings), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("3 clip(s) for 2 reader(s) (1 rank(s) x 2 worker(s)) with batch_size 8: fewer than one "
                             "batch per reader; a reader short of a full batch trains on a partial batch") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["skipped_samples"] == 0 and metrics["lost_samples"] == 0
    seen = json.loads((out / "ranks" / "rank-0.json").read_text())["clips_seen"]
    assert set(seen) == set(IngestFolder(shards).clips()["clip_id"]) and len(seen) < 3 * 8


@pytest.mark.timeout(120)
def test_an_epoch_without_a_decodable_clip_stops_with_one_line(shards, tmp_path):
    """Every sample bad, two DataLoader workers: an error after the first epoch, not epochs forever."""
    bad = [{"__key__": f"bad{i}", "mp4": b"\x00garbage" * 50, "flac": b"fLaC-not-really" * 10,
            "json": json.dumps({"clip_id": f"bad{i}"}).encode()} for i in range(3)]
    urls = [write_shard(tmp_path / f"bad-{i}.tar", bad[i : i + 1]) for i in range(3)]
    epochs = []

    def batches(epoch: int, _skip: int):
        epochs.append(epoch)
        return make_loader(urls, CFG, train=True, seed=epoch, batch_size=2, num_workers=2, timeout=60)

    cfg = PretrainConfig(steps=5, warmup_steps=1, num_workers=2)
    with pytest.raises(ArtifactError, match=r"^epoch 0 of the training data gave no batch of clips \(3 sample\(s\) "
                                            r"skipped so far\)"):
        train(torch.nn.Linear(1, 1), lambda model, batch: {}, batches, cfg, tmp_path / "out")
    assert epochs == [0]


@pytest.mark.timeout(120)
def test_a_fine_tuning_epoch_without_a_training_clip_is_an_error(shards, tmp_path):
    """A fold whose training clips are not in the shards: one clear line, not epochs that train on nothing."""
    model_dir = tmp_path / "model"
    av.save(av.AVMAE(av.config_for("tiny")), model_dir)
    test_clip = IngestFolder(shards).clips()["clip_id"].iloc[0]
    cfg = FinetuneConfig(epochs=3)
    with pytest.raises(EvaluationError, match=r"^fine-tuning epoch 1: none of the 2 training clips of this fold "
                                              r"could be decoded$"):
        finetune_fold(model_dir, IngestFolder(shards).shard_urls(), CFG, {test_clip: 0}, ["gone-1", "gone-2"], [],
                      [test_clip], ["a", "b"], "av", cfg, num_workers=2)
