"""Any folder of videos, optionally with a labels CSV: ``path`` (relative to the root) plus any of
``label``, ``speaker`` and ``fold``. Labelled files become one clip each; the rest are cut later."""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from vaemo.errors import CorpusError
from vaemo.ingest.adapters.common import find_videos, read_csv
from vaemo.ingest.records import SourceRecord

COLUMNS = ("path", "label", "speaker", "fold")
WHAT = "labels CSV"

log = logging.getLogger(__name__)


def _relative_path(cell: str, labels: Path, line: int) -> str:
    if not cell:
        raise CorpusError(f"{labels} line {line}: empty path")
    # CSVs written on Windows use backslashes.
    path = PurePosixPath(cell.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise CorpusError(f"{labels} line {line}: path {cell!r} must be relative to the corpus root")
    return path.as_posix()


def _fold(cell: str, labels: Path, line: int) -> int | None:
    if not cell:
        return None
    try:
        return int(cell)
    except ValueError:
        raise CorpusError(f"{labels} line {line}: fold {cell!r} is not a whole number") from None


def read_labels(labels: Path) -> dict[str, dict]:
    """{relative path: SourceRecord fields} from a labels CSV; empty cells mean unknown."""
    rows: dict[str, dict] = {}
    for line, row in read_csv(labels, WHAT, required=("path",), allowed=COLUMNS):
        path = _relative_path(row["path"], labels, line)
        if path in rows:
            raise CorpusError(f"{labels} line {line}: {path!r} is listed twice")
        rows[path] = {
            "label": row.get("label") or None,
            "speaker": row.get("speaker") or None,
            "fold": _fold(row.get("fold", ""), labels, line),
        }
    return rows


def scan(root: Path, labels: Path | None) -> list[SourceRecord]:
    videos = find_videos(root)
    if labels is None:
        return [SourceRecord(path=path, dataset="generic") for path in videos]
    rows = read_labels(labels)
    unmatched = sorted(set(rows) - set(videos))
    if len(unmatched) == len(rows):
        example = f" (e.g. {unmatched[0]!r})" if unmatched else ""
        raise CorpusError(
            f"none of the {len(rows)} rows of {labels} names a video under {root}{example}; "
            f"paths must be relative to the corpus root, like {videos[0]!r}"
        )
    if unmatched:
        log.warning("%d rows of %s name no video under %s, e.g. %r", len(unmatched), labels, root, unmatched[0])
    return [
        SourceRecord(path=path, dataset="generic", whole_file=path in rows, **rows.get(path, {})) for path in videos
    ]
