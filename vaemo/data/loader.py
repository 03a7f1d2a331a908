"""WebDataset pipelines over ingest shards: windows for training, every clip once for evaluation.

Pipeline, built in one place (:func:`make_dataset`)::

    shard list -> split by rank -> split by DataLoader worker -> tar samples -> shuffle buffer (train)
    -> decode (load_sample, in the worker, from the sample's bytes) -> batches (in the worker)

Shards are split by rank first (webdataset's ``split_by_node`` reads torch.distributed, or RANK and
WORLD_SIZE) and then by worker. When there are fewer shards than readers (ranks x workers), some
reader would get none: webdataset then raises "No samples found" in a worker, and under DDP a rank
without data hangs the others at the next collective (webdataset#188). Training therefore logs a
warning and switches to ``wds.ResampledShards`` (every reader draws shards with replacement from
the whole list) with a fixed epoch length. Training under DDP always gets a fixed epoch length
(``with_epoch``), so every rank runs the same number of steps. Evaluation never resamples (every
clip exactly once); readers without a shard just yield nothing, and under DDP the ranks see
different numbers of clips, so gather results rather than assume equal counts.

Skipped samples. A sample whose bytes do not decode (mp4, flac, json, a clip_id that does not
match its key, audio and video of different lengths) is skipped, never zero-filled or swapped for
another clip, and it is counted. DataLoader workers are separate processes, so a counter in a
worker is invisible to the training loop; instead the count travels with the data. The decode
stage emits a :class:`Skipped` record in place of each bad sample (an unreadable or truncated
shard counts once per pass, named by its url), and the batching stage, which runs in the same
worker, folds the records into the next batch it emits: ``batch["skipped"]`` (int) and
``batch["skipped_clips"]`` (ids). The batcher holds one finished batch back, so records met after
the last full batch of a stream are added to that batch rather than lost (in a fixed-length epoch,
records past the cut belong to no epoch, and the held-back batch costs one extra decoded batch per
worker per epoch). Summing ``batch["skipped"]`` over an epoch gives the total; only a worker that
found no good clip at all emits a batch with zero clips, to carry its count, so a loop should skip
batches whose ``clip_id`` is empty after adding their count. Each skip is also logged at WARNING
by the worker.

Randomness. All randomness derives from ``seed``, the rank, the worker id, and a per-epoch
number: the worker's DataLoader seed (drawn each epoch from the loader's generator, which
:func:`make_loader` seeds with ``seed``) or, in the main process, a count of passes. The shard
order is the same on every rank, so the split by rank stays a partition.
"""

from __future__ import annotations

import logging
import math
import re
import tarfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from webdataset.tariterators import base_plus_ext
from webdataset.utils import pytorch_worker_info

from vaemo.data.config import DataConfig
from vaemo.data.samples import SampleError, load_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A sample (or an unreadable shard) that was left out, and why."""

    clip_id: str
    reason: str


def count_samples(urls: Iterable[str]) -> int:
    """Samples in local tar shards, from the tar headers (no member is read)."""
    total = 0
    for url in urls:
        path = Path(url)
        if not path.is_file():
            raise ValueError(f"cannot count the samples of {url!r} (not a local file): pass epoch_samples")
        with tarfile.open(path) as tar:
            keys = {base_plus_ext(m.name)[0] for m in tar if m.isfile()}
        total += len(keys - {None})
    return total


class _Context:
    """Per-process state shared by the stages of one pipeline copy: seeds and shard read errors."""

    def __init__(self, seed: int):
        self.seed = seed
        self.passes = 0
        self.shared: list[int] = [seed]  # the same on every rank and worker within a pass
        self.local: list[int] = [seed]  # distinct per rank and worker
        self.errors: list[Skipped] = []
        self.bad_shards: set[str] = set()

    def begin_pass(self) -> None:
        self.passes += 1
        self.bad_shards = set()
        info = torch.utils.data.get_worker_info()
        epoch_seed = info.seed - info.id if info is not None else 0  # same base for all workers of a pass
        rank, _world, worker, _workers = pytorch_worker_info()
        self.shared = [self.seed, epoch_seed, self.passes]
        self.local = [*self.shared, rank, worker]

    def rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([*self.local, purpose])

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler: record the unreadable shard (once per pass) and carry on with the next."""
        text = " ".join(str(a) for a in exn.args)
        named = re.search(r"name='([^']+)'", text)  # a member error names the stream, not the url
        url = (
            next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), named and named.group(1))
            or "?"
        )
        reason = f"shard read error: {type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        log.warning("skipped %s: %s", url, reason)
        if url not in self.bad_shards:
            self.bad_shards.add(url)
            self.errors.append(Skipped(url, reason))
        return True

    def drain(self) -> list[Skipped]:
        errors, self.errors = self.errors, []
        return errors


