"""What every adapter shares: the corpus error, the one folder walk, and reading small label files."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from vaemo.errors import CorpusError, MediaError
from vaemo.ingest.files import open_regular
from vaemo.ingest.records import LeftOut, Scanned, SourceRecord

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts", ".mts", ".ogv"}
)


def _walk(root: Path) -> Iterator[tuple[PurePosixPath, list[str], list[str]]]:
    """Yield (folder relative to root, sub-folders, files), sorted and without hidden entries.

    Linked folders are followed, since corpora are often assembled from links, but each real folder
    is visited once so a link back to an ancestor cannot loop.
    """
    visited: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=_unlisted):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        # Sorting in place also fixes the order in which os.walk descends: results are deterministic.
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        relative = PurePosixPath(Path(folder).relative_to(root).as_posix())
        yield relative, subfolders, sorted(name for name in files if not name.startswith("."))


def _unlisted(error: OSError) -> None:
    # A folder that cannot be listed holds no entry to give a status to; say so rather than skip it silently.
    log.warning("cannot list %s: %s; its files are left out", error.filename, error.strerror)


def iter_files(root: Path) -> Iterator[str]:
    """Every visible file under root, as a POSIX path relative to root."""
    for folder, _, files in _walk(root):
        for name in files:
            yield (folder / name).as_posix()


def is_video(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in VIDEO_EXTENSIONS


def iter_videos(root: Path) -> Iterator[str]:
    """Video files under root, lazily, so callers that only need a sample stop early."""
    return filter(is_video, iter_files(root))


def find_videos(root: Path) -> list[str]:
    """All video files under root, sorted; a corpus without any is an error."""
    videos = sorted(iter_videos(root))
    if not videos:
        extensions = ", ".join(sorted(VIDEO_EXTENSIONS))
        raise CorpusError(
            f"no video files under {root} (looked for extensions {extensions}, any case, in all sub-folders)"
        )
    return videos


def first_dir(root: Path, wanted: Callable[[PurePosixPath], bool]) -> PurePosixPath | None:
    """The first folder under root (in walk order) whose relative path satisfies `wanted`."""
    for folder, subfolders, _ in _walk(root):
        for name in subfolders:
            if wanted(folder / name):
                return folder / name
    return None


def stem(path: str) -> str:
    return PurePosixPath(path).stem


def index_by_stem(paths: list[str], what: str) -> dict[str, str]:
    """Map file stem to path; releases that name clips by id must not hold two files with one id."""
    index: dict[str, str] = {}
    for path in paths:
        previous = index.setdefault(stem(path), path)
        if previous != path:
            raise CorpusError(f"two {what} share the name {stem(path)!r}: {previous!r} and {path!r}; keep only one")
    return index


def scan_named_videos(
    root: Path, dataset: str, rule: str, to_record: Callable[[str], Scanned | None]
) -> list[Scanned]:
    """Records for the videos whose names follow a dataset's naming rule; the others are left out (``off_rule``).

    `to_record` returns None for a video that does not follow the rule, a LeftOut for one that follows
    it but is not used. A corpus where no video is usable is most likely the wrong dataset, so that is
    an error that restates the rule.
    """
    videos = find_videos(root)
    off_rule = f"the name does not follow the rule: {rule}"
    scanned = [to_record(path) or LeftOut(path, dataset, status="off_rule", reason=off_rule) for path in videos]
    if not any(isinstance(item, SourceRecord) for item in scanned):
        raise CorpusError(
            f"none of the {len(videos)} videos under {root} (e.g. {videos[0]!r}) follows the rule: {rule}"
        )
    return scanned


def read_text(path: Path, what: str) -> str:
    """The text of a small label file, with file problems turned into CorpusError; a pipe or device is not read."""
    try:
        with open_regular(path) as handle:
            data = handle.read()
    except MediaError as error:
        if error.status == "vanished":
            raise CorpusError(f"{what} {path} does not exist") from None
        raise CorpusError(f"{what} {path}: {error.reason}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CorpusError(f"{what} {path} is not UTF-8 text") from None


def read_csv(
    path: Path, what: str, required: tuple[str, ...], allowed: tuple[str, ...]
) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file with a header, as (line number, {column: stripped value}).

    The header must hold every `required` column and nothing outside `allowed`.
    """
    reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""))
    try:
        header = [name.strip() for name in reader.fieldnames or ()]
        if not header:
            raise CorpusError(f"{what} {path} is empty; expected a header line with {', '.join(required)}")
        unknown = [name for name in header if name not in allowed]
        missing = [name for name in required if name not in header]
        if unknown or missing:
            problems = [f"unknown column(s) {', '.join(map(repr, unknown))}"] if unknown else []
            problems += [f"missing column(s) {', '.join(map(repr, missing))}"] if missing else []
            raise CorpusError(f"{what} {path}: {'; '.join(problems)}; allowed columns are {', '.join(allowed)}")
        reader.fieldnames = header
        # csv puts extra cells under the key None and fills short rows with None.
        return [
            (reader.line_num, {name: (value or "").strip() for name, value in row.items() if name is not None})
            for row in reader
        ]
    except csv.Error as error:
        raise CorpusError(f"{what} {path} line {reader.line_num} is not valid CSV: {error}") from None
