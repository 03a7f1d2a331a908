"""Small pieces every stage flow shares: run tags for lineage, the stage's MLflow run with its link in
Prefect, refusals as failed states, and the `gpu` slot that counts the node's GPUs."""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import httpx
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Failed

from vaemo import tracking
from vaemo.artifacts import ModelFolder
from vaemo.config import TrackingConfig
from vaemo.devices import visible_gpus
from vaemo.errors import VaemoError, writing
from vaemo.servers import run_child
from vaemo.tracking import Tag

GPU_SLOT = "gpu"
# A holder renews its lease while it runs; a killed holder's slot frees once the lease expires.
GPU_LEASE_SECONDS = 60  # the least Prefect's server accepts
GPU_LEASE_RENEW_SECONDS = GPU_LEASE_SECONDS / 4
PROGRESS_SECONDS = 3.0  # how often a training stage's progress artifact follows its step log


def flow_run_tags() -> dict[str, str]:
    """Tags that tie an MLflow run to the Prefect flow run that made it."""
    flow_run = get_run_context().flow_run
    tags = {Tag.FLOW_RUN_ID: str(flow_run.id), Tag.FLOW_RUN_NAME: flow_run.name}
    if flow_run.deployment_id:
        tags[Tag.DEPLOYMENT_ID] = str(flow_run.deployment_id)
    return tags


def run_name(*what: str) -> str:
    """A flow run's name: what it runs and when it started (UTC, to the minute), e.g. "demo-2026-12-02T17:05"."""
    return "-".join([*what, f"{datetime.now(UTC):%Y-%m-%dT%H:%M}"])


def vaemo_flow(name: str, check=None, subject: Callable[[dict], str] | None = None):
    """Decorate a stage's flow function: ``check(**parameters)`` refuses what cannot work (a VaemoError) before
    any work, and the command line runs it too before it starts a Prefect server (``flow.fn.check``). A refusal
    ends the flow Failed with its one line, and with the error as its data, so the command line can tell a
    refusal (exit 2) from a bug (a traceback). The storage's refusal of a write (a full disk), in any stage, is
    such an error too (StorageError, exit 1).

    Its runs are named by ``run_name`` after ``subject(parameters)`` (default: the flow's name), instead of
    Prefect's random adjective-animal names."""

    def decorate(flow_function):
        signature = inspect.signature(flow_function, eval_str=True)

        @functools.wraps(flow_function)
        def run(*args, **kwargs):
            try:
                with writing(f"the output of the {name} stage"):
                    if check:
                        bound = signature.bind(*args, **kwargs)
                        bound.apply_defaults()
                        check(**bound.arguments)
                    return flow_function(*args, **kwargs)
            except VaemoError as exc:
                get_run_logger().error("%s", exc)
                return Failed(message=str(exc), data=exc)

        # Prefect builds the parameters' schema from the signature, its annotations resolved where the flow is.
        run.__signature__ = signature
        run.check = check  # beside the function, which Flow.with_options keeps
        return flow(name=name, log_prints=True,
                    flow_run_name=lambda: run_name(subject(runtime.flow_run.parameters) if subject else name))(run)

    return decorate


def _lease_ledger() -> Path:
    """Where the holders of `gpu` slots note their leases: one file per lease, named by its id, holding its
    slots, touched at every renewal. PREFECT_HOME is shared by all commands of one work directory."""
    return Path(os.environ.get("PREFECT_HOME") or get_current_settings().home).expanduser() / "gpu-leases"


def _release_dead_leases(client) -> int:
    """Free the slots whose holders died: a killed run stops renewing its lease, so its ledger file stops being
    touched.

    A long-running Prefect server does this itself (its repossessor service); the work directory's server that
    ``vaemo`` commands share runs no services, so the next command does it here, through Prefect's client. The
    server keeps its leases on disk in PREFECT_HOME (see flows/environment.py), so a later server knows them."""
    released = 0
    for entry in _lease_ledger().glob("*"):
        try:
            if time.time() - entry.stat().st_mtime <= GPU_LEASE_SECONDS:
                continue
            lease_id = UUID(entry.name)
        except (OSError, ValueError):
            continue  # released meanwhile, or not a lease
        client.release_concurrency_slots_with_lease(lease_id)  # a no-op for a lease the server revoked itself
        entry.unlink(missing_ok=True)
        released += 1
    return released


