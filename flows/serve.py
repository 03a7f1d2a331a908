"""Prefect deployments of ``pipelines.yaml`` for ``vaemo serve``: one per named pipeline, plus ``new-corpus``.

Parameters are the flows' pydantic models (``Settings``, ``CorpusConfig``), so the Prefect UI shows
a validated form pre-filled with the file's values. Runs of one deployment never overlap: a
deployment concurrency limit of 1 (a Prefect global limit) queues the next run until the current
one ends, and the pipeline's lock in the work directory refuses any run that slips past it.
"""

from __future__ import annotations

import hashlib
import os

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment

from flows.pipeline import vaemo_new_corpus, vaemo_pipeline
from vaemo.config import Settings
from vaemo.errors import ConfigError

NEW_CORPUS = "new-corpus"
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deployments(settings: Settings) -> list[RunnerDeployment]:
    values = settings.model_dump(mode="json")
    version = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:12]  # which pipelines.yaml a run used
    served = [
        vaemo_pipeline.to_deployment(
            name=name,
            parameters={"pipeline": name, "settings": values},
            cron=spec.schedule,
            concurrency_limit=ONE_AT_A_TIME,
            version=version,
            tags=["vaemo", f"pipeline:{name}"],
            description=f"Pipeline `{name}`: {' -> '.join(spec.stages)} on {', '.join(spec.corpora)}. "
                        "Stages whose inputs and settings did not change are skipped.",
        )
        for name, spec in settings.pipelines.items()
    ]
    if settings.pipelines:
        first = next(iter(settings.pipelines))
        served.append(vaemo_new_corpus.to_deployment(
            name=NEW_CORPUS, parameters={"pipeline": first, "settings": values}, concurrency_limit=ONE_AT_A_TIME,
            version=version, tags=["vaemo", NEW_CORPUS],
            description="Run a named pipeline on a corpus folder that is not in pipelines.yaml: fill in `corpus_name` "
                        "and `corpus` (path, dataset, labels). Its outputs go to pipelines/<pipeline>@<corpus_name>.",
        ))
    return served


def serve_pipelines(settings: Settings, source: str) -> int:
    """``vaemo serve``: the deployments of a pipelines file until Ctrl-C; runs triggered in the UI or by schedules
    run here."""
    if not settings.pipelines:
        raise ConfigError(f"{source}: no pipelines to serve")
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "vaemo serve needs a running Prefect server: start `vaemo ui` and export the PREFECT_API_URL it "
            "prints, or set PREFECT_API_URL to your server's API (http://HOST:4200/api)"
        )
    served = deployments(settings)
    schedules = {name: spec.schedule for name, spec in settings.pipelines.items() if spec.schedule}
    print(f"vaemo: serving {', '.join(f'{d.flow_name}/{d.name}' for d in served)} on {os.environ['PREFECT_API_URL']}"
          + (f"; schedules (UTC): {schedules}" if schedules else "") + "; Ctrl-C stops", flush=True)
    try:
        serve(*served, print_starting_message=False)
    except KeyboardInterrupt:
        print("vaemo: stopped serving (scheduled runs are paused until the next `vaemo serve`)")
    return 0
