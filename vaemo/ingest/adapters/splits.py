"""Benchmarks released with five official train/test split files (MAFW, DFEW).

Each split K's test file names the clips tested in fold K with their label. In five-fold
cross-validation every labelled clip is tested in exactly one fold, so the test files alone give both
the label and the fold of a clip; the train files only repeat the other folds' clips.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vaemo.errors import CorpusError
from vaemo.ingest.adapters.common import find_videos, index_by_stem
from vaemo.ingest.records import LeftOut, Scanned, SourceRecord

FOLDS = range(1, 6)


def split_dir(root: Path, labels: Path | None, find: Callable[[Path], Path | None], expected: str) -> Path:
    """The folder holding the split files: `labels` when given, else the one `find` locates under root."""
    if labels is not None:
        return labels
    found = find(root)
    if found is None:
        raise CorpusError(
            f"no split files found under {root}: expected {expected}; "
            "pass the folder that holds them as labels if it lives elsewhere"
        )
    return found


def scan_test_splits(
    root: Path, dataset: str, test_files: dict[int, Path], read_test_file: Callable[[Path], dict[str, str]]
) -> list[Scanned]:
    """Records for the clips named in the test files {fold: file}; a video in no test file is left out
    (``not_in_splits``: it has neither a label nor a fold)."""
    missing = [str(path) for path in test_files.values() if not path.is_file()]
    if missing:
        raise CorpusError(f"{dataset} split files missing: {', '.join(missing)}")
    videos = index_by_stem(find_videos(root), f"{dataset} clips")
    fold_of: dict[str, int] = {}
    label_of: dict[str, str] = {}
    for fold, path in sorted(test_files.items()):
        for clip, label in read_test_file(path).items():
            if clip in fold_of:
                raise CorpusError(
                    f"{dataset} clip {clip!r} is in the test split of both set {fold_of[clip]} and set {fold}"
                )
            fold_of[clip], label_of[clip] = fold, label
    scanned = [
        SourceRecord(path=path, dataset=dataset, label=label_of[clip], fold=fold_of[clip], whole_file=True)
        if clip in fold_of else
        LeftOut(path, dataset, status="not_in_splits", reason=f"no {dataset} test split names clip {clip!r}, "
                "so it has no label or fold")
        for clip, path in sorted(videos.items(), key=lambda item: item[1])
    ]
    if not any(isinstance(item, SourceRecord) for item in scanned):
        example_clip, example_video = next(iter(fold_of), "(none)"), next(iter(videos.values()))
        raise CorpusError(
            f"none of the {len(fold_of)} clips named in the {dataset} test splits is among the {len(videos)} "
            f"videos under {root} (split files name e.g. {example_clip!r}, videos are named e.g. {example_video!r})"
        )
    return scanned