def _renew_lease(lease_id: UUID, note: Path, stop: threading.Event) -> None:
    """Renew the lease (and touch its ledger file) a few times per lease period until ``stop`` is set."""
    with get_client(sync_client=True) as client:
        while not stop.wait(GPU_LEASE_RENEW_SECONDS):
            try:
                client.renew_concurrency_lease(lease_id, lease_duration=GPU_LEASE_SECONDS)
                note.touch()
            except httpx.HTTPError as exc:  # a lost server: the holder keeps running, its slot frees on expiry
                _logger().warning("could not renew the %r slot's lease %s: %s", GPU_SLOT, lease_id, exc)


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("vaemo.gpu_slot")


def _ensure_gpu_limit(client, node: int) -> None:
    """The global concurrency limit `gpu`, its limit this node's GPU count."""
    try:
        if client.read_global_concurrency_limit_by_name(GPU_SLOT).limit != node:
            client.update_global_concurrency_limit(GPU_SLOT, GlobalConcurrencyLimitUpdate(limit=node))
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOT, limit=node))
        except ObjectAlreadyExists:
            pass  # another run made it meanwhile


def _acquire_gpu_lease(client, occupy: int) -> UUID:
    """A lease on ``occupy`` slots of `gpu`, waiting while other holders use them and freeing those of dead
    holders meanwhile."""
    logger = _logger()
    warned = False
    while True:
        try:
            response = client.increment_concurrency_slots_with_lease([GPU_SLOT], occupy, "concurrency",
                                                                     lease_duration=GPU_LEASE_SECONDS)
            return UUID(response.json()["lease_id"])
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:  # 423 Locked: the slots are taken
                raise
        if _release_dead_leases(client):
            logger.warning("freed the %r slot of a run that stopped without releasing it", GPU_SLOT)
            continue
        if not warned:
            limit = client.read_global_concurrency_limit_by_name(GPU_SLOT)
            logger.warning("waiting for %d of the %r concurrency slots: other GPU stages hold %d of %d (the slots "
                           "of a killed run free when its lease expires, within %d s)", occupy, GPU_SLOT,
                           limit.active_slots, limit.limit, GPU_LEASE_SECONDS)
            warned = True
        time.sleep(5)


@contextmanager
def gpu_slot(gpus: int = 1):
    """Hold ``gpus`` slots of the global concurrency limit "gpu", whose limit is this node's GPU count (1 on a
    CPU host, so GPU stages still run one at a time there). A stage asking for more than the node has holds
    them all. The slots are a lease from Prefect's concurrency API, renewed while the stage runs and noted in a
    ledger in PREFECT_HOME, so that a later command frees the slots of one that was killed."""
    node = max(1, len(visible_gpus()))
    occupy = min(max(1, gpus), node)
    with get_client(sync_client=True) as client:
        _ensure_gpu_limit(client, node)
        lease_id = _acquire_gpu_lease(client, occupy)
        note = _lease_ledger() / str(lease_id)
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(f"{occupy}\n")
        stop = threading.Event()
        # In this context: Prefect's settings (the API URL of the command's server) live in context variables.
        renewer = threading.Thread(target=contextvars.copy_context().run, args=(_renew_lease, lease_id, note, stop),
                                   daemon=True, name=f"gpu-lease-{lease_id}")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            try:
                client.release_concurrency_slots_with_lease(lease_id)
                note.unlink(missing_ok=True)
            except httpx.HTTPError as exc:  # the note stays: a later command frees the slots once the lease lapses
                _logger().warning("could not release the %r slot's lease %s: %s", GPU_SLOT, lease_id, exc)