@dataclass
class _Shards:
    """First stage: the shard list for one pass (shuffled for training, or resampled)."""

    urls: list[str]
    ctx: _Context
    train: bool
    resample: bool

    def __call__(self) -> Iterator[dict]:
        # Not a generator function: the pass's seeds must be set before the later stages draw theirs.
        self.ctx.begin_pass()
        if self.resample:
            seed = int(np.random.SeedSequence(self.ctx.local).generate_state(1)[0])
            return iter(wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True))
        order = list(self.urls)
        if self.train:  # the same permutation on every rank and worker, so the splits partition it
            np.random.default_rng(self.ctx.shared).shuffle(order)
        return iter([dict(url=url) for url in order])


@dataclass
class _Shuffle:
    ctx: _Context
    size: int

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rng, buffer = self.ctx.rng(1), []
        for sample in src:
            if len(buffer) < self.size:
                buffer.append(sample)
                continue
            index = int(rng.integers(len(buffer)))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


@dataclass
class _Select:
    """Only the samples whose key is one of ``keep`` (a class, not a lambda, so workers can be spawned)."""

    keep: frozenset

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        return (sample for sample in src if sample.get("__key__") in self.keep)


@dataclass
class _Decode:
    """Bytes to tensors, in the worker. Bad samples become Skipped records; bugs propagate."""

    cfg: DataConfig
    train: bool
    ctx: _Context
    video_only: bool = False

    def __call__(self, src: Iterator[dict]) -> Iterator[dict | Skipped]:
        rng = self.ctx.rng(2)
        for sample in src:
            yield from self.ctx.drain()
            try:
                yield load_sample(sample, self.cfg, train=self.train, rng=rng, video_only=self.video_only)
            except SampleError as exc:
                clip_id = str(sample.get("__key__") or sample.get("__url__") or "?")
                log.warning("skipped %s: %s", clip_id, exc)
                yield Skipped(clip_id, str(exc))
        yield from self.ctx.drain()


def collate(samples: list[dict], skipped: list[Skipped], cfg: DataConfig) -> dict:
    """Stack decoded samples; ``skipped`` are the records this batch reports."""
    if samples:
        video = torch.stack([s["video"] for s in samples])
        audio = torch.stack([s["audio"] for s in samples])
    else:
        video = torch.empty(0, 3, cfg.frames, cfg.image_size, cfg.image_size)
        audio = torch.empty(0, cfg.audio_frames, cfg.mel_bins)
    return {
        "video": video,
        "audio": audio,
        "clip_id": [s["clip_id"] for s in samples],
        "window": torch.tensor([[s["window"].start, s["window"].end] for s in samples], dtype=torch.float64).reshape(
            -1, 2
        ),
        "skipped": len(skipped),
        "skipped_clips": [s.clip_id for s in skipped],
    }


def _add_skips(batch: dict, skipped: list[Skipped]) -> dict:
    batch["skipped"] += len(skipped)
    batch["skipped_clips"] = batch["skipped_clips"] + [s.clip_id for s in skipped]
    return batch


@dataclass
class _Batches:
    """Batches made in the worker, carrying the Skipped records met since the previous batch."""

    cfg: DataConfig
    size: int
    partial: bool

    def __call__(self, src: Iterator[dict | Skipped]) -> Iterator[dict]:
        held, samples, skipped = None, [], []
        for item in src:
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            samples.append(item)
            if len(samples) == self.size:
                batch, samples, skipped = collate(samples, skipped, self.cfg), [], []
                if held is not None:
                    yield held
                held = batch
        if samples and self.partial:
            batch, skipped = collate(samples, skipped, self.cfg), []
            if held is not None:
                yield held
            held = batch
        if skipped:
            held = _add_skips(held, skipped) if held is not None else collate([], skipped, self.cfg)
        if held is not None:
            yield held


