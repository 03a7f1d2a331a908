"""The clip-embeddings table and text search over it (``vaemo search``).

After Stage 2, every clip of the shards is embedded into the text space (the fused AV embedding
through the ``joint`` head: ``vector``; the video and audio streams through their heads:
``video_vec`` / ``audio_vec``) and upserted into a LanceDB table, by default ``clip_embeddings``
beside the captions, keyed by (clip_id, model). One writer at a time; each align run tags the
version it leaves (``align-...``). A search embeds the query with the text encoder that made the
model's text space and returns the nearest clips of one run (by default the newest).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from vaemo import store
from vaemo.align.data import CaptionSet
from vaemo.artifacts import IngestFolder, TableVersion
from vaemo.errors import ConfigError

EMBEDDINGS = "clip_embeddings"
COLUMNS = {"av": "vector", "video": "video_vec", "audio": "audio_vec"}
SHOWN = ["clip_id", "dataset", "speaker", "label", "source", "captioned", "emotion", "description"]


class SearchError(ConfigError):
    pass


def embeddings_schema(dim: int) -> pa.Schema:
    text, vector = pa.string(), pa.list_(pa.float32(), dim)
    return pa.schema(
        [("clip_id", text), ("model", text), ("model_dir", text), ("run_tag", text),
         ("created_at", pa.timestamp("us", tz="UTC")), ("dataset", text), ("speaker", text), ("label", text),
         ("source", text), ("shard", text), ("captioned", pa.bool_()), ("caption_tag", text), ("emotion", text),
         ("description", text), ("text_encoder", text), ("vector", vector), ("video_vec", vector),
         ("audio_vec", vector)]
    )


EMBEDDING_KEYS = ["clip_id", "model"]


def write_clip_embeddings(db: str | Path, table_name: str, shards: Path, ids: list[str],
                          embeddings: dict[str, np.ndarray], captions: CaptionSet, model_key: str,
                          model_dir: Path) -> dict:
    """Upsert one row per clip (key: clip_id, model) under one writer lock; tag the version this run leaves."""
    clips = IngestFolder(shards).clips().set_index("clip_id")
    captioned = {clip: i for i, clip in enumerate(captions.clip_ids)}
    tag = store.new_run_tag("align")
    now = dt.datetime.now(dt.UTC)

    def meta(clip: str, column: str):
        value = clips.at[clip, column] if clip in clips.index and column in clips.columns else None
        return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)

    rows = []
    for i, clip in enumerate(ids):
        c = captioned.get(clip)
        rows.append(
            {"clip_id": clip, "model": model_key, "model_dir": str(model_dir.resolve()), "run_tag": tag,
             "created_at": now, **{k: meta(clip, k) for k in ("dataset", "speaker", "label", "source", "shard")},
             "captioned": c is not None, "caption_tag": captions.tag,
             "emotion": captions.texts["emotion"][c] if c is not None else None,
             "description": captions.texts["description"][c] if c is not None else None,
             "text_encoder": captions.text_encoder, "vector": embeddings["joint"][i].tolist(),
             "video_vec": embeddings["video"][i].tolist(), "audio_vec": embeddings["audio"][i].tolist()}
        )
    dim = embeddings["joint"].shape[1]
    with store.writer_lock(db, table_name):
        table = store.connect(db).create_table(table_name, schema=embeddings_schema(dim), exist_ok=True)
        found = table.schema.field("vector").type.list_size
        if found != dim:
            raise store.StoreError(
                f"table {table_name!r} in {db} holds {found}-d vectors, this model gives {dim}-d; use another table"
            )
        if rows:
            store.upsert(table, pa.Table.from_pylist(rows, schema=table.schema), EMBEDDING_KEYS)
        version = store.tag_and_optimize(table, tag)
    return {"table": table_name, "tag": tag, "version": version, "rows": len(rows), "model": model_key}


def search(db: str | Path, text: str, k: int = 5, *, tag: str | None = None, table_name: str = EMBEDDINGS,
           modality: str = "av") -> tuple[pd.DataFrame, str]:
    """(the k clips nearest to ``text`` with their cosine ``score``, the run tag searched).

    ``modality``: the fused AV embedding (av), or the video / audio stream's (against facial / vocal texts)."""
    if not text.strip():
        raise SearchError("--text is empty")
    if k < 1:
        raise SearchError(f"--k must be at least 1, got {k}")
    pinned = TableVersion.pin(db, table_name, tag, "align-")
    table, tag = pinned.open(), pinned.tag
    where = f"run_tag = {store.quote(tag)}"
    encoders = table.search().where(where).select(["text_encoder"]).limit(1).to_pandas()
    if encoders.empty:
        raise SearchError(f"table {table_name!r} in {db} has no rows of run {tag!r} at its tag")
    from vaemo.text import text_encoder

    query = text_encoder(encoders["text_encoder"].iloc[0]).encode([text])[0]
    found = (table.search(query.tolist(), vector_column_name=COLUMNS[modality]).distance_type("cosine")
             .where(where, prefilter=True).select([*SHOWN, "_distance"]).limit(k).to_pandas())
    found.insert(1, "score", 1.0 - found.pop("_distance"))
    return found.reset_index(drop=True), tag


def describe(found: pd.DataFrame, tag: str, text: str, modality: str) -> str:
    """``vaemo search``'s answer: one line per clip, best first."""
    lines = [f"vaemo: {len(found)} nearest clips to {text!r} ({modality}, run {tag}):"]
    for rank, row in enumerate(found.itertuples(), 1):
        about = " ".join(f"{k}={getattr(row, k)}" for k in ("dataset", "speaker", "label", "emotion")
                         if isinstance(getattr(row, k), str))
        lines.append(
            f"{rank:>3}  {row.score:+.4f}  {row.clip_id}  {row.source if isinstance(row.source, str) else ''}  {about}"
        )
    return "\n".join(lines)