def publish_mlflow_link(key: str, what: str, tracking_cfg: TrackingConfig, work: Path, experiment_id: str,
                        run_id: str) -> str:
    """A link artifact ``key`` in the flow run to ``what``'s MLflow run; returns the run's URL."""
    url = tracking_cfg.run_url(work, experiment_id, run_id)
    create_link_artifact(key=key, link=url, link_text=f"MLflow run {run_id} ({what})",
                         description=f"The {what}'s MLflow run")
    return url


@contextmanager
def stage_run(stage: str, work_dir: str, tracking_cfg: TrackingConfig, params: dict, tags: dict | None = None,
              system_metrics: bool = False):
    """One MLflow run for a stage flow, tied to the flow run by tags and by a link artifact in Prefect."""
    work = Path(work_dir)
    uri = tracking_cfg.uri(work)
    with tracking.stage_run(stage, tracking_uri=uri, experiment=tracking_cfg.experiment, work_dir=work, params=params,
                            tags={**flow_run_tags(), **(tags or {})}, system_metrics=system_metrics) as run:
        publish_mlflow_link(f"{stage}-mlflow-run", f"{stage} stage", tracking_cfg, work, run.info.experiment_id,
                            run.info.run_id)
        yield run, uri


@contextmanager
def gpu_stage_run(stage: str, work_dir: str, tracking_cfg: TrackingConfig, params: dict, tags: dict | None = None,
                  gpus: int = 1):
    """The stage's ``gpus`` slots of `gpu` and its MLflow run (with system metrics) for a GPU stage.

    Yields the MLflow run and the tracking URI (for loggers used from other threads or processes).
    """
    with gpu_slot(gpus), stage_run(stage, work_dir, tracking_cfg, params, tags, system_metrics=True) as (run, uri):
        yield run, uri


# torchrun, ending quietly with 128 + the signal when it is stopped (it has stopped its workers by then); torchrun
# itself ends with a traceback.
TORCHRUN = ("import sys\nfrom torch.distributed.elastic.multiprocessing.api import SignalException\n"
            "from torch.distributed.run import main\ntry:\n    main()\nexcept SignalException as stop:\n"
            "    sys.exit(128 + stop.sigval)")


def torchrun(module: str, settings, out: str, args: list[str], mlflow_uri: str, run_id: str, resume: bool) -> None:
    """Run a training entry point under torchrun on this node (DDP with ``settings.processes`` processes).

    The settings travel as a JSON file in ``out``; the ranks log into the flow's MLflow run.
    """
    settings_file = ModelFolder(out).settings_file("torchrun-request")
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(settings.model_dump_json())
    command = [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc-per-node={settings.processes}",
               "-m", module, *args, "--out", out, "--settings", str(settings_file), "--mlflow-uri", mlflow_uri,
               "--mlflow-run-id", run_id] + (["--resume"] if resume else [])
    run_child(command)


def _follow_steps(artifact_id: UUID, what: str, folder: Path, total: int, stop: threading.Event) -> None:
    from vaemo.train.loop import last_logged_step  # here: the training code (torchaudio) is for training commands

    shown = -1
    while True:
        stopping = stop.wait(PROGRESS_SECONDS)
        step = last_logged_step(folder)
        if step != shown:
            try:
                update_progress_artifact(artifact_id, progress=100.0 * min(step, total) / total,
                                         description=f"{what}: step {step} of {total}")
                shown = step
            except httpx.HTTPError as exc:  # the bar is not worth stopping the training for
                _logger().warning("could not update the progress of %s: %s", what, exc)
        if stopping:
            return


@contextmanager
def training_progress(key: str, what: str, out: str, total: int):
    """A progress artifact ``key`` (step of ``total``) that follows the step log in ``out`` every few seconds,
    whether the training runs in this process or under torchrun; its last update comes when the block ends."""
    artifact_id = create_progress_artifact(progress=0.0, key=key, description=f"{what}: step 0 of {total}")
    stop = threading.Event()
    follower = threading.Thread(target=contextvars.copy_context().run,  # Prefect's API URL lives in the context
                                args=(_follow_steps, artifact_id, what, Path(out), total, stop), daemon=True,
                                name=f"progress-{key}")
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join()
