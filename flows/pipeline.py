"""The ``vaemo_pipeline`` flow: ingest -> pretrain -> caption -> align -> evaluate as subflows.

Every stage writes into its own folder under ``<work_dir>/pipelines/<name>/`` and leaves a marker
``stage.json`` with a key: the sha256 of its inputs' digests (shard-set digest, LanceDB tag and
version, model file digests, a listing of the source files) and of its settings. A stage whose
marker holds the same key is skipped (its MLflow child run is tagged ``vaemo.skipped=true`` and
names the run whose outputs it reuses). A failed stage leaves earlier stages' markers intact, so
a re-run resumes from the failed stage; pretrain and align continue from their checkpoints when
the key matches.

MLflow: one parent run per pipeline run (tagged with the Prefect flow-run id and deployment), one
child run per stage (``mlflow.parentRunId``).

One run of a pipeline per work directory at a time (a file lock; a second run is refused).
``vaemo_new_corpus`` runs a named pipeline on a corpus given as a parameter (the "new-corpus"
deployment of ``vaemo serve``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.states import Failed

from flows.common import flow_run_tags
from vaemo import locks, tracking
from vaemo.config import STAGE_ORDER, CorpusConfig, Settings
from vaemo.ingest.shards import write_json_atomic

MARKER = "stage.json"
LOCK = ".pipeline.lock"  # held by the run in progress; the OS frees it when that process dies


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def source_listing_digest(folder: Path, labels: Path | None) -> str:
    """A cheap key of a corpus folder: every file's relative path, size and mtime (and the labels file's bytes)."""
    entries = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries.append(f"{path.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(entries).encode())
    if labels is not None and Path(labels).is_file():
        digest.update(Path(labels).read_bytes())
    return digest.hexdigest()


def read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def write_marker(folder: Path, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / MARKER, data)


def layout(work_dir: Path, name: str) -> dict[str, Path]:
    root = Path(work_dir) / "pipelines" / name
    return {"root": root, "corpora": root / "corpora", "pretrain": root / "stage1", "caption": root / "captions-db",
            "align": root / "stage2", "evaluate": root / "eval"}


def stage_settings(settings: Settings, spec, stage: str):
    """``stages.<stage>`` with the pipeline's overrides for it."""
    base = getattr(settings.stages, stage)
    overrides = spec.stage_overrides.get(stage) or {}
    return base.model_validate({**base.model_dump(), **overrides}) if overrides else base


class _Pipeline:
    """The parent run, child runs of skipped stages, and the markers."""

    def __init__(self, name: str, settings: Settings):
        self.name, self.settings, self.logger = name, settings, get_run_logger()
        self.work = Path(settings.work_dir)
        self.uri = settings.tracking.uri(self.work)
        self.experiment_id = tracking.configure(self.uri, settings.tracking.experiment, self.work)
        self.client = mlflow.MlflowClient(self.uri)
        self.flow_tags = flow_run_tags()
        deployment = self.flow_tags.get("prefect.deployment_id", "none")
        self.parent = self.client.create_run(self.experiment_id, run_name=f"pipeline {name}", tags={
            "vaemo.stage": "pipeline", "vaemo.pipeline": name, "prefect.deployment": deployment, **self.flow_tags})
        self.parent_id = self.parent.info.run_id
        self.stages: dict[str, dict] = {}
        self.current = "pipeline"  # the stage in progress, named in the parent run's error

    def skipped(self, stage: str, marker: dict, label: str | None = None) -> dict:
        """A child run that records the skip and reuses the outputs (and lineage) of the marker's run."""
        reused = marker.get("run_id", "")
        run = self.client.create_run(self.experiment_id, run_name=label or stage, tags={
            "vaemo.stage": stage, "vaemo.skipped": "true", "vaemo.skipped.reused_run_id": reused, "vaemo.key": marker["key"],
            **tracking.child_tags(self.parent_id), **self.flow_tags})
        try:
            source = self.client.get_run(reused)
            outputs = {k: v for k, v in source.data.tags.items() if k.startswith(("vaemo.output.", "vaemo.input."))}
            for key, value in outputs.items():
                self.client.set_tag(run.info.run_id, key, value)
        except Exception:  # noqa: BLE001 - the store may have lost the old run; the skip still stands
            pass
        self.client.set_terminated(run.info.run_id, "FINISHED")
        self.logger.info("%s: skipped, same inputs and settings as run %s (key %s)", label or stage, reused, marker["key"][:12])
        return {**marker.get("result", {}), "mlflow_run_id": run.info.run_id, "skipped": True}

    def fail(self, stage: str, message: str):
        """Mark the parent FAILED; a stage that failed before it opened its own run gets a FAILED child run here."""
        stage_name = stage.split(":")[0]
        started = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.`vaemo.stage` = '{stage_name}' and attributes.status = 'FAILED'"))
        if not started and stage_name in STAGE_ORDER:
            run = self.client.create_run(self.experiment_id, run_name=stage, tags={
                "vaemo.stage": stage_name, "vaemo.error": message[:5000], **tracking.child_tags(self.parent_id), **self.flow_tags})
            self.client.set_terminated(run.info.run_id, "FAILED")
        self.client.set_tag(self.parent_id, "vaemo.error", f"{stage}: {message}"[:5000])
        self.client.set_tag(self.parent_id, "vaemo.failed_stage", stage)
        self.client.set_terminated(self.parent_id, "FAILED")
        return Failed(message=f"stage {stage} failed: {message}; earlier stages' outputs are kept and a re-run resumes here")

    def done(self, stage: str, result: dict) -> None:
        self.stages[stage] = result
        self.client.set_tag(self.parent_id, f"vaemo.child.{stage}", result.get("mlflow_run_id", ""))
        if result.get("skipped"):
            self.client.set_tag(self.parent_id, f"vaemo.skipped.{stage}", "true")


