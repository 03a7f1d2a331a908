"""MAFW: clips in ``data/clips/NNNNN.mp4``, single-label 5-fold splits in the official release layout
``Train & Test Set/single/no_caption/set_K/{train,test}.txt``, one ``NNNNN.mp4 <emotion>`` per line."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from vaemo.errors import CorpusError
from vaemo.ingest.adapters.common import first_dir, read_text
from vaemo.ingest.adapters.splits import FOLDS, scan_test_splits, split_dir
from vaemo.ingest.records import Scanned

# The 11 single-label classes, in the release's order.
EMOTIONS = (
    "anger",
    "disgust",
    "fear",
    "happiness",
    "neutral",
    "sadness",
    "surprise",
    "contempt",
    "anxiety",
    "helplessness",
    "disappointment",
)


def marks_splits(path: PurePosixPath) -> bool:
    """Whether a folder (relative to the corpus root) marks where the split files live."""
    # The release also ships multi-label and captioned splits; only single/no_caption is single-label.
    return path.name == "no_caption" and path.parent.name == "single"


def find_split_dir(root: Path) -> Path | None:
    found = first_dir(root, marks_splits)
    return None if found is None else root / found


def fold_test_files(folder: Path) -> dict[int, Path]:
    """{fold: the test split file of that fold} inside a split folder."""
    return {fold: folder / f"set_{fold}" / "test.txt" for fold in FOLDS}


def read_test_file(path: Path) -> dict[str, str]:
    """{clip id: emotion} from one split file."""
    labels: dict[str, str] = {}
    for number, line in enumerate(read_text(path, "MAFW split file").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise CorpusError(f"{path} line {number}: expected '<clip file> <emotion>', got {line!r}")
        clip, emotion = fields[0].strip(), fields[1].lower()
        if emotion not in EMOTIONS:
            raise CorpusError(
                f"{path} line {number}: unknown MAFW emotion {fields[1]!r}; expected one of {', '.join(EMOTIONS)}"
            )
        labels[PurePosixPath(clip).stem] = emotion
    return labels


def scan(root: Path, labels: Path | None) -> list[Scanned]:
    """`labels` may name the split folder (the one holding set_1 .. set_5) when it is not under root."""
    expected = "the official MAFW layout '.../single/no_caption/set_K/test.txt' for K = 1..5"
    folder = split_dir(root, labels, find_split_dir, expected)
    return scan_test_splits(root, "mafw", fold_test_files(folder), read_test_file)
