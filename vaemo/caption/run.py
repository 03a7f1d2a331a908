"""One captioning run: select clips, skip those already described, generate chunk by chunk, store, tag.

The clips to describe are cut into chunks of ``batch_clips`` across shards; each chunk is one
batched generation (vaemo.caption.replicas) and one upsert, so a killed run loses at most the
chunks in flight, and the next run skips every stored key. While the engines generate, a reader
thread decodes the next chunks' media and a writer thread embeds and stores the finished ones.
The run holds the table's writer lock from start to end (its writer thread is the only writer) and
closes by tagging the table version it produced.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from vaemo import store
from vaemo.artifacts import IngestFolder
from vaemo.caption.engines import CaptionEngine, resolve_model
from vaemo.caption.inputs import ClipMedia, ShardRead, clip_media, shard_samples
from vaemo.caption.prompt import LABEL_AWARE_SUFFIX, json_schema, load_prompt, parse_reply
from vaemo.caption.replicas import Attempts, ChunkResult, InProcess, Job, ReplicaPool, replica_count
from vaemo.caption.select import select_clips
from vaemo.config import CaptionConfig
from vaemo.data.loader import ShardLosses
from vaemo.data.samples import SampleError
from vaemo.text import text_encoder


def check_settings(cfg: CaptionConfig) -> None:
    """A clear error before any work when the captioning model or the prompt cannot be found."""
    resolve_model(cfg.model)
    load_prompt(cfg.prompt)


def model_key(model: str) -> str:
    """The model part of a caption key: a hub id as given, a local folder by its name (paths move)."""
    path = Path(model)
    return path.name if path.is_dir() else model


@dataclass
class Plan:
    selected: pd.DataFrame
    todo: dict[str, list[str]]  # shard -> clip ids to describe in this run
    already_stored: int

    @property
    def clips_todo(self) -> int:
        return sum(len(v) for v in self.todo.values())

    def chunks(self, size: int) -> list[list[tuple[str, str]]]:
        """The (shard, clip id) pairs to describe, in shard order, cut into chunks of ``size`` across shards."""
        pairs = [(shard, cid) for shard, ids in self.todo.items() for cid in ids]
        return [pairs[i:i + size] for i in range(0, len(pairs), size)]


@dataclass
class Chunk:
    """One chunk's clips with their media decoded; the clips that could not be read carry the reason."""

    index: int
    clips: list[tuple[str, str]]
    media: dict[str, ClipMedia]
    unreadable: dict[str, str]


