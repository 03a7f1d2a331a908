"""RAVDESS: ``MM-VV-EE-II-SS-RR-AA.ext`` (modality, vocal channel, emotion, intensity, statement,
repetition, actor), e.g. ``01-01-03-02-01-01-12.mp4`` is actor 12 saying a sentence happily."""

from __future__ import annotations

import re
from pathlib import Path

from vaemo.ingest.adapters.common import scan_named_videos, stem
from vaemo.ingest.records import LeftOut, Scanned, SourceRecord

NAME = re.compile(
    r"(?P<modality>0[1-3])-(?P<channel>0[12])-(?P<emotion>0[1-8])-0[12]-0[12]-0[12]-(?P<actor>0[1-9]|1\d|2[0-4])"
)
EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
FULL_AUDIO_VISUAL, SPEECH = "01", "01"
# Six subject-independent folds of four consecutive actors.
ACTORS_PER_FOLD = 4
RULE = (
    "RAVDESS names MM-VV-EE-II-SS-RR-AA (e.g. 01-01-03-02-01-01-12.mp4), keeping only audio-visual "
    "speech (modality 01, vocal channel 01), emotion 01-08, actor 01-24"
)


def is_named_like(path: str) -> bool:
    return NAME.fullmatch(stem(path)) is not None


def to_record(path: str) -> Scanned | None:
    match = NAME.fullmatch(stem(path))
    if match is None:
        return None
    # The release also holds video-only (02) and audio-only (03) copies and sung takes: not used.
    if match["modality"] != FULL_AUDIO_VISUAL or match["channel"] != SPEECH:
        copy = "a sung take (vocal channel 02)" if match["channel"] != SPEECH else (
            f"a {'video' if match['modality'] == '02' else 'audio'}-only copy (modality {match['modality']})")
        return LeftOut(path, "ravdess", status="not_used",
                       reason=f"{copy}; only audio-visual speech (names 01-01-*) is ingested")
    actor = int(match["actor"])
    return SourceRecord(
        path=path,
        dataset="ravdess",
        speaker=f"ravdess-{actor:02d}",
        label=EMOTIONS[int(match["emotion"]) - 1],
        fold=(actor - 1) // ACTORS_PER_FOLD + 1,
        whole_file=True,
    )


def scan(root: Path, labels: Path | None) -> list[Scanned]:
    """Labels come from the file names; `labels` is unused."""
    return scan_named_videos(root, "ravdess", RULE, to_record)
