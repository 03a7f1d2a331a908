"""The LanceDB tables at scale, on real tables in tmp_path: indexes after writes (and used by the queries),
vector-index search equal to the exact one, word matching, version retention around run tags, and clip
embeddings that one align run replaces instead of adding to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from vaemo import store
from vaemo.align.data import CaptionSet
from vaemo.align.search import EMBEDDINGS, SearchError, search, write_clip_embeddings
from vaemo.artifacts import IngestFolder, TableVersion
from vaemo.config import StoreConfig
from vaemo.text import text_encoder

DIM = 8  # captions-table tests: the vector size does not matter to their indexes


def caption_rows(ids: list[str], prompt_version: str = "p1", tag: str = "caption-x") -> pa.Table:
    rows = [{"clip_id": c, "prompt_version": prompt_version, "model": "m", "status": "ok", "run_tag": tag,
             "description": f"clip {c}"} for c in ids]
    return pa.Table.from_pylist(rows, schema=store.captions_schema(DIM))


def index_types(table) -> dict[str, str]:
    return {index.columns[0]: index.index_type for index in table.list_indices()}


def test_caption_indexes_exist_after_a_run_and_serve_existing_keys(tmp_path):
    table = store.open_captions(store.connect(tmp_path), DIM)
    store.upsert(table, caption_rows([f"c{i}" for i in range(50)]), store.CAPTION_KEYS)
    store.tag_and_optimize(table, store.new_run_tag("caption"), store.CAPTION_INDEXES, StoreConfig())
    assert index_types(table) == {"clip_id": "BTree", "prompt_version": "Bitmap", "model": "Bitmap",
                                  "run_tag": "Bitmap"}

    # A later run's rows (a new prompt version) are merged into the same indexes by its closing optimize.
    store.upsert(table, caption_rows([f"c{i}" for i in range(30)], "p2"), store.CAPTION_KEYS)
    assert table.index_stats("prompt_version_idx").num_unindexed_rows == 30
    store.tag_and_optimize(table, store.new_run_tag("caption"), store.CAPTION_INDEXES, StoreConfig())
    assert {name: table.index_stats(f"{name}_idx").num_unindexed_rows for name in index_types(table)} == dict.fromkeys(
        index_types(table), 0)
    assert table.count_rows() == 80
    assert store.existing_keys(table, "p2", "m") == {f"c{i}" for i in range(30)}
    plan = table.search().where("prompt_version = 'p2' AND model = 'm'").select(["clip_id"]).explain_plan(True)
    assert "prompt_version_idx(Bitmap)" in plan and "model_idx(Bitmap)" in plan


# ---- clip embeddings: written as an align run writes them ---------------------------------------

@pytest.fixture(scope="module")
def encoder():
    return text_encoder()


def align_write(db: Path, ids: list[str], vectors: np.ndarray, descriptions: dict[str, str], encoder,
                cfg: StoreConfig = StoreConfig()) -> dict:
    """What an align run writes: every clip's text-space embeddings; the captioned ones carry their caption."""
    shards = db.parent / "ingest"
    shards.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"clip_id": ids, "dataset": "generic", "shard": "b-000.tar"}).to_parquet(shards / IngestFolder.CLIPS)
    captioned = sorted(descriptions)
    captions = CaptionSet(db=str(db), table=store.CAPTIONS, tag="caption-x", version=1, prompt_version="p1",
                          model="m", text_encoder=encoder.name, dim=encoder.dim, clip_ids=captioned,
                          texts={"description": [descriptions[c] for c in captioned],
                                 "emotion": ["calm"] * len(captioned)},
                          vectors={}, uncaptioned=[c for c in ids if c not in descriptions])
    embeddings = {key: vectors for key in ("joint", "video", "audio")}
    return write_clip_embeddings(db, EMBEDDINGS, shards, ids, embeddings, captions, "model-a", db / "model", cfg)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_vector_index_search_equals_the_exact_search(tmp_path, encoder):
    rng = np.random.default_rng(0)
    n, query = 1200, "a trembling voice and a tense face"
    target = encoder.encode([query])[0]
    vectors = unit(rng.standard_normal((n, encoder.dim)))
    vectors[:8] = unit(target + 0.4 * (1 + np.arange(8))[:, None] * unit(rng.standard_normal((8, encoder.dim))))
    ids = [f"c{i:04d}" for i in range(n)]
    exact = [ids[i] for i in np.argsort(-(vectors @ unit(target)))[:5]]
    results = {}
    for name, rows in (("flat", 10_000), ("indexed", 1000)):
        db = tmp_path / name / "db"
        align_write(db, ids, vectors, {}, encoder, StoreConfig(vector_index_rows=rows))
        table = TableVersion.pin(db, EMBEDDINGS, None, "align-").open()
        results[name] = (search(db, query, 5)[0], index_types(table))
    flat, flat_indexes = results["flat"]
    indexed, indexes = results["indexed"]
    assert "vector" not in flat_indexes and {indexes[c] for c in ("vector", "video_vec", "audio_vec")} == {"IvfSq"}
    assert list(indexed["clip_id"]) == list(flat["clip_id"]) == exact
    assert np.allclose(indexed["score"], flat["score"], atol=1e-4)


