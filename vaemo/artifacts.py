"""The artifacts stages hand each other: each one's file layout, reading rules and digest, in one place.

* :class:`IngestFolder`: what ingest writes and every later stage reads (WebDataset shards, commit
  markers, the clip table, the manifest, stats).
* :class:`ModelFolder`: a Stage 1 or Stage 2 model (weights + config, the text heads of Stage 2,
  the MLflow record) and the files of the training run that made it (checkpoints, step log).
* :class:`TableVersion`: a LanceDB table pinned at a run's tag (the captions a Stage 2 run read,
  the clip embeddings it wrote).

Stages talk only through these, and no other module spells their file names. This module imports
nothing heavy: torch, pandas and LanceDB are imported by the methods that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vaemo.errors import ArtifactError, ModelError, writing

log = logging.getLogger(__name__)


# Temporary names of atomic writes: ``.<name>.tmp-<pid>`` beside the file they replace.
TEMPORARY_GLOB = ".*.tmp-*"


def write_atomic(path: Path, write: Callable[[Path], object], what: str) -> None:
    """Write a file that readers see whole or not at all: ``write(tmp)`` fills a temporary name beside ``path``,
    which then replaces it. A failed write removes its temporary file; the storage's refusal (a full disk) is one
    StorageError naming ``what`` and the folder, and the previous ``path`` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(what, path.parent):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # best effort: what is left matches TEMPORARY_GLOB for a later clean-up
            tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict, what: str | None = None) -> None:
    """Write a JSON file that readers see whole or not at all (temporary name, then rename)."""
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what or Path(path).name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_set_digest(markers: list[dict]) -> str:
    """Content digest of a shard set: the key later stages and MLflow use for this data."""
    entries = sorted(f"{s['name']}:{s['sha256']}" for m in markers for s in m["shards"])
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