def _continued(cfg, out: Path, key: str, p: _Pipeline):
    """With ``on_new_shards: continue``, the finished model of earlier shards becomes this run's starting point."""
    if cfg.on_new_shards != "continue":
        return cfg
    marker = read_marker(out)
    previous = out.parent / f"{out.name}-previous"
    if marker.get("key") not in (None, key) and marker.get("state") == "done":
        if previous.exists():
            shutil.rmtree(previous)
        out.rename(previous)
        marker = {}
        p.logger.info("pretrain: the shards changed; continuing from the last model (kept in %s)", previous)
    if marker.get("key") in (None, key) and (previous / "model.safetensors").is_file():
        return cfg.model_copy(update={"init": previous})
    return cfg


def _run(subflow, **params):
    """Call a stage flow as a subflow; (completed, result or message)."""
    state = subflow(**params, return_state=True)
    if state.is_completed():
        return True, state.result()
    return False, state.message or state.name


def preflight(settings: Settings, name: str) -> None:
    """Refuse a pipeline whose corpora, tools, captioning model or prompt are missing, before any stage starts."""
    from vaemo.config import ConfigError

    if name not in settings.pipelines:
        raise ConfigError(f"no pipeline {name!r} (known: {sorted(settings.pipelines)})")
    spec = settings.pipelines[name]
    if "ingest" in spec.stages:
        from vaemo.ingest.adapters import scan_corpus
        from vaemo.ingest.media import require_ffmpeg

        require_ffmpeg()
        settings.check_corpus_paths(spec.corpora)
        for corpus_name in spec.corpora:
            corpus = settings.corpora[corpus_name]
            scan_corpus(corpus.path, corpus.dataset, corpus.labels)
    if "caption" in spec.stages:
        from vaemo.caption.engines import resolve_model
        from vaemo.caption.prompt import load_prompt

        cfg = stage_settings(settings, spec, "caption")
        resolve_model(cfg.model)
        load_prompt(cfg.prompt)


PREFLIGHT_ERRORS = (ValueError, RuntimeError, OSError)  # ConfigError, CorpusError, EngineError, PromptError, missing tools


@flow(name="vaemo_pipeline", log_prints=True)
def vaemo_pipeline(pipeline: str, settings: Settings) -> dict:
    """Run the stages of the named ``pipeline`` of ``settings`` in order, each skipped when its key matches its marker.

    One run per pipeline and work directory at a time: a second one is refused (its outputs are shared).
    """
    try:
        preflight(settings, pipeline)
    except PREFLIGHT_ERRORS as exc:
        return Failed(message=f"pipeline {pipeline} cannot start: {exc}")
    try:
        lock = locks.acquire(layout(Path(settings.work_dir), pipeline)["root"] / LOCK)
    except locks.Busy as busy:
        return Failed(message=f"pipeline {pipeline} is already running in {settings.work_dir} ({busy.holder}); "
                              "this run did not start: wait for that one to finish")
    try:
        p = _Pipeline(pipeline, settings)
        try:
            return _stages(p, pipeline, settings)
        except BaseException as exc:
            p.fail(p.current, f"{type(exc).__name__}: {exc}")
            raise
    finally:
        locks.release(lock)


