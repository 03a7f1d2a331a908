"""The LanceDB tables at scale: `vaemo search` and `existing_keys` on synthetic tables, without and with indexes.

    .venv/bin/python benchmarks/store_bench.py [--rows 1000000] [--queries 20] [--db DIR]

Builds a ``clip_embeddings`` table and a ``captions`` table of ``--rows`` synthetic rows each (keys,
descriptions on 10 % of the clips, as a 10 % caption selection gives; clustered unit vectors of the
bundled text encoder's 384 dimensions in all three embedding columns). Then, in one run:

* before: the tables as earlier releases left them (no index), searched by the same library calls;
* ``store.tag_and_optimize`` as a finishing run does it (its time is the index build);
* after: the same calls through the indexes. Recall@10 of the vector index against the exact search
  of the same queries is printed too.

``search`` is what `vaemo search` calls (pin the tag, encode the text, query); ``vector_query`` its table
part alone (``nearest``: the text encoder's share is the same before and after); ``existing_keys``
is what a caption run calls before it starts (here: one prompt version of four, a quarter of the rows).
The captions rows carry no vectors (``existing_keys`` reads three string columns only). Rows are
written 100,000 at a time, the way a long run's chunks add up; the embedding table's three vector
columns (about 4.6 GB at a million rows) need that much free disk under ``--db``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from vaemo import store
from vaemo.align.search import EMBEDDING_INDEXES, EMBEDDINGS, embeddings_schema, nearest, search
from vaemo.artifacts import TableVersion
from vaemo.config import StoreConfig
from vaemo.text import BUNDLED, text_encoder

TAG = "align-bench"
BATCH, DIM, PROMPTS = 100_000, 384, ("cot-v1", "cot-v2", "cot-v3", "cot-v4")
WORDS = ("calm tense trembling bright flat loud soft angry joyful tearful smiling frowning shaky steady warm cold "
         "raised lowered quick slow").split()
QUERIES = ["a trembling voice and a tense face", "a calm smiling speaker", "someone shouting in anger",
           "a sad quiet voice", "a joyful laugh", "a bored flat tone", "a surprised face", "a disgusted frown"]


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def with_nulls(columns: dict, schema: pa.Schema, n: int) -> pa.Table:
    """The schema's columns, those not given all null."""
    return pa.Table.from_pydict({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)


def embedding_batch(rng, start: int, n: int, centers: np.ndarray, tag: str) -> pa.Table:
    vectors = unit(centers[rng.integers(len(centers), size=n)] + 0.08 * rng.standard_normal((n, DIM)))
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM)
    ids = [f"clip-{i:08d}" for i in range(start, start + n)]
    captioned = rng.random(n) < 0.1
    words = rng.integers(len(WORDS), size=(n, 3))
    descriptions = [f"A {WORDS[a]} face and a {WORDS[b]}, {WORDS[c]} voice." if ok else None
                    for ok, (a, b, c) in zip(captioned, words, strict=True)]
    return with_nulls(
        {"clip_id": ids, "model": ["bench"] * n, "run_tag": [tag] * n, "dataset": ["voxceleb2"] * n,
         "speaker": [f"id{i % 6000:05d}" for i in range(start, start + n)], "shard": [f"b-{i // 500:06d}.tar" for i in
                                                                                      range(start, start + n)],
         "captioned": captioned.tolist(), "description": descriptions, "text_encoder": [BUNDLED] * n,
         "vector": column, "video_vec": column, "audio_vec": column},
        embeddings_schema(DIM), n)


def caption_batch(start: int, n: int) -> pa.Table:
    return with_nulls(
        {"clip_id": [f"clip-{(i // len(PROMPTS)):08d}" for i in range(start, start + n)],
         "prompt_version": [PROMPTS[i % len(PROMPTS)] for i in range(start, start + n)], "model": ["qwen"] * n,
         "status": ["ok"] * n, "run_tag": ["caption-bench"] * n},
        store.captions_schema(DIM), n)


