"""The errors vaemo raises for problems of the user's input or environment, under one base.

A ``VaemoError`` is something the person running vaemo can fix: its message says what is wrong,
where, and what to do, and the command line prints it as one line (exit 2). Every other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations


class VaemoError(Exception):
    """A problem of the input or the environment, phrased for the person who can fix it."""


class ConfigError(VaemoError):
    """A pipelines file, a setting, a prompt file or a command-line argument that cannot be used."""


class CorpusError(VaemoError):
    """A corpus does not look the way its dataset says it should; the message says what and where."""


class MediaError(VaemoError):
    """A media file or a stored sample that cannot be read or written; ``status`` is the manifest status to record."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ArtifactError(VaemoError):
    """An artifact one stage hands another (ingest folder, captions version, model folder) that is missing,
    incomplete or not what it claims to be."""


class ModelError(ArtifactError):
    """A model folder that cannot be loaded as the model asked for."""


class EngineError(VaemoError):
    """A captioning engine or model that cannot be loaded or run."""


class BusyError(VaemoError):
    """Another run holds what this one needs to write (an ingest folder, a table, a pipeline)."""


class ToolError(VaemoError):
    """A system tool or server that vaemo needs is missing or did not start."""
