"""The table of stages a pipeline can run: for each, what goes into its key, what it runs with, and
what its marker records. A planner runs when its stage's turn comes, so it sees the outputs of the
stages before it (the shard digest, the captions version, the model folders).

A new stage is one planner here (one row of ``STAGES``) plus the flow that runs it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from functools import partial
from pathlib import Path

from vaemo.artifacts import IngestFolder, ModelFolder
from vaemo.pipeline.runner import Plan, Step, StepRefused, key_of, read_marker

log = logging.getLogger(__name__)


def source_listing_digest(folder: Path, labels: Path | None) -> str:
    """A cheap key of a corpus folder: every file's relative path, size, mtime, ctime and inode (and the labels
    file's bytes); ctime and inode change with any write, also one that restores size and mtime."""
    entries = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries.append(f"{path.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:"
                           f"{stat.st_ino}")
    digest = hashlib.sha256("\n".join(entries).encode())
    if labels is not None and Path(labels).is_file():
        digest.update(Path(labels).read_bytes())
    return digest.hexdigest()


def _shards_digest(plan: Plan) -> str:
    digest = IngestFolder(plan.main_corpus).digest()
    if digest is None:
        raise StepRefused(f"no ingested shards in {plan.main_corpus}: run the pipeline with the ingest stage first")
    return digest


def _same_shards(folder: IngestFolder, marker: dict) -> bool:
    """Whether an ingest folder still holds the shard set its marker recorded (shards may be deleted or replaced)."""
    return folder.digest() == marker.get("result", {}).get("shard_set_digest")


def _model(folder: Path, made_by: str) -> ModelFolder:
    model = ModelFolder(folder)
    if not model.complete():
        raise StepRefused(f"no model in {folder}: run the pipeline with the {made_by} stage first")
    return model


def ingest(plan: Plan) -> list[Step]:
    """One step per corpus (ingest is incremental itself; the key also saves starting a cluster)."""
    cfg = plan.stage_settings("ingest")
    steps = []
    for name in plan.spec.corpora:
        corpus, out = plan.settings.corpora[name], plan.dirs["corpora"] / name
        key = key_of("ingest", source_listing_digest(corpus.path, corpus.labels), str(corpus.path), corpus.dataset,
                     cfg.digest_view())
        params = {"source": str(corpus.path), "out": str(out), "dataset": corpus.dataset, "settings": cfg,
                  "labels": str(corpus.labels) if corpus.labels else None, "workers": plan.settings.dask.parallelism()}
        steps.append(Step("ingest", f"ingest:{name}", out, key, params, keep=("shard_set_digest", "clips"),
                          intact=partial(_same_shards, IngestFolder(out))))
    return steps


def _continue_from_previous(cfg, out: Path, key: str):
    """With ``on_new_shards: continue``, the finished model of earlier shards becomes this run's starting point
    (kept as ``<out>-previous``)."""
    if cfg.on_new_shards != "continue":
        return cfg
    marker = read_marker(out)
    previous = out.parent / f"{out.name}-previous"
    if marker.get("key") not in (None, key) and marker.get("state") == "done":
        if previous.exists():
            shutil.rmtree(previous)
        out.rename(previous)
        marker = {}
        log.info("pretrain: the shards changed; continuing from the last model (kept in %s)", previous)
    if marker.get("key") in (None, key) and ModelFolder(previous).complete():
        return cfg.model_copy(update={"init": previous})
    return cfg


def pretrain(plan: Plan) -> list[Step]:
    cfg, out = plan.stage_settings("pretrain"), plan.dirs["pretrain"]
    key = key_of("pretrain", _shards_digest(plan), cfg.model_dump(mode="json"))
    cfg = _continue_from_previous(cfg, out, key)
    return [
        Step("pretrain", "pretrain", out, key,
             params={"shards": str(plan.main_corpus), "out": str(out), "settings": cfg}, keep=("model_id", "loss_last"),
             trained=True)
    ]


def caption(plan: Plan) -> list[Step]:
    from vaemo.caption.engines import release_engines

    cfg, db = plan.stage_settings("caption"), plan.dirs["caption"]
    key = key_of("caption", _shards_digest(plan), cfg.model_dump(mode="json"))
    # The model stays loaded for a next caption call in this process; later stages need the memory.
    return [
        Step("caption", "caption", db, key, params={"shards": str(plan.main_corpus), "db": str(db), "settings": cfg},
             keep=("tag", "version", "table"), after=release_engines)
    ]


def align(plan: Plan) -> list[Step]:
    cfg, out = plan.stage_settings("align"), plan.dirs["align"]
    digest = _shards_digest(plan)
    captions = read_marker(plan.dirs["caption"]).get("result", {})
    if captions.get("tag"):
        cfg = cfg.model_copy(update={"caption_tag": captions["tag"]})  # pin this pipeline's captions
    stage1 = _model(plan.dirs["pretrain"], "pretrain")
    key = key_of("align", digest, captions, stage1.digest(), cfg.model_dump(mode="json"))
    return [Step("align", "align", out, key, trained=True, keep=("model_id",),
                 params={"shards": str(plan.main_corpus), "db": str(plan.dirs["caption"]), "init": str(stage1.path),
                         "out": str(out), "settings": cfg})]


def evaluate(plan: Plan) -> list[Step]:
    cfg, out = plan.stage_settings("evaluate"), plan.dirs["evaluate"]
    digest = _shards_digest(plan)
    aligned = "align" in plan.spec.stages
    model = _model(plan.dirs["align"] if aligned else plan.dirs["pretrain"], "align" if aligned else "pretrain")
    key = key_of("evaluate", digest, model.digest(), cfg.model_dump(mode="json"))
    return [Step("evaluate", "evaluate", out, key, keep=("mean", "chance_uar", "folds"),
                 params={"model": str(model.path), "data": str(plan.main_corpus), "out": str(out), "settings": cfg})]


STAGES = {"ingest": ingest, "pretrain": pretrain, "caption": caption, "align": align, "evaluate": evaluate}
