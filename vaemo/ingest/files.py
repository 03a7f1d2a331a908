"""Corpus entries are classified before they are opened: only regular files (links resolved) are read.

A named pipe blocks a reader until a writer comes, a character device never ends, a broken link or a
link loop cannot be followed: each becomes a MediaError whose status the manifest records, so one
bad entry never stops the good files beside it. Files are opened non-blocking and checked again on
the open descriptor, so an entry swapped for a pipe after its check cannot block either.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from vaemo.errors import MediaError

# The statuses of entries that are not (or no longer) readable files. They describe the entry, not its content,
# so a video that got one is tried again on the next run.
ENTRY_STATUSES = ("broken_link", "link_loop", "not_a_file", "unreadable", "vanished")

_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), f"a special file (mode {stat.filemode(mode)})")


def _not_a_file(path: Path, mode: int) -> MediaError:
    target = f"a link to {os.path.realpath(path)}, which is " if path.is_symlink() else ""
    return MediaError("not_a_file", f"{target}{_kind(mode)}, not a regular file; only regular files are read")


def _link_target(path: Path) -> str:
    try:
        return repr(os.readlink(path))
    except OSError:  # the loop or the missing part is in a folder above
        return "a path"


def _os_error(path: Path, exc: OSError) -> MediaError:
    if exc.errno == errno.ELOOP:
        return MediaError("link_loop", f"the symbolic link to {_link_target(path)} never resolves to a file (a loop)")
    if exc.errno == errno.ENOENT:
        if path.is_symlink():
            return MediaError("broken_link", f"the symbolic link points to {_link_target(path)}, which does not exist")
        return MediaError("vanished", "the file was removed (or renamed) after the corpus was listed")
    code = errno.errorcode.get(exc.errno, exc.errno)
    return MediaError("unreadable", f"cannot read the file: {exc.strerror} ({code})")


def regular_file(path: Path) -> os.stat_result:
    """The stat of ``path`` (links followed) when it is a regular file; else a MediaError with its status."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _os_error(Path(path), exc) from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_file(Path(path), info.st_mode)
    return info


@contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading only if it is a regular file; opening and reading never block."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(path, exc) from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise _not_a_file(path, mode)
    with os.fdopen(descriptor, "rb") as handle:
        try:
            yield handle
        except OSError as exc:
            raise _os_error(path, exc) from None
