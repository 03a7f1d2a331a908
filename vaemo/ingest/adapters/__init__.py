"""Dataset adapters: turn a corpus folder into SourceRecords, one module per naming rule.

Every adapter (listed in ``vaemo.registry.DATASETS``) has ``scan(root, labels)``, which gives every
video of the folder as a SourceRecord or, when the dataset's rules leave it out, as a LeftOut with the
status and reason of its manifest row;
one whose file names identify it also has ``is_named_like(path)``, one released with split files
``marks_splits(folder)`` and ``fold_test_files(folder)``. ``scan_corpus`` picks an adapter by name or
guesses it with ``detect_dataset``.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from types import ModuleType

from vaemo.errors import CorpusError
from vaemo.ingest.adapters.common import VIDEO_EXTENSIONS, find_videos, first_dir, iter_videos
from vaemo.ingest.records import Scanned
from vaemo.registry import DATASETS

__all__ = ["VIDEO_EXTENSIONS", "detect_dataset", "find_videos", "iter_videos", "scan_corpus"]

# Enough names to recognise a naming rule without walking a million-clip corpus.
DETECTION_SAMPLE = 200


def named_by_files() -> dict[str, ModuleType]:
    """Datasets recognised by their file names alone; they have no use for a labels argument."""
    return {name: module for name, module in DATASETS.loaded().items() if hasattr(module, "is_named_like")}


def split_releases() -> dict[str, ModuleType]:
    """Datasets released with official split files, which give every clip's label and fold."""
    return {name: module for name, module in DATASETS.loaded().items() if hasattr(module, "marks_splits")}


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
    for name, module in named_by_files().items():
        # A majority, so that a few stray files do not hide a known corpus.
        if 2 * sum(map(module.is_named_like, sample)) > len(sample):
            return name
    # One walk looks for the split folders of every release.
    releases = split_releases()
    marker = first_dir(root, lambda folder: any(module.marks_splits(folder) for module in releases.values()))
    if marker is not None:
        return next(name for name, module in releases.items() if module.marks_splits(marker))
    return "generic"


def _release_of_split_dir(folder: Path) -> str | None:
    """Which split-file release an explicit labels folder belongs to, if any."""
    for name, module in split_releases().items():
        if any(path.is_file() for path in module.fold_test_files(folder).values()):
            return name
    return None


def scan_corpus(root: Path, dataset: str = "auto", labels: Path | None = None) -> list[Scanned]:
    """Every video of the corpus at root, sorted by path: a SourceRecord when usable, else a LeftOut.

    ``labels`` is a labels CSV for "generic", or the split folder for "mafw" and "dfew" when it is
    not under root.
    """
    root = _corpus_root(root)
    labels = None if labels is None else Path(labels)
    dataset = dataset.lower()
    if dataset == "auto":
        dataset = (labels is not None and labels.is_dir() and _release_of_split_dir(labels)) or detect_dataset(root)
    elif dataset not in DATASETS.names:
        raise CorpusError(f"unknown dataset {dataset!r}; valid names are auto, {', '.join(DATASETS.names)}")
    if labels is not None and dataset in named_by_files():
        raise CorpusError(
            f"{dataset} is described by its file names alone, so labels ({labels}) is not used; it is only for "
            f"generic (a CSV) and {', '.join(split_releases())} (the split folder)"
        )
    return sorted(DATASETS.load(dataset).scan(root, labels), key=lambda record: record.path)
