"""LanceDB tables in one place: the `captions` table, one writer at a time, upserts, indexes, run tags, retention.

LanceDB can duplicate keys when two processes upsert at once, so every writer holds an exclusive
lock file beside the database for its whole run and re-reads the latest version before each write.
A run pins what it produced with a tag on the table version it left; readers check out that tag.

When a run finishes, its table gets the indexes it lacks (scalar ones on the keys and filter
columns, full text on descriptions, vector ones once the table is large), new rows are merged into
the existing indexes, and versions older than ``keep_versions_days`` are removed except those a tag
pins. LanceDB 0.40 refuses to clean up while any version due for removal carries a LanceDB tag (and
has no switch to skip such versions), so a run tag is stored as a LanceDB *branch* started at the
run's version: clean-up keeps a branch's base version readable and removes the rest.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lancedb
import pyarrow as pa
from lancedb.index import FTS, Bitmap, BTree, IvfSq

from vaemo import locks
from vaemo.errors import ArtifactError

log = logging.getLogger(__name__)

# Training forks DataLoader workers after this process has read its tables; the workers never use
# LanceDB, so its warning about forking (once per epoch) says nothing about them.
warnings.filterwarnings("ignore", message="lancedb fork support is experimental", category=RuntimeWarning)

CAPTIONS = "captions"
CAPTION_KEYS = ["clip_id", "prompt_version", "model"]

# Approximate vector search: IVF partitions probed per query, and candidates re-ranked by their exact
# distance (refine_factor x k). On a million synthetic rows (123 partitions) 20 probes found 0.45 of the
# exact top 10, 80 probes 0.90 at about twice the latency (README, "The store at a million rows").
NPROBES, REFINE_FACTOR = 80, 10


class Upkeep(Protocol):
    """What the store reads of a stage's ``store`` settings (``vaemo.config.StoreConfig``)."""

    vector_index_rows: int
    keep_versions_days: float


@dataclass(frozen=True)
class Indexes:
    """The indexes a table keeps. BTREE suits keys with many values, BITMAP filter columns with few."""

    btree: tuple[str, ...] = ()
    bitmap: tuple[str, ...] = ()
    full_text: tuple[str, ...] = ()
    vectors: tuple[str, ...] = ()  # indexed once the table holds Upkeep.vector_index_rows rows


# existing_keys and the run summaries filter on prompt version, model and run tag; merge_insert matches clip ids.
CAPTION_INDEXES = Indexes(btree=("clip_id",), bitmap=("prompt_version", "model", "run_tag"))


class StoreError(ArtifactError):
    pass


def captions_schema(dim: int) -> pa.Schema:
    text = pa.string()
    vector = pa.list_(pa.float32(), dim)
    return pa.schema([
        ("clip_id", text), ("prompt_version", text), ("model", text),
        ("engine", text), ("label_aware", pa.bool_()), ("status", text), ("reason", text), ("attempts", pa.int32()),
        ("facial_cues", text), ("vocal_cues", text), ("reasoning", text), ("emotion", text), ("intensity", text),
        ("description", text), ("raw_output", text), ("failures", text),
        ("prompt_digest", text), ("sampling", text), ("prompt_tokens", pa.int32()), ("generated_tokens", pa.int32()),
        ("seconds", pa.float32()), ("shard", text), ("dataset", text), ("speaker", text), ("label", text),
        ("run_tag", text), ("created_at", pa.timestamp("us", tz="UTC")), ("text_encoder", text),
        ("description_vec", vector), ("facial_vec", vector), ("vocal_vec", vector),
    ])


def connect(db_dir: str | os.PathLike):
    Path(db_dir).mkdir(parents=True, exist_ok=True)
    return lancedb.connect(str(db_dir))


@contextmanager
def writer_lock(db_dir: str | os.PathLike, table: str):
    """Hold the one-writer lock of a table; a second writer is refused with a clear message."""
    try:
        handle = locks.acquire(Path(db_dir) / f".{table}.writer.lock")
    except locks.Busy as busy:
        raise StoreError(
            f"table {table!r} in {db_dir} is being written by {busy.holder}; wait for it to finish"
        ) from None
    try:
        yield
    finally:
        locks.release(handle)


