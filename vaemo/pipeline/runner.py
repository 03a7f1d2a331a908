"""The loop that runs a named pipeline: for every step, key -> skip / resume / clear -> run -> marker.

A step is one stage on its inputs (ingest runs one step per corpus). Its key is the sha256 of its
inputs' digests and its settings; its folder holds its outputs and a marker (``stage.json``) with
the key, the state and what later steps need of its result. A step whose marker holds the same key
and state ``done`` is skipped, and its outputs are reused. A trained step (pretrain, align) with
the same key but no ``done`` resumes from its checkpoints; a new key clears its folder (the old
outputs are in MLflow). A failed step leaves the markers of earlier steps intact, so a re-run
resumes at the failed step.

The orchestrator supplies two things: ``execute(step, resume)``, which runs a step and returns its
result (the Prefect flow wraps each stage flow as a subflow), and a :class:`Recorder` (MLflow
parent and child runs). Nothing here imports Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vaemo import locks
from vaemo.artifacts import ModelFolder, write_json_atomic
from vaemo.config import Settings
from vaemo.errors import BusyError, ConfigError, VaemoError

log = logging.getLogger(__name__)

MARKER = "stage.json"
LOCK = ".pipeline.lock"  # held by the run in progress; the OS frees it when that process dies
# Where each stage's outputs live under <work_dir>/pipelines/<name>/ (ingest: one folder per corpus).
FOLDERS = {"corpora": "corpora", "pretrain": "stage1", "caption": "captions-db", "align": "stage2", "evaluate": "eval"}


def layout(work_dir: Path, name: str) -> dict[str, Path]:
    root = Path(work_dir) / "pipelines" / name
    return {"root": root, **{stage: root / folder for stage, folder in FOLDERS.items()}}


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_marker(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def write_marker(folder: Path, data: dict) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(folder) / MARKER, data)


@dataclass
class Step:
    """One stage on its inputs, as the loop runs it."""

    stage: str
    label: str  # the stage, or "ingest:<corpus>"
    out: Path  # its outputs and marker
    key: str
    params: dict  # keyword arguments of the stage's run, besides the resume flag and tracking
    keep: tuple[str, ...]  # result entries the marker records for later steps and re-runs
    trained: bool = False  # resumable from checkpoints; a new key clears its folder
    intact: Callable[[dict], bool] | None = None  # whether a done marker's outputs are still what it recorded
    after: Callable[[], None] | None = None  # once the step ran (not when skipped)


class StepRefused(VaemoError):
    """A step cannot start: an input it needs is missing."""


class StepFailed(VaemoError):
    """``execute`` could not complete a step; the message says why."""


class PipelineFailed(VaemoError):
    def __init__(self, label: str, message: str):
        super().__init__(f"stage {label} failed: {message}; earlier stages' outputs are kept and a re-run resumes here")
        self.label, self.reason = label, message
        self.outcomes: list[StepOutcome] = []  # the steps up to the failed one, filled in by run_pipeline


@dataclass
class StepOutcome:
    """How one step of a pipeline run went, for the orchestrator to show."""

    label: str  # the stage, or "ingest:<corpus>"
    outcome: str  # "ran", "skipped" or "failed"
    seconds: float
    run_id: str | None = None  # its child run (for a failed step: the recorder's, when it made one)
    reused_run_id: str | None = None  # a skipped step's: the run whose outputs it reuses

    @property
    def stage(self) -> str:
        return self.label.partition(":")[0]

    @property
    def corpus(self) -> str:
        return self.label.partition(":")[2]


@dataclass
class Plan:
    """What the table's planners see: the pipeline, its folders and the steps that ran so far."""

    name: str
    settings: Settings
    dirs: dict[str, Path]
    results: dict[str, dict] = field(default_factory=dict)  # label -> result, in run order

    @property
    def spec(self):
        return self.settings.pipelines[self.name]

    def stage_settings(self, stage: str):
        return self.spec.settings_for(self.settings.stages, stage)

    @property
    def main_corpus(self) -> Path:
        """The ingest folder later stages read: the first corpus's."""
        return self.dirs["corpora"] / self.spec.corpora[0]


# A stage's planner: the steps to run now (computed after the earlier stages ran), or StepRefused.
Planner = Callable[[Plan], list[Step]]
Execute = Callable[[Step, bool], dict]


