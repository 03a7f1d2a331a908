"""One Prefect API server per work directory, shared by the commands on it.

The first command that needs a server starts it, detached (a session of its own: a Ctrl-C of that command does not
stop it), and records it in ``<PREFECT_HOME>/server.json``; later commands find it there and use it. Every command
registers as a user (a lock file per command in ``<PREFECT_HOME>/server-users/``, freed by the kernel when the
command dies). The server's supervisor (``python -m vaemo.prefect_server``, this module) stops it once it has had no
users for ``VAEMO_PREFECT_SERVER_IDLE_SECONDS`` (default 600); with 0 the last command stops it as it ends.

Starting, reusing and stopping all happen under the start lock of ``prefect_home``, so a command never registers
with a server that is being stopped. Nothing here imports Prefect: the server is a child process.

A new work directory's database starts as a copy of the migrated empty one (vaemo/store_templates.py), unless
another database is configured.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TypeVar

import psutil

from vaemo import locks, store_templates
from vaemo.errors import ConfigError
from vaemo.servers import START_TIMEOUT_SECONDS, Server, ServerError, Stopped, prefect_start_lock, stop_on_signals

T = TypeVar("T")

IDLE_VARIABLE = "VAEMO_PREFECT_SERVER_IDLE_SECONDS"
DEFAULT_IDLE_SECONDS = 600.0
RECORD, USERS, LOG, DATABASE = "server.json", "server-users", "server.log", "prefect.db"
POLL_SECONDS = 0.5


def idle_seconds() -> float:
    value = os.environ.get(IDLE_VARIABLE, "")
    if not value.strip():
        return DEFAULT_IDLE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise ConfigError(f"{IDLE_VARIABLE}={value!r}: give the seconds a shared Prefect server waits without users "
                          f"before it stops (a number >= 0; 0 stops it with the last command)")
    return seconds


def api_server(prefect_home: Path, port: int) -> Server:
    """What Prefect's own temporary server runs (the API alone: no UI, no background services), its database in
    ``prefect_home``, on ``port`` of 127.0.0.1."""
    return Server("Prefect", "127.0.0.1", port, "/api/health",
                  [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
                   "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                  Path(prefect_home) / LOG,
                  {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})


@dataclass
class Record:
    """The contents of server.json: the supervisor's pid and start time (a pid alone may be reused) and its URL."""

    url: str
    pid: int
    port: int
    started: float

    @classmethod
    def read(cls, prefect_home: Path) -> Record | None:
        try:
            return cls(**json.loads((Path(prefect_home) / RECORD).read_text()))
        except (OSError, ValueError, TypeError):
            return None  # none, or a write cut short: a stale record, replaced

    def write(self, prefect_home: Path) -> None:
        path = Path(prefect_home) / RECORD
        part = path.with_name(f".{RECORD}.{os.getpid()}")
        part.write_text(json.dumps(asdict(self)))
        part.replace(path)

    def alive(self) -> bool:
        return _started_at(self.pid) == self.started

    def stop(self, timeout: float = 30) -> None:
        """Ask the supervisor to stop its server and wait for it; kill its process group after ``timeout``."""
        if not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                try:
                    os.killpg(self.pid, signal.SIGKILL)  # the server dies with it (its parent death signal)
                except ProcessLookupError:
                    pass
                deadline = float("inf")
            time.sleep(0.05)
        _reap(self.pid)


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started, or None when it is gone (a zombie is gone: it only waits for its parent)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(process.create_time(), 2)
    except psutil.Error:
        return None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not this process's child


def _server(record: Record) -> Server:
    return Server("Prefect", "127.0.0.1", record.port, "/api/health", [], Path(os.devnull))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _users(prefect_home: Path) -> Path:
    return Path(prefect_home) / USERS


def _register(prefect_home: Path) -> tuple[Path, IO]:
    """This command as a user of the server (call under the start lock): a lock file it holds while it runs."""
    path = _users(prefect_home) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path, locks.acquire(path, wait=True)  # a supervisor may probe it for a moment


