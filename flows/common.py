"""Small pieces every stage flow shares: run tags for lineage and the one-GPU-stage-at-a-time slot."""

from __future__ import annotations

from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context
from prefect.exceptions import ObjectAlreadyExists

GPU_SLOT = "gpu"


def flow_run_tags() -> dict[str, str]:
    """Tags that tie an MLflow run to the Prefect flow run that made it."""
    flow_run = get_run_context().flow_run
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": flow_run.name}
    if flow_run.deployment_id:
        tags["prefect.deployment_id"] = str(flow_run.deployment_id)
    return tags


@contextmanager
def gpu_slot():
    """Hold the global concurrency slot "gpu" (limit 1, created when missing) for a GPU-heavy stage."""
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOT, limit=1))
        except ObjectAlreadyExists:
            pass  # made by an earlier run or by an operator with another limit
    with concurrency(GPU_SLOT, occupy=1, strict=True):
        yield