@flow(name="vaemo_new_corpus", log_prints=True)
def vaemo_new_corpus(pipeline: str, corpus_name: str, corpus: CorpusConfig, settings: Settings) -> dict:
    """Run a named pipeline's stages and settings on a corpus that is not in pipelines.yaml yet.

    Its outputs and markers live under ``pipelines/<pipeline>@<corpus_name>``, so the pipeline's own
    outputs are untouched and a re-run on the same folder (say, after more videos arrived) only does
    the new work.
    """
    if pipeline not in settings.pipelines:
        return Failed(message=f"no pipeline {pipeline!r} (known: {sorted(settings.pipelines)})")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", corpus_name):
        return Failed(message=f"corpus name {corpus_name!r}: use letters, digits, '.', '_' and '-'")
    name = f"{pipeline}@{corpus_name}"
    spec = settings.pipelines[pipeline].model_copy(update={"corpora": [corpus_name], "schedule": None})
    extended = settings.model_copy(update={"corpora": {**settings.corpora, corpus_name: corpus},
                                           "pipelines": {**settings.pipelines, name: spec}})
    return vaemo_pipeline(pipeline=name, settings=extended, return_state=True)


def _stages(p: _Pipeline, name: str, settings: Settings):
    from flows.align import align_flow, folder_digest
    from flows.caption import caption_flow
    from flows.evaluate import evaluate_flow
    from flows.ingest import ingest_flow, parallelism, task_runner
    from flows.pretrain import pretrain_flow
    from vaemo.caption.engines import release_engines
    from vaemo.ingest.run import shard_set_digest
    from vaemo.ingest.shards import load_markers

    spec = settings.pipelines[name]
    dirs = layout(p.work, name)
    common = {"work_dir": str(p.work), "tracking_cfg": settings.tracking, "parent_run_id": p.parent_id}
    p.client.log_param(p.parent_id, "pipeline", name)
    p.client.log_param(p.parent_id, "stages", ",".join(spec.stages))
    p.client.log_param(p.parent_id, "corpora", ",".join(spec.corpora))
    p.logger.info("pipeline %s: stages %s on corpora %s; MLflow parent run %s", name, spec.stages, spec.corpora, p.parent_id)
    main_corpus = dirs["corpora"] / spec.corpora[0]

    def shards_digest(folder: Path) -> str | None:
        markers = load_markers(folder)
        return shard_set_digest(markers) if markers else None

    # ingest: one subflow per corpus (ingest is incremental itself; the key also saves starting Dask)
    if "ingest" in spec.stages:
        cfg = stage_settings(settings, spec, "ingest")
        for corpus_name in spec.corpora:
            corpus = settings.corpora[corpus_name]
            out = dirs["corpora"] / corpus_name
            key = _sha("ingest", source_listing_digest(corpus.path, corpus.labels), str(corpus.path), corpus.dataset,
                       cfg.model_dump(mode="json"))
            marker = read_marker(out)
            label = p.current = f"ingest:{corpus_name}"
            if marker.get("key") == key and marker.get("state") == "done" and shards_digest(out) == marker.get("result", {}).get("shard_set_digest"):
                p.done(label, p.skipped("ingest", marker, label))
                continue
            ok, result = _run(ingest_flow.with_options(task_runner=task_runner(settings.dask)), source=str(corpus.path), out=str(out),
                              dataset=corpus.dataset, labels=str(corpus.labels) if corpus.labels else None, ingest=cfg,
                              workers=parallelism(settings.dask), **common)
            if not ok:
                return p.fail(label, result)
            write_marker(out, {"key": key, "state": "done", "run_id": result["mlflow_run_id"],
                               "result": {"shard_set_digest": result["shard_set_digest"], "clips": result["clips"]}})
            p.done(label, result)

    digest = shards_digest(main_corpus)
    if digest is None and any(s in spec.stages for s in STAGE_ORDER[1:]):
        return p.fail(spec.stages[1] if spec.stages[0] == "ingest" else spec.stages[0],
                      f"no ingested shards in {main_corpus}: run the pipeline with the ingest stage first")

    def trained(stage: str, out: Path, key: str, call) -> tuple[bool, dict | str]:
        """pretrain / align: skip on a finished marker, resume from checkpoints of an unfinished run of the same key."""
        marker = read_marker(out)
        if marker.get("key") == key and marker.get("state") == "done":
            return True, p.skipped(stage, marker)
        resume = marker.get("key") == key and any((out / "checkpoints").glob("*.pt"))
        if marker.get("key") != key and out.exists():
            shutil.rmtree(out)  # outputs of other inputs or settings: they are in MLflow; start clean
        write_marker(out, {"key": key, "state": "running"})
        if resume:
            p.logger.info("%s: resuming from the checkpoints in %s (same key)", stage, out)
        ok, result = call(resume)
        if not ok:
            return False, result
        return True, result

    if "pretrain" in spec.stages:
        p.current = "pretrain"
        cfg = stage_settings(settings, spec, "pretrain")
        out = dirs["pretrain"]
        key = _sha("pretrain", digest, cfg.model_dump(mode="json"))
        cfg = _continued(cfg, out, key, p)
        ok, result = trained("pretrain", out, key, lambda resume: _run(pretrain_flow, shards=str(main_corpus), out=str(out), settings=cfg,
                                                                       resume=resume, **common))
        if not ok:
            return p.fail("pretrain", result)
        if not result.get("skipped"):
            write_marker(out, {"key": key, "state": "done", "run_id": result["mlflow_run_id"],
                               "result": {"model_id": result["model_id"], "loss_last": result["loss_last"]}})
        p.done("pretrain", result)

    stage1 = dirs["pretrain"]
    if "caption" in spec.stages:
        p.current = "caption"
        cfg = stage_settings(settings, spec, "caption")
        db = dirs["caption"]
        key = _sha("caption", digest, cfg.model_dump(mode="json"))
        marker = read_marker(db)
        if marker.get("key") == key and marker.get("state") == "done":
            result = p.skipped("caption", marker)
        else:
            ok, result = _run(caption_flow, shards=str(main_corpus), db=str(db), settings=cfg, **common)
            if not ok:
                return p.fail("caption", result)
            write_marker(db, {"key": key, "state": "done", "run_id": result["mlflow_run_id"],
                              "result": {"tag": result["tag"], "version": result["version"], "table": result["table"]}})
            release_engines()  # the model stays loaded for a next caption call; later stages need the memory
        p.done("caption", result)

    if "align" in spec.stages:
        p.current = "align"
        cfg = stage_settings(settings, spec, "align")
        caption_marker = read_marker(dirs["caption"]).get("result", {})
        if caption_marker.get("tag"):
            cfg = cfg.model_copy(update={"caption_tag": caption_marker["tag"]})  # pin this pipeline's captions
        if not (stage1 / "model.safetensors").is_file():
            return p.fail("align", f"no Stage 1 model in {stage1}: run the pipeline with the pretrain stage first")
        out = dirs["align"]
        key = _sha("align", digest, caption_marker, folder_digest(stage1), cfg.model_dump(mode="json"))
        ok, result = trained("align", out, key, lambda resume: _run(align_flow, shards=str(main_corpus), db=str(dirs["caption"]),
                                                                    init=str(stage1), out=str(out), settings=cfg, resume=resume, **common))
        if not ok:
            return p.fail("align", result)
        if not result.get("skipped"):
            write_marker(out, {"key": key, "state": "done", "run_id": result["mlflow_run_id"], "result": {"model_id": result["model_id"]}})
        p.done("align", result)

    if "evaluate" in spec.stages:
        p.current = "evaluate"
        cfg = stage_settings(settings, spec, "evaluate")
        model = dirs["align"] if "align" in spec.stages else stage1
        if not (model / "model.safetensors").is_file():
            return p.fail("evaluate", f"no model in {model}: run the pipeline with the stage that makes it first")
        out = dirs["evaluate"]
        key = _sha("evaluate", digest, folder_digest(model), cfg.model_dump(mode="json"))
        marker = read_marker(out)
        if marker.get("key") == key and marker.get("state") == "done":
            result = p.skipped("evaluate", marker)
        else:
            ok, result = _run(evaluate_flow, model=str(model), data=str(main_corpus), out=str(out), settings=cfg, **common)
            if not ok:
                return p.fail("evaluate", result)
            write_marker(out, {"key": key, "state": "done", "run_id": result["mlflow_run_id"],
                               "result": {"mean": result["mean"], "chance_uar": result["chance_uar"], "folds": result["folds"]}})
        p.done("evaluate", result)

    p.client.set_terminated(p.parent_id, "FINISHED")
    children = {stage: r.get("mlflow_run_id") for stage, r in p.stages.items()}
    skipped = [stage for stage, r in p.stages.items() if r.get("skipped")]
    return {"pipeline": name, "mlflow_run_id": p.parent_id, "flow_run_id": str(get_run_context().flow_run.id),
            "children": children, "skipped": skipped}