class _Folder:
    """An artifact that is a folder: ``folder / NAME`` is the path of one of its files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)


class IngestFolder(_Folder):
    """An ingest output folder::

        shards/<batch>-NNN.tar   WebDataset shards (visible only once complete)
        batches/<batch>.json     commit marker of a batch: per-video rows, per-shard stats, timings
        clips.parquet            one row per stored clip (ids, shard, label, speaker, fold, source)
        manifest.parquet         one row per source video with its status and reason
        stats.json               counts of the whole folder and of the last run
        ingest.json              the processing settings the shards were made with
        .tmp/<batch>/            work in progress; removed at the start of every run
        .<name>.tmp-<pid>        a file being replaced atomically; leftovers removed at the start of every run
        .lock, .commit.lock, .run-token   one run at a time; commits of a superseded run are refused
    """

    SHARDS, BATCHES, TMP = "shards", "batches", ".tmp"
    CLIPS, MANIFEST, STATS, SETTINGS = "clips.parquet", "manifest.parquet", "stats.json", "ingest.json"
    LOCK, COMMIT_LOCK, RUN_TOKEN = ".lock", ".commit.lock", ".run-token"

    @property
    def shards_dir(self) -> Path:
        return self.path / self.SHARDS

    @classmethod
    def holding(cls, shard: str | os.PathLike) -> IngestFolder:
        """The ingest folder a shard path lies in."""
        return cls(Path(shard).parent.parent)

    def is_ingest_folder(self) -> bool:
        return self.shards_dir.is_dir()

    def temporaries(self) -> list[Path]:
        """Temporary files of atomic writes (of the folder's files and of the markers) that a failed run left."""
        return sorted(self.path.glob(TEMPORARY_GLOB)) + sorted((self.path / self.BATCHES).glob(TEMPORARY_GLOB))

    def markers(self) -> list[dict]:
        """The commit markers of every committed batch, oldest commit first."""
        folder = self.path / self.BATCHES
        if not folder.is_dir():
            return []
        markers = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
        return sorted(markers, key=lambda m: m["committed_at"])

    def digest(self) -> str | None:
        """The shard-set digest of the committed shards (of the shard files, for a folder without commit
        markers); None when the folder holds no shard."""
        markers = self.markers()
        if not markers:
            files = sorted(self.shards_dir.glob("*.tar"))
            markers = [{"shards": [{"name": p.name, "sha256": file_sha256(p)} for p in files]}] if files else []
        return shard_set_digest(markers) if markers else None

    def shard_samples(self) -> dict[str, int]:
        """Samples each committed shard holds, from the commit markers."""
        return {s["name"]: s["samples"] for m in self.markers() for s in m["shards"]}

    def shard_urls(self) -> list[str]:
        """Sorted paths of the committed shards; an ArtifactError when there are none.

        A shard that no marker lists is the leftover of an interrupted commit: it is left out with a
        warning (the next ingest run removes it). A folder without markers (shards made by other
        tools) is read as it is.
        """
        shards = sorted(self.shards_dir.glob("*.tar"))
        if not shards:
            why = "does not exist" if not self.shards_dir.is_dir() else "holds no .tar files"
            raise ArtifactError(
                f"no shards to read: {self.shards_dir} {why}. Point to the output folder of an ingest run, "
                "or run the ingest first."
            )
        markers = self.markers()
        if markers:
            listed = {s["name"] for m in markers for s in m["shards"]}
            orphans = [p.name for p in shards if p.name not in listed]
            if orphans:
                log.warning("%d shard(s) in %s belong to no committed batch and are left out: %s", len(orphans),
                            self.path, ", ".join(orphans[:5]))
            shards = [p for p in shards if p.name in listed]
            if not shards:
                raise ArtifactError(f"no committed shards in {self.shards_dir}")
        return [str(p) for p in shards]

    def clips(self, columns: list[str] | None = None):
        """The clip table (pandas); an ArtifactError when the folder holds none."""
        import pandas as pd

        path = self.path / self.CLIPS
        if not path.is_file():
            raise ArtifactError(f"{path} not found: point to the output folder of a finished ingest run")
        return pd.read_parquet(path, columns=columns)

    def manifest(self, columns: list[str] | None = None):
        """The manifest (pandas): every source video with its status and reason; None when the folder has none."""
        import pandas as pd

        path = self.path / self.MANIFEST
        return pd.read_parquet(path, columns=columns) if path.is_file() else None


class ModelFolder(_Folder):
    """A model folder, the ``--out`` of ``vaemo pretrain`` (Stage 1) or ``vaemo align`` (Stage 2)::

        model.safetensors, config.json      the AV network: weights and its AVConfig (input contract included)
        text_heads.safetensors, text_alignment.json   Stage 2 only; the alignment file is written last
        mlflow_model.json                   the MLflow logged model these weights were logged as
        checkpoints/, metrics.jsonl, metrics.json, ranks/, <stage>.json   the training run that made it
    """

    WEIGHTS, CONFIG = "model.safetensors", "config.json"
    HEADS, ALIGNMENT = "text_heads.safetensors", "text_alignment.json"
    RECORD = "mlflow_model.json"
    CHECKPOINTS, STEP_LOG, METRICS, RANKS = "checkpoints", "metrics.jsonl", "metrics.json", "ranks"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def settings_file(self, stage: str) -> Path:
        """The settings the training run used (``pretrain.json``, ``align.json``, ``torchrun-request.json``)."""
        return self.path / f"{stage}.json"

    def complete(self) -> bool:
        return (self.path / self.WEIGHTS).is_file() and (self.path / self.CONFIG).is_file()

    @property
    def aligned(self) -> bool:
        """A Stage 2 (text-aligned) model: the alignment file is written last, so its presence means complete."""
        return (self.path / self.ALIGNMENT).is_file()

    @property
    def kind(self) -> str:
        return "stage2" if self.aligned else "stage1"

    def require(self, role: str = "", made_by: str = "`vaemo pretrain` or `vaemo align`") -> ModelFolder:
        """This folder, when it holds a model; else a ModelError naming the option it was given as (``role``)."""
        if not self.complete():
            raise ModelError(f"{role + ' ' if role else ''}{self.path} is not a model folder: it needs {self.CONFIG} "
                             f"and {self.WEIGHTS} (the --out folder of {made_by})")
        return self

    def digest(self) -> str:
        """Content digest of the weights and the config (the key later stages use for this model)."""
        digest = hashlib.sha256()
        for name in (self.WEIGHTS, self.CONFIG):
            digest.update(name.encode())
            digest.update((self.require().path / name).read_bytes())
        return digest.hexdigest()

    def model_files(self) -> list[Path]:
        """What makes up the model (logged to MLflow as one): Stage 1 files, plus the text heads of Stage 2."""
        names = [self.WEIGHTS, self.CONFIG] + ([self.HEADS, self.ALIGNMENT] if self.aligned else [])
        return [self.path / name for name in names]

    def checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints_dir.glob("step-*.pt"))

    def metrics(self) -> dict:
        return json.loads((self.path / self.METRICS).read_text())

    def write_record(self, model_id: str, run_id: str, tracking_uri: str) -> None:
        """Name the MLflow logged model of these weights, so a later stage that reads the folder can name its input."""
        write_json_atomic(
            self.path / self.RECORD, {"model_id": model_id, "run_id": run_id, "tracking_uri": tracking_uri}
        )

    def logged_model_id(self, tracking_uri: str) -> str | None:
        """The logged model id of this folder, when it was logged to this tracking store; else None."""
        path = self.path / self.RECORD
        try:
            record = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            return None
        return record.get("model_id") if record.get("tracking_uri") == tracking_uri else None


@dataclass(frozen=True)
class TableVersion:
    """One LanceDB table as a run left it: the database folder, the table, the run's tag and its version."""

    db: str
    table: str
    tag: str
    version: int

    @property
    def digest(self) -> str:
        return f"{self.tag}@v{self.version}"

    def open(self):
        """The table checked out at the tag."""
        from vaemo import store

        return store.read_tagged(self.db, self.table, self.tag)

    @classmethod
    def pin(cls, db: str | os.PathLike, table: str, tag: str | None, prefix: str) -> TableVersion:
        """The given tag, or the newest tag of a ``prefix`` run (``caption-``, ``align-``); an ArtifactError when
        there is none."""
        from vaemo import store

        if not Path(db).is_dir():
            raise ArtifactError(f"{db}: no such LanceDB folder")
        try:
            names = list(store.connect(db).list_tables().tables)
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{db}: not a readable LanceDB folder: {err}") from None
        if table not in names:
            raise ArtifactError(f"{db} has no table {table!r} (tables: {', '.join(sorted(names)) or 'none'})")
        tags = store.run_tags(store.connect(db).open_table(table))
        if tag is None:
            runs = {name: version for name, version in tags.items() if name.startswith(prefix)}
            if not runs:
                raise ArtifactError(f"table {table!r} in {db} has no {prefix}* version tag: no finished run wrote it")
            tag = max(runs, key=lambda name: (runs[name], name))  # the newest version; ties: the later name
        if tag not in tags:
            raise ArtifactError(
                f"table {table!r} in {db} has no tag {tag!r} (tags: {', '.join(sorted(tags)) or 'none'})"
            )
        return cls(str(db), table, tag, int(tags[tag]))
