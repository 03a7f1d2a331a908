"""An ingest run over one corpus: lock, recover, plan batches, and merge markers into the manifest.

The orchestrator (a Prefect flow, a notebook, another scheduler) calls, in order:
``IngestRun.open`` → ``plan`` → ``shards.run_batch`` for every batch, anywhere → ``finalize``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vaemo import locks
from vaemo.artifacts import IngestFolder, shard_set_digest, write_atomic, write_json_atomic
from vaemo.config import IngestConfig
from vaemo.errors import ArtifactError, BusyError, MediaError, writing
from vaemo.ingest import shards
from vaemo.ingest.adapters import scan_corpus
from vaemo.ingest.files import ENTRY_STATUSES
from vaemo.ingest.media import require_ffmpeg
from vaemo.ingest.process import content_hash, stat_key, video_id_of
from vaemo.ingest.records import LEFT_OUT_STATUSES, LeftOut, Scanned

# Statuses worth another try on the next run; every other status is a property of the file's content.
RETRIED = {"error", "timeout", *ENTRY_STATUSES}
MANIFEST_COLUMNS = [
    "video_id", "path", "status", "reason", "n_clips", "label", "speaker", "fold",
    "dataset", "audio_path", "duration", "sha256", "batch_id",
]


class IngestBusy(BusyError):
    pass


class SettingsChanged(ArtifactError):
    pass


def check_source(source: Path, dataset: str, labels: Path | None) -> list[Scanned]:
    """What an ingest of ``source`` would read; a clear error (no FFmpeg, a corpus that is not what it says) first."""
    require_ffmpeg()
    return scan_corpus(source, dataset, labels)


@dataclass
class Plan:
    batches: list[shards.BatchSpec]
    records: list[dict]  # every scanned video: with its ids, or with the status of one left out or unreadable
    skipped: int  # already ingested
    removed: list[str] = field(default_factory=list)  # leftovers of an interrupted run
    retired: list[str] = field(default_factory=list)  # batches processed again: a source file's content changed

    @property
    def pending_videos(self) -> int:
        return sum(len(b.videos) for b in self.batches)

    @property
    def left_out(self) -> int:
        """Videos the dataset's rules leave out (their rows carry the status)."""
        return sum(r.get("status") in LEFT_OUT_STATUSES for r in self.records)

    @property
    def refused(self) -> int:
        """Entries that are not readable files (their rows carry the status)."""
        return sum("video_id" not in r for r in self.records) - self.left_out


