"""LanceDB tables in one place: the `captions` table, one writer at a time, upserts, version tags.

LanceDB can duplicate keys when two processes upsert at once, so every writer holds an exclusive
lock file beside the database for its whole run and re-reads the latest version before each write.
A run pins what it produced with a tag on the table version it left; readers check out that tag.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import warnings
from contextlib import contextmanager
from pathlib import Path

import lancedb
import pyarrow as pa

from vaemo import locks
from vaemo.errors import ArtifactError

log = logging.getLogger(__name__)

# Training forks DataLoader workers after this process has read its tables; the workers never use
# LanceDB, so its warning about forking (once per epoch) says nothing about them.
warnings.filterwarnings("ignore", message="lancedb fork support is experimental", category=RuntimeWarning)

CAPTIONS = "captions"
CAPTION_KEYS = ["clip_id", "prompt_version", "model"]


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


def tag_and_optimize(table, tag: str) -> int:
    """Compact the table, then pin its current version under `tag`; returns that version.

    Tagged versions are the runs' pins and are never cleaned up: when old tagged versions stop
    the clean-up step of ``optimize``, compaction has already happened and the rest is skipped.
    """
    table.checkout_latest()
    try:
        table.optimize()
    except RuntimeError as exc:
        if "tagged version" not in str(exc):
            raise
        log.info("kept old versions of %s: they carry run tags", table.name)
    table.checkout_latest()
    version = table.version
    table.tags.create(tag, version)
    return version


def read_tagged(db_dir: str | os.PathLike, table_name: str, tag: str):
    """A table as it was at a run's tag (what a later stage pins for reproducibility)."""
    table = connect(db_dir).open_table(table_name)
    if tag not in table.tags.list():
        known = ", ".join(sorted(table.tags.list())) or "none"
        raise StoreError(f"table {table_name!r} in {db_dir} has no tag {tag!r} (tags: {known})")
    table.checkout(tag)
    return table
