"""Small pieces every stage flow shares: run tags for lineage, the stage's MLflow run with its link in
Prefect, refusals as failed states, and the `gpu` slot that counts the node's GPUs."""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
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
GPU_LEASE_SECONDS = 60


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


def _release_expired_leases(client, limit_id) -> int:
    """Free the slots whose holders died (a killed run stops renewing its lease).

    A long-running Prefect server does this itself (its repossessor service). The temporary server
    a single ``vaemo`` command starts runs no services, so the next command does it here, reading
    the lease files that all temporary servers of one work directory share (see flows/environment.py).
    """
    from prefect.server.concurrency.lease_storage import get_concurrency_lease_storage
    from prefect.utilities.asyncutils import run_coro_as_sync

    storage = get_concurrency_lease_storage()

    async def expired() -> list:
        leases = [await storage.read_lease(i) for i in await storage.read_expired_lease_ids()]
        return [lease.id for lease in leases if lease and limit_id in lease.resource_ids]

    lease_ids = run_coro_as_sync(expired())
    for lease_id in lease_ids:
        client.release_concurrency_slots_with_lease(lease_id)
    return len(lease_ids)


@contextmanager
def gpu_slot(gpus: int = 1):
    """Hold ``gpus`` slots of the global concurrency limit "gpu", whose limit is this node's GPU count (1 on a
    CPU host, so GPU stages still run one at a time there). A stage asking for more than the node has holds
    them all."""
    logger = get_run_logger()
    node = max(1, len(visible_gpus()))
    occupy = min(max(1, gpus), node)
    with get_client(sync_client=True) as client:
        try:
            if client.read_global_concurrency_limit_by_name(GPU_SLOT).limit != node:
                client.update_global_concurrency_limit(GPU_SLOT, GlobalConcurrencyLimitUpdate(limit=node))
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOT, limit=node))
            except ObjectAlreadyExists:
                pass  # another run made it meanwhile
        warned = False
        while True:
            limit = client.read_global_concurrency_limit_by_name(GPU_SLOT)
            if limit.active_slots + occupy <= limit.limit:
                break
            if _release_expired_leases(client, limit.id):
                logger.warning("freed the %r slot of a run that stopped without releasing it", GPU_SLOT)
                continue
            if not warned:
                logger.warning("waiting for %d of the %r concurrency slots: other GPU stages hold %d of %d (the slots "
                               "of a killed run free when its lease expires, within %d s)", occupy, GPU_SLOT,
                               limit.active_slots, limit.limit, GPU_LEASE_SECONDS)
                warned = True
            time.sleep(5)
    with concurrency(GPU_SLOT, occupy=occupy, strict=True, lease_duration=GPU_LEASE_SECONDS):
        yield


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
