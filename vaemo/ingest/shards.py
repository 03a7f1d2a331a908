"""Batches of videos become shards that appear whole or not at all (the folder: vaemo.artifacts.IngestFolder).

Commit order: shards are renamed into ``shards/``, then the marker is written (atomically). A
shard without a marker is an interrupted commit and is deleted at the next start, so a killed
run never leaves a clip twice. Commits take the commit lock and check the run token, so a worker
that outlives its killed run cannot commit beside the run that replaced it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from vaemo.artifacts import IngestFolder, file_sha256, write_json_atomic
from vaemo.config import IngestConfig
from vaemo.errors import BusyError, writing
from vaemo.ingest.face import FaceDetector
from vaemo.ingest.process import VideoOutcome, process_video
from vaemo.ingest.records import SourceRecord


class Superseded(BusyError):
    """A newer run owns this ingest folder; this batch's work is discarded."""


@contextmanager
def commit_lock(out_dir: Path):
    with open(IngestFolder(out_dir) / IngestFolder.COMMIT_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class BatchSpec:
    """Plain strings and numbers only, so the spec is cheap to send to workers and to hash."""

    batch_id: str
    corpus_root: str
    run_token: str
    videos: list[dict]  # SourceRecord fields + "video_id" + "sha256"


def recover(out_dir: Path) -> list[str]:
    """Remove work in progress and shards of interrupted commits; return what was removed."""
    removed, folder = [], IngestFolder(out_dir)
    with commit_lock(out_dir):
        listed = {s["name"] for m in folder.markers() for s in m["shards"]}
        for shard in sorted(folder.shards_dir.glob("*.tar")):
            if shard.name not in listed:
                shard.unlink()
                removed.append(f"{folder.SHARDS}/{shard.name}")
        for leftover in sorted((folder / folder.TMP).glob("*")):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(f"{folder.TMP}/{leftover.name}")
        for leftover in folder.temporaries():  # of an atomic write that failed (a full disk) or was killed
            leftover.unlink(missing_ok=True)
            removed.append(leftover.relative_to(folder.path).as_posix())
    return removed


def retire(out_dir: Path, batch_ids: set[str]) -> list[str]:
    """Remove committed batches, marker first: their videos are no longer done, and what a kill leaves of their
    shards is an interrupted commit that ``recover`` removes. Returns the ids removed."""
    folder = IngestFolder(out_dir)
    if not batch_ids:
        return []
    with commit_lock(out_dir):
        for marker in folder.markers():
            if marker["batch_id"] in batch_ids:
                (folder / folder.BATCHES / f"{marker['batch_id']}.json").unlink()
                for shard in marker["shards"]:
                    (folder.shards_dir / shard["name"]).unlink(missing_ok=True)
    return sorted(batch_ids)


def _outcomes(batch: BatchSpec, cfg: IngestConfig) -> Iterator[tuple[dict, VideoOutcome, float]]:
    """Every video of the batch with its outcome and seconds, in batch order. ``videos_in_flight`` videos are
    processed at once by threads (by default several only when MTCNN runs on the GPU), sharing one detector, so its
    calls hold the detection frames of several videos."""
    detector = FaceDetector.for_config(cfg)
    in_flight = cfg.videos_at_once(detector.device)
    root = Path(batch.corpus_root)

    def one(video: dict) -> tuple[dict, VideoOutcome, float]:
        record = SourceRecord(**{k: video[k] for k in SourceRecord.__dataclass_fields__})
        begin = time.perf_counter()
        try:
            outcome = process_video(root, record, video["video_id"], cfg, detector)
        except Exception as exc:  # noqa: BLE001 - an unexpected failure is recorded and retried next run
            outcome = VideoOutcome("error", f"{type(exc).__name__}: {exc}")
        return video, outcome, time.perf_counter() - begin

    if in_flight == 1:
        yield from map(one, batch.videos)
        return
    with ThreadPoolExecutor(in_flight, thread_name_prefix="vaemo-ingest") as pool:
        yield from pool.map(one, batch.videos)


def _pack(batch: BatchSpec, cfg: IngestConfig, tmp: Path) -> tuple[list[dict], dict[str, float]]:
    """Process every video of the batch and write its clips to temporary shards."""
    rows, timings = [], {}
    pattern = str(tmp / f"{batch.batch_id}-%03d.tar")
    with wds.ShardWriter(pattern, maxcount=cfg.samples_per_shard, maxsize=1e15, verbose=0) as writer:
        for video, outcome, seconds in _outcomes(batch, cfg):
            write_begin = time.perf_counter()
            for clip in outcome.clips:
                audio = {} if clip.audio is None else {cfg.audio_format: clip.audio}  # a video-only clip has none
                writer.write({"__key__": clip.clip_id, "mp4": clip.video, **audio, "json": clip.meta})
            outcome.timings["write"] += time.perf_counter() - write_begin
            for stage, seconds_of_stage in outcome.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds_of_stage
            rows.append(
                {
                    **video,
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "n_clips": len(outcome.clips),
                    "duration": outcome.duration,
                    "clips": [c.meta for c in outcome.clips],
                    "seconds": round(seconds + time.perf_counter() - write_begin, 3),
                }
            )
    return rows, timings


def run_batch(batch: BatchSpec, out_dir: Path, cfg: IngestConfig) -> dict:
    """Process and commit one batch; a batch already committed is returned as it is (idempotent)."""
    torch.set_num_threads(cfg.torch_threads)
    folder = IngestFolder(out_dir)
    marker_path = folder / folder.BATCHES / f"{batch.batch_id}.json"
    if marker_path.exists():
        return json.loads(marker_path.read_text(encoding="utf-8"))
    tmp = folder / folder.TMP / batch.batch_id
    try:
        with writing(f"the shards of batch {batch.batch_id}", tmp.parent):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            begin = time.perf_counter()
            rows, timings = _pack(batch, cfg, tmp)
        return _commit(batch, out_dir, cfg, tmp, marker_path, rows, timings, time.perf_counter() - begin)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what a failed batch wrote at once, not at the next run


def _commit(batch: BatchSpec, out_dir: Path, cfg: IngestConfig, tmp: Path, marker_path: Path, rows: list[dict],
            timings: dict, seconds: float) -> dict:
    folder = IngestFolder(out_dir)
    # ShardWriter opens a shard before the first sample, so a batch without clips leaves an empty tar.
    shards = [p for p in sorted(tmp.glob("*.tar")) if any(r["n_clips"] for r in rows)]
    shard_stats = [{"name": p.name, "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in shards]
    _assign_shards(shard_stats, rows, cfg.samples_per_shard)
    marker = {
        "batch_id": batch.batch_id,
        "processing": cfg.processing_digest(),
        "videos": rows,
        "shards": shard_stats,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "seconds": round(seconds, 3),
        "worker_pid": os.getpid(),
    }
    with writing(f"the commit of batch {batch.batch_id}", out_dir), commit_lock(out_dir):
        token_file = folder / folder.RUN_TOKEN
        token = json.loads(token_file.read_text())["token"] if token_file.exists() else None
        if token != batch.run_token:
            raise Superseded(f"batch {batch.batch_id}: a newer ingest run owns {out_dir}")
        folder.shards_dir.mkdir(exist_ok=True)
        marker_path.parent.mkdir(exist_ok=True)
        moved = []
        try:
            for shard in shards:
                os.replace(shard, folder.shards_dir / shard.name)
                moved.append(folder.shards_dir / shard.name)
            marker["committed_at"] = time.time()
            write_json_atomic(marker_path, marker, f"the commit marker of batch {batch.batch_id}")
        except BaseException:
            for shard in moved:  # not committed without the marker; removed now rather than by the next run
                shard.unlink(missing_ok=True)
            raise
    return marker


def _assign_shards(shard_stats: list[dict], rows: list[dict], per_shard: int) -> None:
    """ShardWriter fills shards in order, so each clip's shard follows from its position."""
    clips = [clip for row in rows for clip in row["clips"]]
    for index, clip in enumerate(clips):
        clip["shard"] = shard_stats[index // per_shard]["name"]
    for number, stats in enumerate(shard_stats):
        stats["samples"] = len(clips[number * per_shard : (number + 1) * per_shard])
