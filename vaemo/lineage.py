"""Walk an MLflow run back to what made its inputs: shards, captions, Stage 1 / Stage 2 models.

Every stage logs what it reads as MLflow run inputs: datasets with content digests (``Tag.DIGEST``)
and logged models (MLflow's model inputs); what it makes as run outputs: logged models, and
datasets as run tags (``Tag.output_digest``: MLflow's outputs hold models only). So a run's inputs
lead to the runs that produced them, without reading any tensor (the keys: ``vaemo.tracking.Tag``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlflow
from mlflow.exceptions import MlflowException

from vaemo.tracking import CONTEXT_TAG, Tag


@dataclass
class Link:
    """One input of a run: what it is, its digest, and the run that produced it (when found)."""

    name: str
    context: str
    digest: str
    detail: dict = field(default_factory=dict)
    producer: str | None = None


@dataclass
class Node:
    run_id: str
    stage: str
    status: str
    skipped: bool
    inputs: list[Link]
    outputs: dict[str, str]


def _input_tags(dataset_input) -> dict[str, str]:
    return {tag.key: tag.value for tag in dataset_input.tags}


def _producer_by_tag(client: mlflow.MlflowClient, experiment_ids: list[str], key: str, value: str) -> str | None:
    """The oldest finished, not-skipped run whose tag ``key`` is ``value`` (the run that made that output)."""
    runs = client.search_runs(experiment_ids,
                              filter_string=f"tags.`{key}` = '{value}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=50)
    runs = [r for r in runs if r.data.tags.get(Tag.SKIPPED) != "true"]
    return runs[0].info.run_id if runs else None


def _model_link(client: mlflow.MlflowClient, model_id: str) -> Link:
    """A model input: the logged model, the run that made it, and its registered versions."""
    try:
        model = client.get_logged_model(model_id)
    except MlflowException:
        return Link("model", "model", "", {"model_id": model_id, "note": "logged model not in this store"})
    versions = [client.get_model_version(v.name, v.version)  # searching leaves the aliases out
                for v in client.search_model_versions(f"run_id = '{model.source_run_id}'")
                if v.source == f"models:/{model_id}"]
    detail = {"model_id": model_id, **{k: v for k, v in model.tags.items() if k.startswith(Tag.PREFIX)},
              "registered": ", ".join(f"{v.name} v{v.version}" + "".join(f" @{a}" for a in v.aliases)
                                      for v in versions)}
    return Link(f"{model.name}_model", "model", "", detail, producer=model.source_run_id)


def node(client: mlflow.MlflowClient, run_id: str) -> Node:
    """One run with its inputs resolved to the runs that produced them."""
    run = client.get_run(run_id)
    tags = run.data.tags
    experiments = [run.info.experiment_id]
    links: list[Link] = []
    for item in run.inputs.dataset_inputs:
        itags = _input_tags(item)
        context = itags.get(CONTEXT_TAG, "")
        digest = itags.get(Tag.DIGEST, item.dataset.digest)
        name = item.dataset.name
        if context == "output":  # a run logged before outputs became tags
            continue
        if name == "shards":
            links.append(Link(name, context, digest, {"uri": item.dataset.source},
                              _producer_by_tag(client, experiments, Tag.output_digest("shards"), digest)))
        elif Tag.LANCEDB_TAG in itags:
            detail = {"uri": item.dataset.source, "table": itags.get(Tag.LANCEDB_TABLE), "tag": itags[Tag.LANCEDB_TAG],
                      "version": itags.get(Tag.LANCEDB_VERSION)}
            producer = _producer_by_tag(client, experiments, Tag.output_digest(name), digest)
            links.append(Link(name, context, digest, detail, producer))
        else:
            links.append(Link(name, context, digest, {"uri": item.dataset.source}))
    links += [_model_link(client, item.model_id) for item in run.inputs.model_inputs]
    outputs = {k.removeprefix(Tag.OUTPUT): v for k, v in tags.items() if k.startswith(Tag.OUTPUT)}
    return Node(run_id, tags.get(Tag.STAGE, "?"), run.info.status, tags.get(Tag.SKIPPED) == "true", links, outputs)


def chain(run_id: str, tracking_uri: str | None = None) -> list[Node]:
    """The run and, breadth-first, every run that produced one of its inputs (each once)."""
    client = mlflow.MlflowClient(tracking_uri)
    start = client.get_run(run_id)
    reused = start.data.tags.get(Tag.REUSED_RUN)
    nodes: list[Node] = []
    seen: set[str] = set()
    queue = [run_id] + ([reused] if reused else [])
    while queue:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        found = node(client, current)
        nodes.append(found)
        queue.extend(link.producer for link in found.inputs if link.producer and link.producer not in seen)
    return nodes


def format_chain(nodes: list[Node]) -> str:
    lines = []
    for found in nodes:
        status = found.status + (" (skipped: outputs of an earlier run reused)" if found.skipped else "")
        lines.append(f"{found.stage} run {found.run_id} {status}")
        for link in found.inputs:
            detail = ", ".join(f"{k}={v}" for k, v in link.detail.items() if v)
            made = f" <- {link.producer}" if link.producer else ""
            lines.append(
                f"  input {link.name} ({link.context}) digest {link.digest}{' ' + detail if detail else ''}{made}"
            )
        for name, value in sorted(found.outputs.items()):
            lines.append(f"  output {name} {value}")
    return "\n".join(lines)