class IngestRun:
    """Holds the folder's lock for the duration of a run: a second run refuses, it never interleaves."""

    def __init__(self, source: Path, out_dir: Path, dataset: str, cfg: IngestConfig, labels: Path | None = None):
        self.source, self.dataset, self.cfg, self.labels = Path(source), dataset, cfg, labels
        self.out_dir, self.folder = Path(out_dir), IngestFolder(out_dir)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._lock_handle = None

    def __enter__(self) -> IngestRun:
        with writing("the ingest folder and its lock", self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with writing("the ingest lock", self.out_dir):
                self._lock_handle = locks.acquire(self.folder / IngestFolder.LOCK)
        except locks.Busy as busy:
            raise IngestBusy(
                f"{self.out_dir} is being written by another ingest run ({busy.holder}); wait for it to finish or "
                "choose another --out"
            ) from None
        try:
            self._check_settings()
            with shards.commit_lock(self.out_dir):
                write_json_atomic(self.folder / IngestFolder.RUN_TOKEN, {"token": self.token}, "the run token")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_handle is not None:
            locks.release(self._lock_handle)
            self._lock_handle = None

    def _check_settings(self) -> None:
        path = self.folder / IngestFolder.SETTINGS
        current = {"processing": self.cfg.processing_digest(), "settings": self.cfg.model_dump()}
        if path.exists():
            previous = json.loads(path.read_text(encoding="utf-8"))
            if previous["processing"] != current["processing"]:
                changed = sorted(k for k, v in current["settings"].items() if previous["settings"].get(k) != v)
                raise SettingsChanged(
                    f"{self.out_dir} was ingested with other processing settings (changed: {', '.join(changed)}); "
                    "use a new --out folder so shards of different settings never mix"
                )
        write_json_atomic(path, current, "the processing settings")

    def plan(self, parallelism: int = 1) -> Plan:
        """Batches of new videos. Small corpora are split so ``parallelism`` workers all get work."""
        removed = shards.recover(self.out_dir)
        markers = self.folder.markers()
        records = self._scan(_known_hashes(markers))
        # A committed video whose path now holds other content: its batch is retired and its other videos done again,
        # so the manifest and the shards keep one version of every source file.
        now = {item["path"]: item["video_id"] for item in records if "video_id" in item}
        retired = shards.retire(self.out_dir, {m["batch_id"] for m in markers for v in m["videos"]
                                               if now.get(v["path"], v["video_id"]) != v["video_id"]})
        markers = [m for m in markers if m["batch_id"] not in retired]
        done = {v["video_id"] for m in markers for v in m["videos"] if v["status"] not in RETRIED}
        pending, seen = [], set()
        for item in records:
            if "video_id" not in item or item["video_id"] in done or item["video_id"] in seen:
                continue  # not a readable file, already ingested, or a second copy of the same content
            seen.add(item["video_id"])
            pending.append(item)
        pending.sort(key=lambda r: r["video_id"])
        size = max(1, min(self.cfg.videos_per_batch, -(-len(pending) // parallelism)))
        batches = []
        for begin in range(0, len(pending), size):
            videos = pending[begin : begin + size]
            # The run's token makes a retried video's batch new, not the committed batch of its earlier attempt.
            key = json.dumps([self.cfg.processing_digest(), self.token] + [v["video_id"] for v in videos])
            batches.append(
                shards.BatchSpec(
                    hashlib.sha256(key.encode()).hexdigest()[:16], str(self.source.resolve()), self.token, videos
                )
            )
        plan = Plan(batches, records, 0, removed, retired)
        plan.skipped = len(records) - plan.left_out - plan.refused - len(pending)
        return plan

    def _scan(self, known: dict[str, str]) -> list[dict]:
        """Every corpus entry with its content hash (not read again when its stat key is known, unless ``rehash``),
        or with the status and reason of a video the dataset leaves out or an entry that is not a readable file."""
        records = []
        for record in scan_corpus(self.source, self.dataset, self.labels):
            if isinstance(record, LeftOut):
                records.append(record.row())
                continue
            try:
                key = stat_key(self.source, record)
                sha = (not self.cfg.rehash and known.get(key)) or content_hash(self.source, record)
            except MediaError as exc:
                records.append({**record.to_dict(), "status": exc.status, "reason": exc.reason, "n_clips": 0})
                continue
            records.append({**record.to_dict(), "sha256": sha, "video_id": video_id_of(sha), "stat_key": key})
        return records

    def finalize(self, plan: Plan, failed_batches: dict[str, str] | None = None) -> dict:
        """Write the clip table, the manifest and the stats of the folder, each atomically.

        ``failed_batches`` maps the id of a batch that could not finish to the reason, which its
        videos then carry (status ``pending``: the next run picks them up).
        """
        failed_batches = failed_batches or {}
        batch_of = {v["video_id"]: b.batch_id for b in plan.batches for v in b.videos}
        markers = self.folder.markers()
        latest: dict[str, dict] = {}
        for marker in markers:
            for video in marker["videos"]:
                latest[video["video_id"]] = {**video, "batch_id": marker["batch_id"]}
        rows, first_path = [], {}
        for item in plan.records:
            vid = item.get("video_id")
            if vid is None:
                rows.append(item)  # left out or not a readable file: its status came from the scan
                continue
            if vid in first_path:
                rows.append(
                    {**item, "status": "duplicate", "reason": f"same content as {first_path[vid]}", "n_clips": 0}
                )
                continue
            first_path[vid] = item["path"]
            done = latest.pop(vid, None)
            if done:
                rows.append({**done, **item})
            else:
                reason = failed_batches.get(batch_of.get(vid), "not processed in this run")
                rows.append({**item, "status": "pending", "reason": reason, "n_clips": 0})
        rows.extend(latest.values())  # ingested earlier, no longer in the corpus folder
        clips = [
            {**clip, "batch_id": row["batch_id"]}
            for row in rows
            if row.get("status") == "ok" and "clips" in row
            for clip in row["clips"]
        ]
        manifest = pd.DataFrame([{c: row.get(c) for c in MANIFEST_COLUMNS} for row in rows], columns=MANIFEST_COLUMNS)
        _write_parquet_atomic(pd.DataFrame(clips), self.folder / IngestFolder.CLIPS, "the clip table")
        _write_parquet_atomic(manifest, self.folder / IngestFolder.MANIFEST, "the manifest")
        stats = _stats(markers, manifest, plan, time.time() - self.started, self.cfg)
        write_json_atomic(self.folder / IngestFolder.STATS, stats, "the ingest stats")
        return stats


def _known_hashes(markers: list[dict]) -> dict[str, str]:
    return {v["stat_key"]: v["sha256"] for m in markers for v in m["videos"] if "stat_key" in v}


def _write_parquet_atomic(frame: pd.DataFrame, path: Path, what: str) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False), what)


def _stats(markers: list[dict], manifest: pd.DataFrame, plan: Plan, seconds: float, cfg: IngestConfig) -> dict:
    timings = Counter()
    for marker in markers:
        timings.update(marker["timings"])
    run_markers = {b.batch_id for b in plan.batches}
    run_videos = sum(len(m["videos"]) for m in markers if m["batch_id"] in run_markers)
    return {
        "videos": int(len(manifest)),
        "status_counts": {k: int(v) for k, v in manifest["status"].value_counts().sort_index().items()},
        "clips": int(manifest["n_clips"].fillna(0).sum()),
        "shards": sum(len(m["shards"]) for m in markers),
        "shard_bytes": sum(s["bytes"] for m in markers for s in m["shards"]),
        "batches": len(markers),
        "shard_set_digest": shard_set_digest(markers),
        "processing_digest": cfg.processing_digest(),
        "timings_total": {k: round(v, 3) for k, v in sorted(timings.items())},
        "last_run": {
            "planned_videos": plan.pending_videos,
            "processed_videos": run_videos,
            "skipped_videos": plan.skipped,
            "recovered": plan.removed,
            "retired": plan.retired,
            "seconds": round(seconds, 2),
            "videos_per_second": round(run_videos / seconds, 3) if seconds > 0 else None,
        },
    }