class Recorder(Protocol):
    """Where a pipeline run is recorded (MLflow parent and child runs: vaemo.tracking.PipelineRuns)."""

    parent_id: str

    def skipped(self, step: Step, marker: dict) -> dict: ...

    def done(self, label: str, result: dict) -> None: ...

    def failed(self, label: str, message: str) -> str | None:
        """Record the failure; the failed step's child run id, where there is one."""

    def finished(self) -> None: ...


def run_pipeline(name: str, settings: Settings, stages: dict[str, Planner], execute: Execute,
                 recorder: Recorder) -> dict:
    """Run the named pipeline's stages in order, each planned by its row of ``stages`` (``vaemo.pipeline.STAGES``);
    PipelineFailed (after recording it) when a step fails."""
    plan = Plan(name, settings, layout(settings.work_dir, name))
    outcomes: list[StepOutcome] = []
    current, started = "pipeline", time.monotonic()  # the step in progress, named in the parent run's error
    try:
        for stage in plan.spec.stages:
            current, started = stage, time.monotonic()
            try:
                steps = stages[stage](plan)
            except StepRefused as refused:
                raise PipelineFailed(stage, str(refused)) from None
            for step in steps:
                current, started = step.label, time.monotonic()
                result, reused = _run_step(step, execute, recorder)
                plan.results[step.label] = result
                recorder.done(step.label, result)
                outcome = "skipped" if result.get("skipped") else "ran"
                outcomes.append(StepOutcome(step.label, outcome, time.monotonic() - started,
                                            result.get("mlflow_run_id"), reused))
    except PipelineFailed as failure:
        outcomes.append(StepOutcome(failure.label, "failed", time.monotonic() - started,
                                    recorder.failed(failure.label, failure.reason)))
        failure.outcomes = outcomes
        raise
    except BaseException as exc:
        recorder.failed(current, f"{type(exc).__name__}: {exc}")
        raise
    recorder.finished()
    return {"pipeline": name, "mlflow_run_id": recorder.parent_id,
            "children": {label: result.get("mlflow_run_id") for label, result in plan.results.items()},
            "skipped": [label for label, result in plan.results.items() if result.get("skipped")],
            "outcomes": outcomes}


def _run_step(step: Step, execute: Execute, recorder: Recorder) -> tuple[dict, str | None]:
    """The step's result, and the run it reused when it was skipped."""
    marker = read_marker(step.out)
    same = marker.get("key") == step.key
    if same and marker.get("state") == "done" and (step.intact is None or step.intact(marker)):
        log.info(
            "%s: skipped, same inputs and settings as run %s (key %s)", step.label, marker.get("run_id"), step.key[:12]
        )
        return {**recorder.skipped(step, marker), "skipped": True}, marker.get("run_id")
    resume = False
    if step.trained:
        resume = same and bool(ModelFolder(step.out).checkpoints())
        if not same and step.out.exists():
            shutil.rmtree(step.out)  # outputs of other inputs or settings: they are in MLflow; start clean
        write_marker(step.out, {"key": step.key, "state": "running"})
        if resume:
            log.info("%s: resuming from the checkpoints in %s (same key)", step.label, step.out)
    try:
        result = execute(step, resume)
    except StepFailed as failed:
        raise PipelineFailed(step.label, str(failed)) from None
    write_marker(step.out, {"key": step.key, "state": "done", "run_id": result["mlflow_run_id"],
                            "result": {k: result[k] for k in step.keep}})
    if step.after:
        step.after()
    return result, None


def preflight(settings: Settings, name: str) -> None:
    """Refuse a pipeline whose corpora, tools, captioning model or prompt are missing, before any stage starts."""
    if name not in settings.pipelines:
        raise ConfigError(f"no pipeline {name!r} (known: {sorted(settings.pipelines)})")
    spec = settings.pipelines[name]
    if "ingest" in spec.stages:
        from vaemo.ingest.run import check_source

        settings.check_corpus_paths(spec.corpora)
        for corpus in (settings.corpora[c] for c in spec.corpora):
            check_source(corpus.path, corpus.dataset, corpus.labels)
    if "caption" in spec.stages:
        from vaemo.caption.run import check_settings

        check_settings(spec.settings_for(settings.stages, "caption"))


@contextmanager
def one_run_at_a_time(settings: Settings, name: str):
    """Hold the pipeline's lock in its work directory; a second run of it is refused (its outputs are shared)."""
    try:
        handle = locks.acquire(layout(settings.work_dir, name)["root"] / LOCK)
    except locks.Busy as busy:
        raise BusyError(f"pipeline {name} is already running in {settings.work_dir} ({busy.holder}); "
                        "this run did not start: wait for that one to finish") from None
    try:
        yield
    finally:
        locks.release(handle)
