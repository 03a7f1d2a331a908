"""DFEW: clips ``Clip/original/.../NNNNN.mp4``, single-label 5-fold splits in the official release layout
``EmoLabel_DataSplit/{train,test}(single-labeled)/set_K.csv`` with columns ``video_name,label``.

``video_name`` is the clip number without zero padding (``1`` for ``00001.mp4``) and ``label`` a
class code from 1 to 7.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from vaemo.errors import CorpusError
from vaemo.ingest.adapters.common import first_dir, read_csv
from vaemo.ingest.adapters.splits import FOLDS, scan_test_splits, split_dir
from vaemo.ingest.records import Scanned

EMOTIONS = {1: "happy", 2: "sad", 3: "neutral", 4: "angry", 5: "surprise", 6: "disgust", 7: "fear"}
TEST_FOLDER = "test(single-labeled)"
CLIP_ID_DIGITS = 5


def marks_splits(path: PurePosixPath) -> bool:
    """Whether a folder (relative to the corpus root) marks where the split files live."""
    return path.name == TEST_FOLDER


def find_split_dir(root: Path) -> Path | None:
    found = first_dir(root, marks_splits)
    return None if found is None else (root / found).parent


def fold_test_files(folder: Path) -> dict[int, Path]:
    """{fold: the test split file of that fold} inside a split folder."""
    return {fold: folder / TEST_FOLDER / f"set_{fold}.csv" for fold in FOLDS}


def clip_id(video_name: str) -> str:
    return video_name.zfill(CLIP_ID_DIGITS) if video_name.isdecimal() else PurePosixPath(video_name).stem


def read_test_file(path: Path) -> dict[str, str]:
    """{clip id: emotion} from one split file."""
    labels: dict[str, str] = {}
    for line, row in read_csv(path, "DFEW split file", ("video_name", "label"), ("video_name", "label")):
        code = row["label"]
        if not code.isdecimal() or int(code) not in EMOTIONS:
            codes = ", ".join(f"{number}={name}" for number, name in EMOTIONS.items())
            raise CorpusError(f"{path} line {line}: unknown DFEW label {code!r}; expected one of {codes}")
        labels[clip_id(row["video_name"])] = EMOTIONS[int(code)]
    return labels


def scan(root: Path, labels: Path | None) -> list[Scanned]:
    """`labels` may name the split folder (the one holding test(single-labeled)) when it is not under root."""
    expected = f"the official DFEW layout 'EmoLabel_DataSplit/{TEST_FOLDER}/set_K.csv' for K = 1..5"
    folder = split_dir(root, labels, find_split_dir, expected)
    return scan_test_splits(root, "dfew", fold_test_files(folder), read_test_file)