def progress(what: str, since: float) -> None:
    print(f"{time.perf_counter() - since:8.1f} s  {what}", file=sys.stderr, flush=True)


def timed(call, repeats: int) -> tuple[dict, list]:
    seconds, results = [], []
    for i in range(repeats):
        start = time.perf_counter()
        results.append(call(i))
        seconds.append(time.perf_counter() - start)
    ordered = sorted(seconds)
    return {"median_ms": round(1000 * statistics.median(ordered), 2),
            "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
            "calls": repeats}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--db", type=Path, help="database folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    db = args.db or Path(tempfile.mkdtemp(prefix="store-bench-"))
    rng = np.random.default_rng(0)
    centers = unit(rng.standard_normal((1000, DIM)))
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "rows": args.rows}
    try:
        start = time.perf_counter()
        embeddings = store.connect(db).create_table(EMBEDDINGS, schema=embeddings_schema(DIM), exist_ok=True)
        captions = store.open_captions(store.connect(db), DIM)
        for first in range(0, args.rows, BATCH):
            n = min(BATCH, args.rows - first)
            embeddings.add(embedding_batch(rng, first, n, centers, TAG))
            captions.add(caption_batch(first, n))
        embeddings.branches.create(TAG, from_version=embeddings.version)  # a run tag as earlier releases left it
        report["build_seconds"] = round(time.perf_counter() - start, 1)
        progress("tables written", start)
        vectors = text_encoder(BUNDLED).encode(QUERIES)  # the encoder loads once per process, as in `vaemo search`

        def searches(tag: str, match: str | None = None):
            return lambda i: search(db, QUERIES[i % len(QUERIES)], 10, tag=tag, match=match)[0]

        def queries(tag: str):  # the table part alone: the text encoder's share is the same before and after
            table = TableVersion.pin(db, EMBEDDINGS, tag, "align-").open()
            return lambda i: nearest(table, f"run_tag = {store.quote(tag)}", vectors[i % len(QUERIES)], "vector", 10)

        def keys(i: int):
            return store.existing_keys(captions, PROMPTS[i % len(PROMPTS)], "qwen")

        report["before"] = {"search": timed(searches(TAG), args.queries)[0],
                            "vector_query": timed(queries(TAG), args.queries)[0],
                            "existing_keys": timed(keys, args.queries)[0]}
        exact = timed(queries(TAG), len(QUERIES))[1]
        progress("measured without indexes", start)

        start = time.perf_counter()
        embeddings.branches.delete(TAG)  # the same run, pinned again once indexed (search filters on its tag)
        store.tag_and_optimize(embeddings, TAG, EMBEDDING_INDEXES, StoreConfig())
        report["index_seconds_embeddings"] = round(time.perf_counter() - start, 1)
        progress("clip_embeddings indexed", start)
        start = time.perf_counter()
        store.tag_and_optimize(captions, "caption-after", store.CAPTION_INDEXES, StoreConfig())
        report["index_seconds_captions"] = round(time.perf_counter() - start, 1)
        report["indexes"] = {"clip_embeddings": sorted(i.name for i in embeddings.list_indices()),
                             "captions": sorted(i.name for i in captions.list_indices())}

        after, approximate = timed(queries(TAG), args.queries)
        report["after"] = {"search": timed(searches(TAG), args.queries)[0], "vector_query": after,
                           "existing_keys": timed(keys, args.queries)[0],
                           "search_match": timed(searches(TAG, "trembling"), args.queries)[0]}
        recall = [len(set(a["clip_id"]) & set(e["clip_id"])) / 10 for a, e in zip(approximate, exact, strict=False)]
        report["recall_at_10"] = round(float(np.mean(recall)), 3)
        report["keys_per_existing_keys_call"] = len(keys(0))
        for name in ("search", "vector_query", "existing_keys"):
            report[f"{name}_speedup_median"] = round(
                report["before"][name]["median_ms"] / report["after"][name]["median_ms"], 1)
    finally:
        if args.db is None:
            shutil.rmtree(db, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