def test_search_matches_words_of_the_descriptions(tmp_path, encoder):
    rng = np.random.default_rng(1)
    ids = [f"c{i}" for i in range(40)]
    descriptions = {c: f"A calm speaker, story {i}." for i, c in enumerate(ids[:30])}
    descriptions.update({"c3": "Her voice trembles and her face is tense.", "c7": "A trembling, tense voice.",
                         "c9": "He is tense."})
    align_write(tmp_path / "db", ids, unit(rng.standard_normal((40, encoder.dim))), descriptions, encoder)
    found, _ = search(tmp_path / "db", "a frightened person", 10, match="trembling")
    assert sorted(found["clip_id"]) == ["c3", "c7"]  # stemmed: "trembles" matches "trembling"
    assert list(found["score"]) == sorted(found["score"], reverse=True)
    assert search(tmp_path / "db", "a frightened person", 10, match="furious")[0].empty
    with pytest.raises(SearchError, match="--match is empty"):
        search(tmp_path / "db", "a frightened person", match="  ")


def test_align_runs_replace_the_clip_embeddings_and_earlier_runs_stay_readable(tmp_path, encoder):
    rng = np.random.default_rng(2)
    ids = [f"c{i}" for i in range(20)]
    first = align_write(tmp_path / "db", ids, unit(rng.standard_normal((20, encoder.dim))), {}, encoder)
    second = align_write(tmp_path / "db", ids, unit(rng.standard_normal((20, encoder.dim))), {}, encoder)
    latest = store.connect(tmp_path / "db").open_table(EMBEDDINGS)
    assert latest.count_rows() == 20 and set(latest.to_pandas()["run_tag"]) == {second["tag"]}
    old = store.read_tagged(tmp_path / "db", EMBEDDINGS, first["tag"]).to_pandas()
    assert sorted(old["clip_id"]) == sorted(ids) and set(old["run_tag"]) == {first["tag"]}
    assert search(tmp_path / "db", "a calm voice", 3, tag=first["tag"])[1] == first["tag"]


def test_retention_removes_old_untagged_versions_and_keeps_tagged_ones(tmp_path):
    table = store.open_captions(store.connect(tmp_path), DIM)
    store.upsert(table, caption_rows(["a", "b"]), store.CAPTION_KEYS)
    table.tags.create("caption-old-release", table.version)  # a tag as earlier releases wrote them
    old_version = table.version
    for i in range(5):  # untagged versions: one per upsert
        store.upsert(table, caption_rows([f"x{i}"]), store.CAPTION_KEYS)
    first = store.tag_and_optimize(table, "caption-first", store.CAPTION_INDEXES, StoreConfig())
    for i in range(5):
        store.upsert(table, caption_rows([f"y{i}"]), store.CAPTION_KEYS)
    kept = StoreConfig(keep_versions_days=0)  # every untagged version is old enough to go
    last = store.tag_and_optimize(table, "caption-last", store.CAPTION_INDEXES, kept)

    versions = {v["version"] for v in table.list_versions()}
    assert {old_version, first, last} <= versions and len(versions) <= 4  # + at most the version before the pin
    assert store.run_tags(table) == {"caption-old-release": old_version, "caption-first": first, "caption-last": last}
    assert table.tags.list() == {}  # the old release's tag became a branch: nothing stops the clean-up any more
    for tag, rows in (("caption-old-release", 2), ("caption-first", 7), ("caption-last", 12)):
        assert store.read_tagged(tmp_path, store.CAPTIONS, tag).count_rows() == rows