def live_users(prefect_home: Path, prune: bool = False) -> int:
    """The registered commands still running: each holds its lock file. With ``prune`` (under the start lock, so
    no command is registering), the files of those that ended without unregistering are removed."""
    count = 0
    for path in _users(prefect_home).glob("*"):
        try:
            with open(path) as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    count += 1
                    continue
                if prune:
                    path.unlink(missing_ok=True)
        except FileNotFoundError:
            continue  # unregistered meanwhile
    return count


def _launch(prefect_home: Path) -> Record:
    """Start a supervisor and its server, detached; record them in server.json."""
    port = _free_port()
    with open(Path(prefect_home) / LOG, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "vaemo.prefect_server", str(prefect_home), str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=prefect_home)
    _children.append(process)
    record = Record(f"http://127.0.0.1:{port}", process.pid, port, _started_at(process.pid) or 0.0)
    record.write(prefect_home)
    return record


_children: list[subprocess.Popen] = []  # supervisors this process started: kept, so Python does not warn on them


def _wait_ready(record: Record, log: Path) -> None:
    """Wait until the recorded server answers; one that does not within the start timeout is stopped."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    server = _server(record)
    while not server.healthy():
        if not record.alive():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ServerError(f"the Prefect server stopped while starting (log {log}):\n{tail}")
        if time.monotonic() > deadline:
            record.stop(timeout=0)
            raise ServerError(f"the Prefect server did not answer within {START_TIMEOUT_SECONDS} s (log {log})")
        time.sleep(0.1)


@contextmanager
def shared_server(prefect_home: Path, while_starting: Callable[[], T] = lambda: None) -> Iterator[tuple[str, T]]:
    """The work directory's Prefect server, with this command registered as its user until the block ends; started
    when there is none or the recorded one is gone. Yields its API URL and what ``while_starting`` returns: it runs
    while a new server boots (before the block when the server is reused)."""
    home = Path(prefect_home)
    home.mkdir(parents=True, exist_ok=True)
    idle = idle_seconds()
    log = home / LOG
    user = None
    try:
        with prefect_start_lock(home):
            user = _register(home)
            record = Record.read(home)
            reused = record is not None and record.alive()
            if reused:
                _wait_ready(record, log)  # at once, unless a refused command left it booting
            else:
                if not any(os.environ.get(f"PREFECT_{part}_DATABASE_CONNECTION_URL") for part in ("API", "SERVER")):
                    store_templates.seed(home / DATABASE, store_templates.PREFECT)
                new_database = not (home / DATABASE).exists()
                record = _launch(home)
                try:
                    prepared = while_starting()
                except BaseException:
                    # A refusal: a server that migrates a new database finishes first (stopped half way, it could
                    # leave the database half made); on a ready database it is left to the idle rule below.
                    if new_database:
                        _wait_ready(record, log)
                    raise
                _wait_ready(record, log)
        if reused:
            prepared = while_starting()
        yield f"{record.url}/api", prepared
    finally:
        if user is not None:
            with prefect_start_lock(home):
                path, handle = user
                path.unlink(missing_ok=True)
                locks.release(handle)
                if idle == 0 and not live_users(home, prune=True) and (found := Record.read(home)):
                    found.stop()
                    (home / RECORD).unlink(missing_ok=True)


def supervise(prefect_home: Path, port: int) -> int:
    """Run the server until it has had no users for the idle period, or until SIGTERM (0); 1 if it stops itself."""
    home = Path(prefect_home)
    idle = idle_seconds()
    server = api_server(home, port)
    # Raised, not noted: a SIGTERM must also end a wait for the start lock, held by the command that sent it.
    stop_on_signals()
    try:
        server.start()
        ready, unused_since = False, None
        while server.running():
            time.sleep(POLL_SECONDS)
            ready = ready or server.healthy()
            if not ready:
                continue  # a first start migrates the database: never cut short
            if live_users(home):
                unused_since = None
                continue
            unused_since = unused_since or time.monotonic()
            if time.monotonic() - unused_since < idle:
                continue
            if not home.is_dir():
                return 0  # the work directory was removed: nothing to record, nor a lock to make again there
            with prefect_start_lock(home):  # no command registers meanwhile
                if live_users(home, prune=True):
                    continue
                mine = Record.read(home)
                if mine and mine.pid == os.getpid():
                    (home / RECORD).unlink()
                server.stop()
                return 0
        return 1
    except Stopped:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1]), int(sys.argv[2])))
