"""Clip embeddings from a trained model: from a video file, a folder of videos, or ingest shards.

A video file goes through the same ingest processing as a corpus (speech windows, the speaker's
face track, crops), in memory; every clip is embedded from its centred 2.56 s window, exactly as
evaluation sees it. Video-only, audio-only or joint embeddings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vaemo.artifacts import IngestFolder
from vaemo.config import IngestConfig
from vaemo.data.config import DataConfig
from vaemo.data.loader import ShardLosses, make_loader
from vaemo.data.samples import load_sample
from vaemo.errors import MediaError
from vaemo.ingest.adapters import find_videos
from vaemo.ingest.process import content_hash, process_video, video_id_of
from vaemo.ingest.records import SourceRecord
from vaemo.model import av
from vaemo.registry import MODALITIES, Modality

log = logging.getLogger(__name__)


def _file_batches(path: Path, data: DataConfig, ingest: IngestConfig, batch_size: int) -> Iterator[dict]:
    record = SourceRecord(path=path.name, dataset="generic")
    outcome = process_video(path.parent, record, video_id_of(content_hash(path.parent, record)), ingest)
    if outcome.status != "ok":
        raise MediaError(outcome.status, f"{path}: no clip to embed ({outcome.status}: {outcome.reason})")
    samples = [
        load_sample({"__key__": c.clip_id, "mp4": c.video, ingest.audio_format: c.audio, "json": json.dumps(c.meta)},
                    data, train=False)
        for c in outcome.clips
    ]
    for begin in range(0, len(samples), batch_size):
        chunk = samples[begin : begin + batch_size]
        yield {"video": torch.stack([s["video"] for s in chunk]), "audio": torch.stack([s["audio"] for s in chunk]),
               "clip_id": [s["clip_id"] for s in chunk]}


def _counted(batches, bar) -> Iterator[dict]:
    with bar:
        for batch in batches:
            bar.update(len(batch["clip_id"]) + int(batch.get("skipped", 0)))
            yield batch


@torch.no_grad()
def encode(source: str | Path, model: str | Path | av.AVMAE, modality: Modality = "av", *, batch_size: int = 8,
           num_workers: int = 0, ingest: IngestConfig | None = None, progress: bool = False,
           losses: ShardLosses | None = None) -> dict[str, np.ndarray]:
    """clip_id -> embedding (float32) for a video file, a folder of videos, or an ingest folder.

    ``progress`` shows a tqdm bar over the clips of an ingest folder; ``losses`` collects what its
    broken shards lost.
    """
    model = (
        av.load(model) if isinstance(model, (str, Path)) else model
    )  # or any loaded model with .cfg and .encode (e.g. Stage 2's)
    model.eval()
    device = next(model.parameters()).device
    data = DataConfig().for_model(model.cfg)
    source = Path(source)
    if IngestFolder(source).is_ingest_folder():
        folder = IngestFolder(source)
        # Video embeddings read no audio, so they also cover the video-only clips an ingest may hold.
        batches = make_loader(folder.shard_urls(), data, train=False, batch_size=batch_size, num_workers=num_workers,
                              losses=losses, video_only=modality == "video")
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(folder.shard_samples().values()) or None, desc=f"embed {modality}", unit="clip")
            batches = _counted(batches, bar)
    elif source.is_dir():
        out = {}
        for video in find_videos(source):  # raises CorpusError for a folder without videos
            try:
                out.update(encode(source / video, model, modality, batch_size=batch_size, ingest=ingest))
            except MediaError as exc:
                log.warning("%s", exc)
        return out
    else:
        batches = _file_batches(source, data, ingest or IngestConfig(), batch_size)
    out: dict[str, np.ndarray] = {}
    for batch in batches:
        if not batch["clip_id"]:
            continue
        inputs = {"video": batch["video"].to(device)} if modality != "audio" else {}
        if modality != "video":
            inputs["audio"] = batch["audio"].to(device)
        features = model.encode(**inputs, unimodal=modality != "av")
        for clip_id, vector in zip(batch["clip_id"], features[MODALITIES[modality]].float().cpu().numpy(), strict=True):
            out[clip_id] = vector
    return out


def write_embeddings(source: Path, model: Path, out: Path, modality: Modality = "av", batch_size: int = 8) -> str:
    """``vaemo embed``: the clips' embeddings as an .npz of ``clip_id`` and ``embedding`` arrays; a line saying so."""
    vectors = encode(source, model, modality, batch_size=batch_size)
    if not vectors:
        raise MediaError("no_clip", f"no clip of {source} could be embedded")
    ids = sorted(vectors)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, clip_id=np.array(ids), embedding=np.stack([vectors[i] for i in ids]))
    return f"{len(ids)} {modality} embeddings of size {len(vectors[ids[0]])} written to {out}"
