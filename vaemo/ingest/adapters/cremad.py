"""CREMA-D: videos ``AAAA_SSS_EEE_LL.flv`` (actor, sentence, emotion, level), e.g.
``VideoFlash/1001_DFA_ANG_XX.flv``, with the studio audio in ``AudioWAV/<same name>.wav``."""

from __future__ import annotations

import re
from pathlib import Path

from vaemo.ingest.adapters.common import first_dir, iter_files, scan_named_videos, stem
from vaemo.ingest.records import Scanned, SourceRecord

NAME = re.compile(r"(?P<actor>\d{4})_[A-Z]{3}_(?P<emotion>[A-Z]{3})_[A-Z]{2}")
EMOTIONS = {"ANG": "anger", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
FIRST_ACTOR, LAST_ACTOR = 1001, 1091
# Five subject-independent folds over the 91 actors in id order: 18 each, the last one takes 19.
ACTORS_PER_FOLD, FOLDS = 18, 5
AUDIO_FOLDER = "AudioWAV"
RULE = (
    f"CREMA-D names AAAA_SSS_EEE_LL (e.g. 1001_DFA_ANG_XX.flv) with actor {FIRST_ACTOR}-{LAST_ACTOR} "
    f"and emotion one of {', '.join(EMOTIONS)}"
)


def _parse(path: str) -> tuple[int, str] | None:
    """(actor, emotion code) of a CREMA-D file name, or None."""
    match = NAME.fullmatch(stem(path))
    if match is None or match["emotion"] not in EMOTIONS or not FIRST_ACTOR <= int(match["actor"]) <= LAST_ACTOR:
        return None
    return int(match["actor"]), match["emotion"]


def is_named_like(path: str) -> bool:
    return _parse(path) is not None


def fold_of(actor: int) -> int:
    return min((actor - FIRST_ACTOR) // ACTORS_PER_FOLD, FOLDS - 1) + 1


def _wav_by_stem(root: Path) -> dict[str, str]:
    audio_dir = first_dir(root, lambda folder: folder.name == AUDIO_FOLDER)
    if audio_dir is None:
        return {}
    wavs = (path for path in iter_files(root / audio_dir) if path.lower().endswith(".wav"))
    return {stem(path): (audio_dir / path).as_posix() for path in wavs}


def scan(root: Path, labels: Path | None) -> list[Scanned]:
    """Labels come from the file names; `labels` is unused."""
    wav_by_stem = _wav_by_stem(root)

    def to_record(path: str) -> SourceRecord | None:
        parsed = _parse(path)
        if parsed is None:
            return None
        actor, emotion = parsed
        return SourceRecord(
            path=path,
            dataset="crema-d",
            speaker=str(actor),
            label=EMOTIONS[emotion],
            fold=fold_of(actor),
            audio_path=wav_by_stem.get(stem(path)),
            whole_file=True,
        )

    return scan_named_videos(root, "crema-d", RULE, to_record)
