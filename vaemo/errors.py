"""The errors vaemo raises for problems of the user's input or environment, under one base.

A ``VaemoError`` is something the person running vaemo can fix: its message says what is wrong,
where, and what to do, and the command line prints it as one line (exit ``exit_code``: 2 for a
refusal, 1 for work that stopped part-way). Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager


class VaemoError(Exception):
    """A problem of the input or the environment, phrased for the person who can fix it."""

    exit_code = 2  # refused: nothing was done


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


class StorageError(VaemoError):
    """The storage refused a write (full, over quota, read-only, failing): the work stopped part-way, what was
    committed before stays intact, and a re-run after the fix resumes."""

    exit_code = 1  # did not complete


# Write errors of the storage rather than of vaemo; any other OSError stays a bug with its traceback.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def storage_error(exc: OSError, what: str, where: str | os.PathLike | None = None) -> StorageError | None:
    """The one-line StorageError for an OSError the storage raised while writing ``what`` into ``where`` (default:
    the file the error names); None for any other OSError."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    where = where or exc.filename
    verb = "cannot read or write" if exc.errno == errno.EIO else "cannot write"  # a failing disk fails reads too
    return StorageError(
        f"{verb} {what}{f' in {where}' if where else ''}: {os.strerror(exc.errno)} "
        f"({errno.errorcode[exc.errno]}); what earlier runs committed is intact: free space (or fix the storage, or "
        "choose another folder) and re-run"
    )


@contextmanager
def writing(what: str, where: str | os.PathLike | None = None):
    """Turn the storage's write errors inside the block into one StorageError naming ``what`` and ``where``."""
    try:
        yield
    except OSError as exc:
        error = storage_error(exc, what, where)
        if error is None:
            raise
        raise error from exc