def open_captions(db, dim: int):
    """The captions table, created on first use; its vector size must match the text encoder's."""
    table = db.create_table(CAPTIONS, schema=captions_schema(dim), exist_ok=True)
    found = table.schema.field("description_vec").type.list_size
    if found != dim:
        raise StoreError(
            f"table {CAPTIONS!r} holds {found}-d text embeddings, the configured text encoder gives {dim}-d; "
            "use another --db or the encoder the table was made with"
        )
    return table


def existing_keys(table, prompt_version: str, model: str) -> set[str]:
    """Clip ids that already have a row for this prompt version and model."""
    table.checkout_latest()
    rows = (
        table.search()
        .where(f"prompt_version = {quote(prompt_version)} AND model = {quote(model)}")
        .select(["clip_id"])
        .to_arrow()
    )
    return set(rows.column("clip_id").to_pylist())


def quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def upsert(table, rows: pa.Table, keys: list[str]):
    """Insert new keys, replace existing ones; one batch, one table version.

    Rows without a vector (failed captions) keep it null; LanceDB would otherwise reject the batch.
    """
    table.checkout_latest()
    return (
        table.merge_insert(keys)
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute(rows, on_bad_vectors="null")
    )


def new_run_tag(stage: str) -> str:
    return f"{stage}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def vector_index(rows: int) -> IvfSq:
    """IVF with 8-bit scalar quantisation, about 8,192 rows a partition: k-means costs grow with the square of
    the partitions (the default sqrt(rows) took minutes a column at 100,000 rows on two cores), scalar
    quantisation needs no training, and the exact re-ranking of REFINE_FACTOR x k candidates repairs its error."""
    return IvfSq(distance_type="cosine", num_partitions=max(1, -(-rows // 8192)), max_iterations=20, sample_rate=64)


def ensure_indexes(table, indexes: Indexes, cfg: Upkeep) -> list[str]:
    """Create the indexes the table lacks (the columns newly indexed); ``optimize`` keeps them up to date later."""
    rows = table.count_rows()
    if rows == 0:
        return []
    wanted = {**{c: BTree() for c in indexes.btree}, **{c: Bitmap() for c in indexes.bitmap},
              **{c: FTS() for c in indexes.full_text}}
    if rows >= cfg.vector_index_rows:
        wanted.update({column: vector_index(rows) for column in indexes.vectors})
    indexed = {column for index in table.list_indices() for column in index.columns}
    created = [column for column in wanted if column not in indexed]
    for column in created:
        table.create_index(column, config=wanted[column])
    if created:
        log.info("%s: indexed %s", table.name, ", ".join(created))
    return created


def run_tags(table) -> dict[str, int]:
    """Run tag -> the table version it pins (tags of older releases are LanceDB tags, see the module docstring)."""
    pins = {name: int(info["parent_version"]) for name, info in table.branches.list().items()}
    return {**{name: int(info["version"]) for name, info in table.tags.list().items()}, **pins}


def _tags_to_branches(table) -> None:
    """Turn LanceDB tags of older releases into branches at the same versions, so clean-up can run again."""
    for name, info in table.tags.list().items():
        if name not in table.branches.list():
            table.branches.create(name, from_version=info["version"])
        table.tags.delete(name)


def tag_and_optimize(table, tag: str, indexes: Indexes, cfg: Upkeep) -> int:
    """Index the table, compact it, merge new rows into its indexes, remove old untagged versions, then pin its
    current version under ``tag``; returns that version."""
    table.checkout_latest()
    _tags_to_branches(table)
    ensure_indexes(table, indexes, cfg)
    with warnings.catch_warnings():
        # keep_versions_days 0 makes LanceDB warn about readers of old versions: ours read tagged ones, kept.
        warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)", category=UserWarning)
        table.optimize(cleanup_older_than=dt.timedelta(days=cfg.keep_versions_days))
    table.checkout_latest()
    version = table.version
    table.branches.create(tag, from_version=version)
    return version


def read_tagged(db_dir: str | os.PathLike, table_name: str, tag: str):
    """A table as it was at a run's tag (what a later stage pins for reproducibility)."""
    table = connect(db_dir).open_table(table_name)
    tags = run_tags(table)
    if tag not in tags:
        known = ", ".join(sorted(tags)) or "none"
        raise StoreError(f"table {table_name!r} in {db_dir} has no tag {tag!r} (tags: {known})")
    table.checkout(tags[tag])
    return table
