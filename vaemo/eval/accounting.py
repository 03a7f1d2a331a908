"""Test-set accounting: how many of the protocol's test videos were scored, and why each other one was not.

A published comparison needs the whole test set, or at least the count of what is missing. The
test videos of a fold are the labelled source videos of the ingest manifest (one row per corpus
file, with its ingest status and reason) that the fold's rule puts in its test part, whether or
not ingest made a clip of them: by fold number for the official folds, by speaker for folds of
speakers. A video is not evaluated when it did not ingest (its manifest status and reason), when
none of its clips could be decoded from the shards at evaluation (``not_decodable``), or when
ingest stored it without audio and the evaluation's input needs audio (``video_only``; with
``video_only_fallback`` it is scored by its video and counted in ``scored_video_only``). Under
stratified folds (speakers unknown) a video without a clip belongs to no fold; it is counted in
the total only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from vaemo.artifacts import IngestFolder
from vaemo.eval.protocols import FoldPlan

NOT_DECODABLE = "not_decodable"
NOT_DECODABLE_REASON = "ingested, but no clip of it could be decoded from the shards at evaluation"
VIDEO_ONLY = "video_only"  # ingested without audio (video_only_clips) and not scored by its video alone
VIDEO_ONLY_REASON = "ingested without audio ({why}); modality av with video_only_fallback scores it by its video"


def _reasons(entries: list[dict]) -> dict[str, int]:
    counts = Counter(e["status"] for e in entries)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _counts(videos: int, missing: list[dict], by_video: int) -> dict:
    return {"test_videos": videos, "scored": videos - len(missing), "scored_video_only": by_video,
            "not_evaluated": len(missing), "reasons": _reasons(missing)}


def _fold_of(plan: FoldPlan, row: dict) -> int | None:
    """The fold whose test part holds a video that has no clip; None when no fold claims it."""
    if plan.test_by == "fold":
        fold = row["fold"]
        return None if fold is None or pd.isna(fold) else int(fold)
    if plan.test_by == "speaker":
        return next((f.number for f in plan.folds if row["speaker"] in f.test_speakers), None)
    return None


def account(
    ingest_dir: Path, plan: FoldPlan, scored: dict[int, list[str]], by_video: dict[int, list[str]] | None = None
) -> dict:
    """Per fold and in total: test videos, scored videos, and the videos not evaluated with status and reason.

    ``scored``: fold number -> the clip ids whose predictions were scored in that fold's test part;
    ``by_video``: those of them scored by their video alone (clips ingested without audio).
    """
    by_video = by_video or {}
    folder = IngestFolder(ingest_dir)
    # A clip's video is its source file (one clip per labelled file); a clip table without sources counts clips.
    source = plan.clips["source"].where(plan.clips["source"].notna(), plan.clips.index.to_series())
    numbers = [f.number for f in plan.folds]
    tested = {f.number: {source[c] for c in f.test} for f in plan.folds}  # the test videos that have clips
    # Why a video has no audio, for those ingested as video-only clips.
    silent = {path: why for path, why in zip(source, plan.clips["video_only"], strict=True) if isinstance(why, str)}
    undecoded = [
        {"fold": f.number, "path": path, "status": VIDEO_ONLY, "reason": VIDEO_ONLY_REASON.format(why=silent[path])}
        if path in silent else
        {"fold": f.number, "path": path, "status": NOT_DECODABLE, "reason": NOT_DECODABLE_REASON}
        for f in plan.folds
        for path in sorted(tested[f.number] - {source[c] for c in scored[f.number]})
    ]
    video_scored = {n: len({source[c] for c in by_video.get(n, [])}) for n in numbers}
    not_ingested: list[dict] = []
    manifest = folder.manifest(columns=["path", "status", "reason", "label", "speaker", "fold"])
    if manifest is not None:
        labelled = manifest[manifest["label"].notna() & (manifest["label"].astype(str) != "")]
        if plan.protocol.classes is not None:  # labels the protocol does not have are no part of its test set
            labelled = labelled[labelled["label"].isin(plan.protocol.classes)]
        with_clips = set(source)
        for row in labelled.sort_values("path").to_dict("records"):
            if row["path"] in with_clips:
                continue
            fold = _fold_of(plan, row)
            if plan.test_by == "fold" and fold not in numbers:
                continue  # in no fold this evaluation tests (e.g. --folds 2 of mafw's 5)
            not_ingested.append({"fold": fold, "path": row["path"], "status": row["status"],
                                 "reason": "" if pd.isna(row["reason"]) else str(row["reason"])})

    missing = sorted(undecoded + not_ingested, key=lambda e: (e["fold"] is None, e["fold"] or 0, e["path"]))
    folds = [
        {"fold": n, **_counts(len(tested[n]) + sum(e["fold"] == n for e in not_ingested),
                              [e for e in missing if e["fold"] == n], video_scored[n])}
        for n in numbers
    ]
    return {
        "manifest": str(folder / folder.MANIFEST) if manifest is not None else None,
        "folds": folds,
        "total": _counts(sum(map(len, tested.values())) + len(not_ingested), missing, sum(video_scored.values())),
        "no_fold": sum(e["fold"] is None for e in missing),
        "not_evaluated": missing,
    }
