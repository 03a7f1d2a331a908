"""What a ``vaemo`` command runs in: Prefect's state in the work directory, the Prefect API it talks to,
its log file, and how it runs a flow and reads the outcome.

Nothing here imports Prefect at module level: its settings are read once, when it is first
imported, so :func:`prepare` must run before that.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from prefect import Flow

T = TypeVar("T")


def prepare(settings) -> None:
    """Prefect and Hugging Face settings for a command on ``settings.work_dir``, and the MLflow runs that killed
    commands left RUNNING marked KILLED; call before Prefect is imported."""
    from vaemo.tracking import mark_killed_runs

    work_dir = settings.work_dir
    os.environ.setdefault("PREFECT_HOME", str((Path(work_dir) / "prefect").resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    # The library's own log lines (skips, resumed runs, skipped samples) belong in the flow run's logs too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "vaemo")
    library = logging.getLogger("vaemo")
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Concurrency leases (the "gpu" slot) on disk in PREFECT_HOME, not in one server's memory: a later server of the
    # work directory can then expire the slot of a command that was killed.
    os.environ.setdefault(
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem"
    )
    killed = mark_killed_runs(settings.mlflow_uri())
    if killed:
        print(f"vaemo: marked {len(killed)} MLflow run(s) KILLED, left RUNNING by processes that were killed: "
              f"{', '.join(killed)}", flush=True)


@contextmanager
def prefect_api(while_starting: Callable[[], T] = lambda: None) -> Iterator[T]:
    """Use PREFECT_API_URL when set; else the work directory's own server (vaemo/prefect_server.py), started by the
    first command that needs it and reused by later ones. Yields what ``while_starting`` returns: it runs while a new
    server boots (a command imports its flow and checks its input meanwhile, instead of paying for both in turn).

    Prefect would start its temporary server lazily in every process, so each Dask worker would boot its own;
    exporting one URL before the cluster starts lets all of them share it.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield while_starting()
        return
    from vaemo.prefect_server import shared_server

    with shared_server(Path(os.environ["PREFECT_HOME"]), while_starting) as (api_url, prepared):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"] = api_url
        try:
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                yield prepared
        finally:
            os.environ.pop("PREFECT_API_URL")
            # Send buffered logs and events while this command still counts as a user of the server; afterwards
            # they could be retried against a closed port at interpreter exit.
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)


class _LogFile(logging.FileHandler):
    """A log file made (with its folder) only when there is something to write."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_to(path: Path) -> Path:
    """The library's warnings, and a bug's traceback, also go to ``path`` (appended, with times and pids)."""
    handler = _LogFile(path, delay=True)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"%(asctime)s pid {os.getpid()} %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return path


def run_flow(load_flow: Callable[[], Flow], what: str | None = None, **params) -> int:
    """Run a flow for a command and print its summary: 0. A refusal raises its VaemoError again, a bug its
    exception; a flow that ran but did not complete (some of its work failed) says why (naming ``what``): 1.
    The flow is imported (``load_flow``) and its ``check`` of the input runs while the Prefect server starts."""

    def load_and_check() -> Flow:
        a_flow = load_flow()
        if getattr(a_flow.fn, "check", None):
            a_flow.fn.check(**params)
        return a_flow

    with prefect_api(load_and_check) as a_flow:
        state = a_flow(**params, return_state=True)
    if state.is_completed():
        for line in state.result()["summary"].splitlines():
            print(line if line.startswith(" ") else f"vaemo: {line}")
        return 0
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    print(f"vaemo: {what or a_flow.name} did not complete: {state.message}", file=sys.stderr)
    return 1
