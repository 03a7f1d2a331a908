"""The ingest run as a unit of work: shards appear whole, re-runs are incremental, runs never interleave."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from tests.conftest import ingest_folder
from vaemo.config import IngestConfig
from vaemo.ingest import shards
from vaemo.ingest.run import IngestBusy, IngestRun, SettingsChanged

CFG = IngestConfig(videos_per_batch=2)


def ingest(source: Path, out: Path, cfg: IngestConfig = CFG) -> tuple[dict, list]:
    return ingest_folder(source, out, cfg)


def samples(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False)) if urls else []


@pytest.fixture()
def source(corpus, bad_cases, tmp_path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    for path in sorted(corpus.glob("*.mp4"))[:2]:
        shutil.copy(path, folder / path.name)
    for case in ("no_face", "not_a_video"):
        shutil.copy(bad_cases[case], folder / bad_cases[case].name)
    return folder


def test_shards_manifest_and_stats(source, tmp_path):
    out = tmp_path / "out"
    stats, batches = ingest(source, out)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert {"video_id", "path", "status", "reason", "n_clips", "label", "speaker"} <= set(manifest.columns)
    assert len(manifest) == 4 and sorted(manifest["path"]) == sorted(p.name for p in source.iterdir())
    assert not any(Path(p).is_absolute() for p in manifest["path"])
    by_status = manifest.groupby("status")["path"].count().to_dict()
    assert by_status == {"ok": 2, "no_face": 1, "not_a_video": 1} == stats["status_counts"]
    assert all(manifest.loc[manifest.status != "ok", "reason"].str.len() > 5)

    found = samples(out)
    assert len(found) == stats["clips"] == manifest["n_clips"].sum() >= 2
    for sample in found:
        assert {"mp4", "flac", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        assert sample["__key__"] == meta["clip_id"] and meta["video_id"] in set(manifest["video_id"])
        for key in ("dataset", "source", "start", "end", "fps", "face_prob_mean", "speech_ratio", "label", "speaker",
                    "fold"):
            assert key in meta
    clips = pd.read_parquet(out / "clips.parquet")
    assert sorted(clips["clip_id"]) == sorted(s["__key__"] for s in found)
    assert stats["shards"] == len(list((out / "shards").glob("*.tar"))) == len(batches)  # 2 batches of 2 videos
    assert len(stats["shard_set_digest"]) == 64 and stats["timings_total"]["detect"] > 0


def test_rerun_does_no_work_and_new_videos_only_add_shards(source, corpus, tmp_path):
    out = tmp_path / "out"
    first, _ = ingest(source, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}

    again, batches = ingest(source, out)
    assert batches == [] and again["last_run"]["processed_videos"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")} == before
    assert again["shard_set_digest"] == first["shard_set_digest"]

    new = sorted(corpus.glob("*.mp4"))[2]
    shutil.copy(new, source / new.name)
    shutil.copy(new, source / "copy of the same video.mp4")  # same content under a second name
    grown, batches = ingest(source, out)
    assert len(batches) == 1 and [v["path"] for v in batches[0].videos] in (["copy of the same video.mp4"], [new.name])
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 1
    manifest = pd.read_parquet(out / "manifest.parquet")
    duplicate = manifest[manifest.status == "duplicate"]
    assert len(duplicate) == 1 and "same content as" in duplicate.iloc[0]["reason"]
    assert grown["clips"] == first["clips"] + 1 and grown["shard_set_digest"] != first["shard_set_digest"]
    keys = [s["__key__"] for s in samples(out)]
    assert len(keys) == len(set(keys)) == grown["clips"]


def test_interrupted_commit_and_leftovers_are_removed(source, tmp_path):
    out = tmp_path / "out"
    ingest(source, out)
    # A shard renamed into place whose marker was never written (a kill between the two steps) ...
    orphan = out / "shards" / "deadbeefdeadbeef-000.tar"
    shutil.copy(next((out / "shards").glob("*.tar")), orphan)
    (out / ".tmp" / "feedfacefeedface").mkdir(parents=True)
    with IngestRun(source, out, "generic", CFG) as run:
        plan = run.plan()
    # ... is removed before planning, so its clips can never be counted twice.
    assert not orphan.exists() and not (out / ".tmp" / "feedfacefeedface").exists()
    assert set(plan.removed) == {"shards/deadbeefdeadbeef-000.tar", ".tmp/feedfacefeedface"}


def test_a_second_run_on_the_same_folder_refuses(source, tmp_path):
    out = tmp_path / "out"
    with IngestRun(source, out, "generic", CFG):
        with pytest.raises(IngestBusy, match="another ingest run"):
            IngestRun(source, out, "generic", CFG).__enter__()


def test_a_worker_of_a_replaced_run_cannot_commit(source, tmp_path):
    out = tmp_path / "out"
    with IngestRun(source, out, "generic", CFG) as old:
        stale = old.plan().batches[0]
    with IngestRun(source, out, "generic", CFG):
        with pytest.raises(shards.Superseded):
            shards.run_batch(stale, out, CFG)
    assert not list((out / "shards").glob("*.tar")) and not (out / "batches").exists()


def test_changed_processing_settings_need_a_new_folder(source, tmp_path):
    out = tmp_path / "out"
    with IngestRun(source, out, "generic", CFG):
        pass
    with pytest.raises(SettingsChanged, match="crop_size"):
        IngestRun(source, out, "generic", IngestConfig(crop_size=128)).__enter__()
    with IngestRun(source, out, "generic", IngestConfig(videos_per_batch=5)):
        pass  # batching is not a processing setting


def test_videos_in_flight_give_the_clips_of_one_video_at_a_time(corpus, shards, tmp_path):
    """Threads that share one detector (as on a GPU) cut the same clips as one video after another."""
    out = tmp_path / "out"
    stats, batches = ingest(corpus, out, IngestConfig(videos_per_batch=3, videos_in_flight=3))
    assert len(batches) == 1 and stats["status_counts"] == {"ok": 3}
    one_at_a_time = pd.read_parquet(shards / "clips.parquet").set_index("clip_id").sort_index()
    in_flight = pd.read_parquet(out / "clips.parquet").set_index("clip_id").sort_index()
    assert list(in_flight.index) == list(one_at_a_time.index)  # same spans: the ids hold start and end
    for column in ("frames", "faces_max", "processing"):
        assert list(in_flight[column]) == list(one_at_a_time[column])
    assert np.allclose(in_flight["face_prob_mean"], one_at_a_time["face_prob_mean"], atol=1e-3)
