"""Dataset adapters: turn a corpus folder into SourceRecords, one module per naming rule.

Every adapter has ``scan(root, labels) -> list[SourceRecord]``; ``scan_corpus`` picks one by name
or guesses it with ``detect_dataset``.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from pathlib import Path

from vaemo.ingest.adapters import cremad, dfew, generic, mafw, ravdess, voxceleb2
from vaemo.ingest.adapters.common import VIDEO_EXTENSIONS, CorpusError, find_videos, first_dir, iter_videos
from vaemo.ingest.records import SourceRecord

__all__ = [
    "DATASETS",
    "VIDEO_EXTENSIONS",
    "CorpusError",
    "detect_dataset",
    "find_videos",
    "iter_videos",
    "scan_corpus",
]

DATASETS = ("generic", "ravdess", "crema-d", "mafw", "dfew", "voxceleb2")
SCANNERS: dict[str, Callable[[Path, Path | None], list[SourceRecord]]] = {
    "generic": generic.scan,
    "ravdess": ravdess.scan,
    "crema-d": cremad.scan,
    "mafw": mafw.scan,
    "dfew": dfew.scan,
    "voxceleb2": voxceleb2.scan,
}
# Datasets recognised by their file names alone; they have no use for a labels argument.
NAMED_BY_FILES = {"ravdess": ravdess, "crema-d": cremad, "voxceleb2": voxceleb2}
SPLIT_RELEASES = {"mafw": mafw, "dfew": dfew}
# Enough names to recognise a naming rule without walking a million-clip corpus.
DETECTION_SAMPLE = 200


def _corpus_root(root: Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise CorpusError(f"corpus root {root} does not exist")
    if not root.is_dir():
        raise CorpusError(f"corpus root {root} is not a folder; expected the folder that holds the videos")
    return root


def detect_dataset(root: Path) -> str:
    """Guess the dataset from names of a sample of videos, then from split-file layouts; else "generic"."""
    root = _corpus_root(root)
    sample = list(islice(iter_videos(root), DETECTION_SAMPLE))
    for name, module in NAMED_BY_FILES.items():
        # A majority, so that a few stray files do not hide a known corpus.
        if 2 * sum(map(module.is_named_like, sample)) > len(sample):
            return name
    # One walk looks for the split folders of every release.
    marker = first_dir(root, lambda folder: any(module.marks_splits(folder) for module in SPLIT_RELEASES.values()))
    if marker is not None:
        return next(name for name, module in SPLIT_RELEASES.items() if module.marks_splits(marker))
    return "generic"


def _release_of_split_dir(folder: Path) -> str | None:
    """Which split-file release an explicit labels folder belongs to, if any."""
    for name, module in SPLIT_RELEASES.items():
        if any(path.is_file() for path in module.fold_test_files(folder).values()):
            return name
    return None


def scan_corpus(root: Path, dataset: str = "auto", labels: Path | None = None) -> list[SourceRecord]:
    """Records for every usable video of the corpus at root, sorted by path.

    ``labels`` is a labels CSV for "generic", or the split folder for "mafw" and "dfew" when it is
    not under root.
    """
    root = _corpus_root(root)
    labels = None if labels is None else Path(labels)
    dataset = dataset.lower()
    if dataset == "auto":
        dataset = (labels is not None and labels.is_dir() and _release_of_split_dir(labels)) or detect_dataset(root)
    elif dataset not in SCANNERS:
        raise CorpusError(f"unknown dataset {dataset!r}; valid names are auto, {', '.join(DATASETS)}")
    if labels is not None and dataset in NAMED_BY_FILES:
        raise CorpusError(
            f"{dataset} is described by its file names alone, so labels ({labels}) is not used; it is only for "
            f"generic (a CSV) and {', '.join(SPLIT_RELEASES)} (the split folder)"
        )
    return sorted(SCANNERS[dataset](root, labels), key=lambda record: record.path)