class CaptionRun:
    def __init__(self, shards_dir: str | Path, db_dir: str | Path, cfg: CaptionConfig, force: bool = False):
        self.ingest, self.db_dir, self.cfg, self.force = IngestFolder(shards_dir), Path(db_dir), cfg, force
        self.prompt = load_prompt(cfg.prompt)
        self.prompt_version = self.prompt.version + (LABEL_AWARE_SUFFIX if cfg.label_aware else "")
        self.model = model_key(cfg.model)
        self.tag = store.new_run_tag("caption")
        self.schema = json_schema(self.prompt.limits)
        self.written: Counter = Counter()
        self.losses = ShardLosses()
        self.tokens = 0
        self.generation_seconds = 0.0
        self.engines: dict = {}

    def __enter__(self) -> CaptionRun:
        self.clips = self.ingest.clips()
        self._lock = store.writer_lock(self.db_dir, store.CAPTIONS)
        self._lock.__enter__()
        try:
            self.encoder = text_encoder(self.cfg.text_encoder)
            self.table = store.open_captions(store.connect(self.db_dir), self.encoder.dim)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def plan(self) -> Plan:
        selected = select_clips(self.clips, self.cfg)
        stored = set() if self.force else store.existing_keys(self.table, self.prompt_version, self.model)
        todo = selected[~selected["clip_id"].isin(stored)]
        self.selected = selected.set_index("clip_id", drop=False)
        return Plan(
            selected, {s: list(g["clip_id"]) for s, g in todo.groupby("shard", sort=True)}, len(selected) - len(todo)
        )

    def _messages(self, clip_id: str) -> tuple[list[dict], bool]:
        label = self.selected.at[clip_id, "label"] if self.cfg.label_aware and "label" in self.selected else None
        hint = label if isinstance(label, str) and label else None
        return self.prompt.messages(hint), hint is not None

    def read_chunk(self, index: int, clips: list[tuple[str, str]]) -> Chunk:
        """Decode the media of a chunk's clips, reading each of its shards once."""
        chunk = Chunk(index, clips, {}, {})
        by_shard: dict[str, set[str]] = {}
        for shard, cid in clips:
            by_shard.setdefault(shard, set()).add(cid)
        for shard, wanted in by_shard.items():
            read, path = ShardRead(), self.ingest.shards_dir / shard
            if path.is_file():
                for clip_id, sample in shard_samples(path, wanted, self.losses, read):
                    try:
                        chunk.media[clip_id] = clip_media(sample, self.cfg.frames)
                    except SampleError as exc:
                        chunk.unreadable[clip_id] = f"unreadable media: {exc}"
            missing = (f"lost: shard {shard} gave {read.loss.read} of its {read.loss.expected} samples "
                       f"({read.loss.reason})" if read.loss else f"not found in shard {shard}")
            for clip_id in wanted - chunk.media.keys() - chunk.unreadable.keys():
                chunk.unreadable[clip_id] = missing
        return chunk

    def job(self, chunk: Chunk) -> Job:
        return Job(chunk.index, {cid: self._messages(cid)[0] for cid in chunk.media}, chunk.media)

    def store_chunk(self, chunk: Chunk, result: ChunkResult) -> dict[str, int]:
        """Embed and upsert a generated chunk's rows (one table version); returns counts per status."""
        rows = [self._row(cid, shard, result.history.get(cid), chunk.unreadable.get(cid))
                for shard, cid in chunk.clips]
        self._embed(rows)
        store.upsert(self.table, pa.Table.from_pylist(rows, schema=self.table.schema), store.CAPTION_KEYS)
        counts = Counter(r["status"] for r in rows)
        self.written.update(counts)
        return dict(counts)

    @contextmanager
    def generators(self, engine: CaptionEngine | None = None,
                   load: Callable[[CaptionConfig], CaptionEngine] | None = None):
        """The engines of this run: ``engine`` (or one loaded here) in this process, or ``replicas`` processes."""
        from vaemo.caption.engines import load_engine

        replicas = 1 if engine is not None else replica_count(self.cfg)
        if replicas == 1:
            gen = InProcess(engine or (load or load_engine)(self.cfg), self.prompt, self.schema, self.cfg.retries)
        else:
            gen = ReplicaPool(self.cfg, self.prompt, self.schema, replicas, load or load_engine)
        try:
            yield gen
        finally:
            gen.close()
            self.engines = gen.tracker.summary()

    def caption_all(self, plan: Plan, generators, on_chunk: Callable[[dict[str, int]], None] | None = None) -> None:
        """Describe every clip of the plan, chunk by chunk; ``on_chunk(counts)`` follows each stored chunk.

        The engines never wait on I/O in steady state: the chunks ahead are decoded on a reader thread
        (one more than there are replicas), finished ones are embedded and stored on a writer thread.
        """
        chunks = plan.chunks(self.cfg.batch_clips)
        read: dict[int, Chunk] = {}
        stores: deque[Future] = deque()

        def report(until_empty: bool) -> None:
            while stores and (until_empty or stores[0].done()):
                counts = stores.popleft().result()
                if on_chunk:
                    on_chunk(counts)

        with ThreadPoolExecutor(1, "caption-read") as reader, ThreadPoolExecutor(1, "caption-store") as writer:
            def jobs() -> Iterator[Job]:
                depth = generators.replicas + 1
                ahead = deque(reader.submit(self.read_chunk, i, c) for i, c in enumerate(chunks[:depth]))
                rest = iter(enumerate(chunks[depth:], depth))
                while ahead:
                    chunk = ahead.popleft().result()
                    following = next(rest, None)
                    if following:
                        ahead.append(reader.submit(self.read_chunk, *following))
                    read[chunk.index] = chunk
                    yield self.job(chunk)

            for result in generators.results(jobs()):
                stores.append(writer.submit(self.store_chunk, read.pop(result.index), result))
                report(until_empty=False)
            report(until_empty=True)

    def _row(self, clip_id: str, shard: str, attempts: Attempts | None, unreadable: str | None) -> dict:
        meta = self.selected.loc[clip_id]
        sampling = {**self.cfg.sampling.model_dump(), "seed": self.cfg.seed, "frames": self.cfg.frames,
                    "retries": self.cfg.retries}
        row = {"clip_id": clip_id, "prompt_version": self.prompt_version, "model": self.model,
               "engine": self.cfg.engine, "label_aware": self._messages(clip_id)[1],
               "prompt_digest": self.prompt.digest, "sampling": json.dumps(sampling, sort_keys=True), "shard": shard,
               "run_tag": self.tag, "created_at": dt.datetime.now(dt.UTC), "text_encoder": self.encoder.name,
               **{k: (None if pd.isna(meta.get(k)) else str(meta.get(k))) for k in ("dataset", "speaker", "label")}}
        if attempts is None:
            return {**row, "status": "failed", "reason": unreadable, "attempts": 0, "failures": "[]",
                    "prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0}
        last = attempts.generations[-1]
        parsed = parse_reply(last.text, self.prompt.limits)
        generated = sum(g.generated_tokens for g in attempts.generations)
        seconds = sum(g.seconds for g in attempts.generations)
        self.tokens += generated
        self.generation_seconds += seconds
        row.update(attempts=len(attempts.generations), raw_output=last.text, failures=json.dumps(attempts.failures),
                   prompt_tokens=sum(g.prompt_tokens for g in attempts.generations), generated_tokens=generated,
                   seconds=seconds)
        if parsed.reason:
            return {**row, "status": "failed",
                    "reason": f"no usable reply after {len(attempts.generations)} attempt(s); last: {parsed.reason}"}
        return {**row, "status": "ok", "reason": None, **parsed.description.model_dump()}

    def _embed(self, rows: list[dict]) -> None:
        """Text embeddings of the usable rows' description and cues, computed once, stored with the row."""
        ok = [r for r in rows if r["status"] == "ok"]
        for field_name, column in (("description", "description_vec"), ("facial_cues", "facial_vec"),
                                   ("vocal_cues", "vocal_vec")):
            vectors = self.encoder.encode([r[field_name] for r in ok]) if ok else np.zeros((0, self.encoder.dim))
            for row, vector in zip(ok, vectors, strict=True):
                row[column] = vector.tolist()

    def finalize(self, plan: Plan, seconds: float) -> dict:
        """Tag the table version this run leaves and summarise the selected clips' rows."""
        version = store.tag_and_optimize(self.table, self.tag, store.CAPTION_INDEXES, self.cfg.store)
        ids = set(plan.selected["clip_id"])
        rows = self.table.search().where(
            f"prompt_version = {store.quote(self.prompt_version)} AND model = {store.quote(self.model)}"
        ).select(["clip_id", "status"]).to_pandas()
        rows = rows[rows["clip_id"].isin(ids)]
        captioned = sum(self.written.values())
        return {
            "db": str(self.db_dir),
            "table": store.CAPTIONS,
            "tag": self.tag,
            "version": version,
            "prompt_version": self.prompt_version,
            "prompt_digest": self.prompt.digest,
            "model": self.model,
            "selected": len(ids),
            "stored": len(rows),
            "captioned_now": captioned,
            "already_stored": plan.already_stored,
            "status_counts": dict(Counter(rows["status"])),
            "written_counts": dict(self.written),
            **self.losses.summary(),
            "generated_tokens": self.tokens,
            "seconds": round(seconds, 3),
            "clips_per_second": round(captioned / seconds, 4) if seconds > 0 else None,
            "tokens_per_second": round(self.tokens / self.generation_seconds, 2)
            if self.generation_seconds > 0
            else None,
            "engines": self.engines,
        }

    def sample_rows(self, limit: int = 20) -> pd.DataFrame:
        """A few of this run's rows for people to read (MLflow table artifact, Prefect report)."""
        columns = ["clip_id", "status", "emotion", "intensity", "description", "reason"]
        rows = self.table.search().where(f"run_tag = {store.quote(self.tag)}").select(columns).limit(limit).to_pandas()
        return rows[columns]


def caption(shards_dir: str | Path, db_dir: str | Path, cfg: CaptionConfig, force: bool = False,
            engine: CaptionEngine | None = None, on_chunk=None,
            load: Callable[[CaptionConfig], CaptionEngine] | None = None) -> dict:
    """Run captioning without an orchestrator (library use); the `caption` flow does the same with tracking.

    ``engine``: an engine already loaded in this process (no replicas); ``load``: how engines are loaded
    (in each replica's process when ``replicas`` > 1).
    """
    start = time.perf_counter()
    with CaptionRun(shards_dir, db_dir, cfg, force) as run:
        plan = run.plan()
        if plan.todo:
            with run.generators(engine, load) as generators:
                run.caption_all(plan, generators, on_chunk)
        return run.finalize(plan, time.perf_counter() - start)
