"""The clip-embeddings table and text search over it (``vaemo search``).

After Stage 2, every clip of the shards is embedded into the text space (the fused AV embedding
through the ``joint`` head: ``vector``; the video and audio streams through their heads:
``video_vec`` / ``audio_vec``) and written into a LanceDB table, by default ``clip_embeddings``
beside the captions. Each align run replaces the table's rows with its own (a new model moves every
vector, so nothing of the previous run's rows would be kept anyway, and the vector index has to be
trained again on the new space) and tags the version it leaves (``align-...``): earlier runs stay
readable at their tags. One writer at a time. A search embeds the query with the text encoder that
made the model's text space and returns the nearest clips of one run (by default the newest);
``match`` keeps only clips whose description contains the given words (full-text index).
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
from vaemo.config import StoreConfig
from vaemo.errors import ConfigError

EMBEDDINGS = "clip_embeddings"
COLUMNS = {"av": "vector", "video": "video_vec", "audio": "audio_vec"}
SHOWN = ["clip_id", "dataset", "speaker", "label", "source", "captioned", "emotion", "description"]
# Searches filter on the run tag; merge-free writes still look clips up by id; words match descriptions.
EMBEDDING_INDEXES = store.Indexes(btree=("clip_id",), bitmap=("run_tag",), full_text=("description",),
                                  vectors=tuple(COLUMNS.values()))
MATCH_CANDIDATES = 10_000  # best full-text matches of ``match`` that are then ranked by closeness to the text


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


def write_clip_embeddings(db: str | Path, table_name: str, shards: Path, ids: list[str],
                          embeddings: dict[str, np.ndarray], captions: CaptionSet, model_key: str,
                          model_dir: Path, store_cfg: StoreConfig) -> dict:
    """One row per clip, replacing the table's rows, under one writer lock; tag the version this run leaves."""
    clips = IngestFolder(shards).clips().set_index("clip_id").reindex(ids)
    where = {clip: i for i, clip in enumerate(captions.clip_ids)}
    caption_row = [where.get(clip) for clip in ids]
    tag = store.new_run_tag("align")
    n, dim = len(ids), embeddings["joint"].shape[1]

    def meta(column: str) -> list[str | None]:
        values = clips[column] if column in clips.columns else [None] * n
        return [None if pd.isna(value) else str(value) for value in values]

    def caption_text(field: str) -> list[str | None]:
        return [None if c is None else captions.texts[field][c] for c in caption_row]

    def vectors(key: str) -> pa.Array:  # column-wise: a million clips never become Python lists
        flat = pa.array(np.ascontiguousarray(embeddings[key], dtype=np.float32).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, dim)

    columns = {
        "clip_id": ids, "model": [model_key] * n, "model_dir": [str(model_dir.resolve())] * n, "run_tag": [tag] * n,
        "created_at": [dt.datetime.now(dt.UTC)] * n,
        **{k: meta(k) for k in ("dataset", "speaker", "label", "source", "shard")},
        "captioned": [c is not None for c in caption_row], "caption_tag": [captions.tag] * n,
        "emotion": caption_text("emotion"), "description": caption_text("description"),
        "text_encoder": [captions.text_encoder] * n,
        "vector": vectors("joint"), "video_vec": vectors("video"), "audio_vec": vectors("audio"),
    }
    with store.writer_lock(db, table_name):
        table = store.connect(db).create_table(table_name, schema=embeddings_schema(dim), exist_ok=True)
        found = table.schema.field("vector").type.list_size
        if found != dim:
            raise store.StoreError(
                f"table {table_name!r} in {db} holds {found}-d vectors, this model gives {dim}-d; use another table"
            )
        table.add(pa.Table.from_pydict(columns, schema=table.schema), mode="overwrite")
        version = store.tag_and_optimize(table, tag, EMBEDDING_INDEXES, store_cfg)
    return {"table": table_name, "tag": tag, "version": version, "rows": n, "model": model_key}


def search(db: str | Path, text: str, k: int = 5, *, tag: str | None = None, table_name: str = EMBEDDINGS,
           modality: str = "av", match: str | None = None) -> tuple[pd.DataFrame, str]:
    """(the k clips nearest to ``text`` with their cosine ``score``, the run tag searched).

    ``modality``: the fused AV embedding (av), or the video / audio stream's (against facial / vocal texts).
    ``match``: only clips whose description contains these words (stemmed, any case; the best
    MATCH_CANDIDATES full-text matches are ranked). A large table is searched through its vector index
    (approximate, store.NPROBES and store.REFINE_FACTOR), a small one exactly."""
    if not text.strip():
        raise SearchError("--text is empty")
    if match is not None and not match.strip():
        raise SearchError("--match is empty")
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
    return nearest(table, where, query, COLUMNS[modality], k, match), tag


def nearest(table, where: str, query: np.ndarray, column: str, k: int, match: str | None = None) -> pd.DataFrame:
    """The table part of a search: the k rows passing ``where`` closest to the query vector (their ``score``)."""
    if match:
        return _matching(table, where, match, query, column, k)
    found = (table.search(query.tolist(), vector_column_name=column).distance_type("cosine")
             .where(where, prefilter=True).nprobes(store.NPROBES).refine_factor(store.REFINE_FACTOR)
             .select([*SHOWN, "_distance"]).limit(k).to_pandas())
    found.insert(1, "score", 1.0 - found.pop("_distance"))
    return found.reset_index(drop=True)


def _matching(table, where: str, words: str, query: np.ndarray, column: str, k: int) -> pd.DataFrame:
    """The k clips closest to ``query`` among those whose description matches ``words``."""
    if not any(index.columns == ["description"] for index in table.list_indices()):
        raise SearchError(f"table {table.name!r} at this tag has no full-text index (written by an older release); "
                          "run `vaemo align` again to search it by words")
    hits = (table.search(words, query_type="fts", fts_columns="description").where(where, prefilter=True)
            .select([*SHOWN, column]).limit(MATCH_CANDIDATES).to_pandas())
    vectors = np.stack(hits.pop(column).to_numpy()) if len(hits) else np.zeros((0, len(query)), np.float32)
    scores = vectors @ query / np.maximum(np.linalg.norm(vectors, axis=1) * np.linalg.norm(query), 1e-12)
    best = np.argsort(-scores, kind="stable")[:k]
    found = hits.drop(columns="_score", errors="ignore").iloc[best].reset_index(drop=True)
    found.insert(1, "score", scores[best])
    return found


def describe(found: pd.DataFrame, tag: str, text: str, modality: str, match: str | None = None) -> str:
    """``vaemo search``'s answer: one line per clip, best first."""
    words = f" whose description matches {match!r}" if match else ""
    lines = [f"vaemo: {len(found)} nearest clips{words} to {text!r} ({modality}, run {tag}):"]
    for rank, row in enumerate(found.itertuples(), 1):
        about = " ".join(f"{k}={getattr(row, k)}" for k in ("dataset", "speaker", "label", "emotion")
                         if isinstance(getattr(row, k), str))
        lines.append(
            f"{rank:>3}  {row.score:+.4f}  {row.clip_id}  {row.source if isinstance(row.source, str) else ''}  {about}"
        )
    return "\n".join(lines)
