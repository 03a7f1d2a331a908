"""VoxCeleb2: ``idNNNNN/<video id>/<clip>.mp4`` anywhere under the root, e.g.
``dev/mp4/id00012/21Uxsk56VDQ/00001.mp4``; unlabelled, the speaker is the ``idNNNNN`` folder."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from vaemo.ingest.adapters.common import scan_named_videos
from vaemo.ingest.records import Scanned, SourceRecord

SPEAKER = re.compile(r"id\d{5}")
RULE = "VoxCeleb2 layout idNNNNN/<video id>/<clip>.mp4 (e.g. dev/mp4/id00012/21Uxsk56VDQ/00001.mp4)"


def speaker_of(path: str) -> str | None:
    parts = PurePosixPath(path).parts
    return parts[-3] if len(parts) >= 3 and SPEAKER.fullmatch(parts[-3]) else None


def is_named_like(path: str) -> bool:
    return speaker_of(path) is not None


def to_record(path: str) -> SourceRecord | None:
    speaker = speaker_of(path)
    return None if speaker is None else SourceRecord(path=path, dataset="voxceleb2", speaker=speaker)


def scan(root: Path, labels: Path | None) -> list[Scanned]:
    """Unlabelled; `labels` is unused."""
    return scan_named_videos(root, "voxceleb2", RULE, to_record)
