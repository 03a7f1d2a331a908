"""Stage 2 data: caption rows from a pinned LanceDB version, joined on ``clip_id`` with an ingest folder.

A run reads the ``captions`` table as it was at one version tag (``caption_tag``; by default the
newest caption run's tag) and always records that tag and its version, so it can be reproduced.
Only rows whose status is ``ok`` are used; the others are counted and reported. The text
embeddings are the ones cached in the table when the captions were written; they are read once
per run (never recomputed per epoch). A ``text_encoder`` other than the one that made them
re-embeds the texts once, in memory.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vaemo import store
from vaemo.artifacts import IngestFolder, TableVersion
from vaemo.config import AlignConfig
from vaemo.errors import ArtifactError

log = logging.getLogger(__name__)

FIELDS = {"description": "description_vec", "facial_cues": "facial_vec", "vocal_cues": "vocal_vec"}
COLUMNS = ["clip_id", "prompt_version", "model", "status", "reason", "text_encoder", "emotion", *FIELDS,
           *FIELDS.values()]


class AlignDataError(ArtifactError):
    """Captions that cannot be used for alignment; the message says why and what to do."""


@dataclass
class CaptionSet:
    """The usable captions of one pinned table version, in a fixed clip order."""

    db: str
    table: str
    tag: str
    version: int
    prompt_version: str
    model: str
    text_encoder: str
    dim: int
    clip_ids: list[str]  # status ok and present in the shards, sorted
    texts: dict[str, list[str]]  # caption field (and emotion) -> one text per clip
    vectors: dict[str, np.ndarray]  # caption field -> (N, dim) float32, L2-normalised
    uncaptioned: list[str]  # clips of the shards without a usable caption (for the reconstruction term)
    counts: dict = field(default_factory=dict)

    @property
    def pinned(self) -> TableVersion:
        return TableVersion(self.db, self.table, self.tag, self.version)

    def summary(self) -> dict:
        return {"db": self.db, "table": self.table, "tag": self.tag, "version": self.version,
                "prompt_version": self.prompt_version, "model": self.model, "text_encoder": self.text_encoder,
                **self.counts}


def _choose(rows: pd.DataFrame, column: str, wanted: str | None, option: str) -> str:
    found = sorted(rows[column].dropna().unique())
    if wanted is not None:
        if wanted not in found:
            raise AlignDataError(
                f"no ok caption with {column} {wanted!r} in this version (found: {', '.join(found) or 'none'})"
            )
        return wanted
    if len(found) > 1:
        raise AlignDataError(
            f"the pinned captions hold several {column}s ({', '.join(found)}); choose one with {option}"
        )
    return found[0]


def load_captions(db: str | Path, shards_dir: str | Path, cfg: AlignConfig) -> CaptionSet:
    """The ok captions of the pinned version whose clips are in ``shards_dir``; AlignDataError if none."""
    shard_clips = set(IngestFolder(shards_dir).clips(columns=["clip_id"])["clip_id"])
    pinned = TableVersion.pin(db, store.CAPTIONS, cfg.caption_tag, "caption-")
    table = pinned.open()
    rows = table.search().select(COLUMNS).to_pandas() if table.count_rows() else pd.DataFrame(columns=COLUMNS)
    where = f"{db} table {store.CAPTIONS!r} at tag {pinned.tag!r} (version {pinned.version})"
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(Counter(rows["status"]).items())) or "no rows"
        raise AlignDataError(f"no ok caption in {where} ({statuses}); caption more clips first")
    prompt_version = _choose(ok, "prompt_version", cfg.caption_prompt_version, "caption_prompt_version")
    model = _choose(ok[ok["prompt_version"] == prompt_version], "model", cfg.caption_model, "caption_model")
    chosen = rows[(rows["prompt_version"] == prompt_version) & (rows["model"] == model)]
    in_shards = chosen[chosen["clip_id"].isin(shard_clips)]
    usable = in_shards[in_shards["status"] == "ok"].sort_values("clip_id")
    not_ok = in_shards[in_shards["status"] != "ok"]
    counts = {
        "rows": len(chosen),
        "captions_ok": len(usable),
        "captions_skipped": len(not_ok),
        "captions_skipped_by_status": dict(Counter(not_ok["status"].fillna("missing"))),
        "captions_not_in_shards": int((~chosen["clip_id"].isin(shard_clips)).sum()),
        "shard_clips": len(shard_clips),
    }
    if len(usable) < 2:
        raise AlignDataError(
            f"{len(usable)} ok caption(s) of clips in {shards_dir} in {where} (prompt {prompt_version}, "
            f"model {model}; {counts['captions_skipped']} not ok, {counts['captions_not_in_shards']} of other clips); "
            "contrastive alignment needs at least 2"
        )
    if counts["captions_skipped"]:
        log.warning("%d caption(s) skipped: status not ok (%s)", counts["captions_skipped"],
                    counts["captions_skipped_by_status"])

    made_by = sorted(usable["text_encoder"].dropna().unique())
    encoder = cfg.text_encoder or (made_by[0] if len(made_by) == 1 else None)
    if encoder is None:
        raise AlignDataError(
            f"the ok captions were embedded by several text encoders ({', '.join(made_by) or 'none recorded'}); "
            "set text_encoder to re-embed them with one"
        )
    texts = {name: usable[name].fillna("").astype(str).tolist() for name in (*FIELDS, "emotion")}
    vectors, embedded_now = {}, 0
    for name, column in FIELDS.items():
        cached = usable[column].tolist()
        if encoder in made_by and len(made_by) == 1 and all(v is not None and len(v) for v in cached):
            vectors[name] = np.stack([np.asarray(v, dtype=np.float32) for v in cached])
        else:  # another encoder, or rows without vectors: embed once for this run
            from vaemo.text import text_encoder

            vectors[name] = text_encoder(encoder).encode(texts[name])
            embedded_now += len(cached)
    dims = {v.shape[1] for v in vectors.values()}
    counts["text_vectors_embedded_now"] = embedded_now
    return CaptionSet(db=str(db), table=store.CAPTIONS, tag=pinned.tag, version=pinned.version,
                      prompt_version=prompt_version, model=model, text_encoder=encoder, dim=dims.pop(),
                      clip_ids=usable["clip_id"].tolist(), texts=texts, vectors=vectors,
                      uncaptioned=sorted(shard_clips - set(usable["clip_id"])), counts=counts)