def make_dataset(shard_urls: list[str], cfg: DataConfig, *, train: bool, seed: int = 0,
                 epoch_samples: int | None = None, batch_size: int | None = None, num_workers: int = 0,
                 clip_ids: Collection[str] | None = None, video_only: bool = False) -> wds.DataPipeline:
    """A webdataset pipeline of decoded windows (batch_size=None) or of batches.

    Without batch_size the items are sample dicts ({"video", "audio", "clip_id", "window"}) and
    :class:`Skipped` records in place of bad samples. ``num_workers`` is the DataLoader's, used to
    see whether every reader gets a shard. ``epoch_samples``: clips per
    epoch over all ranks and workers (training only); by default the natural pass over the shards,
    or, when the epoch must be fixed (resampled shards, DDP), the number of samples in the shards.
    ``clip_ids``: only these clips (e.g. one fold's training part); the others are passed over
    before decoding, and a fixed epoch then counts only these. ``video_only``: frames only, see
    :func:`~vaemo.data.samples.load_sample`.
    """
    urls = [str(u) for u in shard_urls]
    if not urls:
        raise ValueError("no shard urls given")  # callers get them from IngestFolder.shard_urls, never empty
    _rank, world, _, _ = pytorch_worker_info()
    readers = cfg.readers(world, num_workers)
    resample = False
    if len(urls) < readers:
        if train:
            log.warning(
                "%d shard(s) for %d readers (%d rank(s) x %d worker(s)): some would get no shard and fail or hang "
                "(webdataset#188); resampling shards with a fixed epoch length instead",
                len(urls), readers, world, max(num_workers, 1),
            )
            resample = True
        else:
            log.warning(
                "%d shard(s) for %d readers: some readers stay idle; every clip is still read once", len(urls), readers
            )
    if train and epoch_samples is None and (resample or world > 1):
        epoch_samples = len(clip_ids) if clip_ids is not None else count_samples(urls)

    ctx = _Context(seed)
    stages: list = [_Shards(urls, ctx, train, resample)]
    if not resample:  # resampled readers each draw from the whole list
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=ctx.tar_error))
    if clip_ids is not None:
        stages.append(_Select(frozenset(clip_ids)))
    if train and cfg.shuffle_buffer > 1:
        stages.append(_Shuffle(ctx, cfg.shuffle_buffer))
    stages.append(_Decode(cfg, train, ctx, video_only))
    if batch_size:
        stages.append(_Batches(cfg, batch_size, partial=not train))
    dataset = wds.DataPipeline(*stages)
    if train and epoch_samples:
        per_reader = cfg.per_reader(epoch_samples, world, num_workers)
        dataset = dataset.with_epoch(math.ceil(per_reader / batch_size) if batch_size else per_reader)
    return dataset


def make_loader(shard_urls: list[str], cfg: DataConfig, *, train: bool, seed: int = 0, epoch_samples: int | None = None,
                batch_size: int, num_workers: int = 0, clip_ids: Collection[str] | None = None,
                video_only: bool = False, **loader_kwargs) -> DataLoader:
    """A DataLoader of batches {"video": (B,3,T,S,S), "audio": (B,F,M), "clip_id": [str], "window": (B,2) s,
    "skipped": int, "skipped_clips": [str]}, batched inside the workers.

    Training drops a last partial batch; evaluation (train=False) yields every clip exactly once
    with a centred window and no augmentation. Extra keyword arguments go to the DataLoader
    (timeout, pin_memory, prefetch_factor, ...).
    """
    dataset = make_dataset(shard_urls, cfg, train=train, seed=seed, epoch_samples=epoch_samples, batch_size=batch_size,
                           num_workers=num_workers, clip_ids=clip_ids, video_only=video_only)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, generator=generator, **loader_kwargs)
