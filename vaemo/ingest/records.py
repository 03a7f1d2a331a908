"""The record every dataset adapter yields: one source video and what the corpus says about it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SourceRecord:
    """One source video of a corpus.

    ``path`` and ``audio_path`` are relative to the corpus root (POSIX separators), so manifests
    stay valid when a corpus is moved or mounted elsewhere.
    """

    path: str
    dataset: str
    speaker: str | None = None
    label: str | None = None
    fold: int | None = None
    # A separate, better audio file for the same recording (CREMA-D's AudioWAV tree).
    audio_path: str | None = None
    # Labelled benchmark files become one clip each; unlabelled corpora are cut into speech windows.
    whole_file: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# Statuses of videos an adapter leaves out; they follow from the names and split files, so every scan gives them again.
LEFT_OUT_STATUSES = ("not_used", "off_rule", "not_in_splits")


@dataclass(frozen=True)
class LeftOut:
    """A video of the corpus folder that the dataset adapter does not ingest: its manifest row says why."""

    path: str
    dataset: str
    status: str  # one of LEFT_OUT_STATUSES
    reason: str

    def row(self) -> dict:
        return {"path": self.path, "dataset": self.dataset, "status": self.status, "reason": self.reason, "n_clips": 0}


# What an adapter's scan yields for each video of the corpus folder.
Scanned = SourceRecord | LeftOut
