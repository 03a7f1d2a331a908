"""WebDataset pipelines over ingest shards: windows for training, every clip once for evaluation.

Pipeline, built in one place (:func:`make_dataset`)::

    shard list -> split by rank -> split by DataLoader worker -> tar samples -> shuffle buffer (train)
    -> decode (load_sample, in the worker, from the sample's bytes) -> batches (in the worker)

Training view shards (``view=True``, :mod:`vaemo.data.view`) go through the same stages, with the
decode stage replaced: the worker cuts raw windows (encoded frames, fbank rows, a seed per clip),
batches them (:func:`collate_raw`) and, unless the caller asks for raw batches to decode on its
device, decodes and augments them there.

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
stage emits a :class:`Skipped` record in place of each bad sample, and the batching stage, which
runs in the same worker, folds the records into the next batch it emits: ``batch["skipped"]`` (int)
and ``batch["skipped_clips"]`` (ids). The batcher holds one finished batch back, so records met
after the last full batch of a stream are added to that batch rather than lost (in a fixed-length
epoch, records past the cut belong to no epoch, and the held-back batch costs one extra decoded
batch per worker per epoch). Summing ``batch["skipped"]`` over an epoch gives the total; only a
worker that found no good clip at all emits a batch with zero clips, to carry its count, so a loop
should skip batches whose ``clip_id`` is empty after adding their count. Each skip is also logged
at WARNING by the worker.

Broken shards. A tar stream whose structure breaks mid-file (a damaged member header) simply ends,
without an error, and a truncated one raises; either way the samples after the break never reach
the decoder. So shards are read one at a time and the samples each gave are compared with what its
commit marker says it holds (:func:`shard_loss`, the one check every reader of shards makes,
captioning's included). A shortfall travels like a skip, as a :class:`ShardLoss` in
``batch["shard_losses"]``; :func:`make_loader`'s DataLoader folds them, in the main process, into a
:class:`ShardLosses`, which warns once per shard and counts each shard's loss once however often
it is read (epochs, resampled shards, workers; :meth:`ShardLosses.gather` merges the ranks'). A
shard without a marker (made by other tools) that fails to read counts as one skipped record, by
its url, once per pass.

Small corpora. In training a reader drops its last partial batch, except when it has no full batch
in a pass: it then trains on the partial batch (or, with no good clip, emits an empty batch carrying
its counts), so every pass yields a batch and no epoch, fixed-length or not, waits forever for one.
Training warns once per process when the shards hold fewer clips than one batch per reader.

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
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch import distributed as dist
from torch.utils.data import DataLoader
from webdataset.tariterators import base_plus_ext
from webdataset.utils import pytorch_worker_info

from vaemo.artifacts import IngestFolder
from vaemo.data.config import DataConfig
from vaemo.data.samples import SampleError, load_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A sample (or an unreadable shard) that was left out, and why."""

    clip_id: str
    reason: str


@dataclass(frozen=True)
class ShardLoss:
    """Samples a shard holds by its commit marker that a reader did not get: its tar stream broke first."""

    shard: str  # the shard's url
    expected: int
    read: int
    reason: str

    @property
    def lost(self) -> int:
        return self.expected - self.read


Record = Skipped | ShardLoss  # what the decoder passes on in place of samples

def expected_samples(urls: Iterable[str]) -> dict[str, int]:
    """url -> samples the shard holds, by the commit markers of the ingest folders the shards lie in.

    Shards without a marker (made by other tools, or not on a local disk) are left out.
    """
    urls = [str(u) for u in urls if Path(u).parent.name == IngestFolder.SHARDS]
    folders = {IngestFolder.holding(url).path for url in urls}
    held = {folder: IngestFolder(folder).shard_samples() for folder in folders}
    counts = {url: held[IngestFolder.holding(url).path].get(Path(url).name) for url in urls}
    return {url: n for url, n in counts.items() if n is not None}


def shard_loss(url: str, read: int, expected: Mapping[str, int], error: str | None = None) -> ShardLoss | None:
    """What one complete read of a shard lost: its marker's count minus the samples read (None when nothing).

    ``error``: why the read stopped, when the tar reader raised; a stream that just ends early had a
    broken member header.
    """
    if url not in expected or read >= expected[url]:
        return None
    return ShardLoss(url, expected[url], read, error or "the tar stream ends early (a broken member header)")


@dataclass
class ShardLosses:
    """The samples broken shards lost, in the main process: each shard warned about once and counted once."""

    by_shard: dict[str, ShardLoss] = field(default_factory=dict)

    def _keep(self, loss: ShardLoss) -> bool:
        """Keep the largest loss met for the shard; True when the shard is new here."""
        known = self.by_shard.get(loss.shard)
        if known is None or loss.lost > known.lost:
            self.by_shard[loss.shard] = loss
        return known is None

    def add(self, losses: Iterable[ShardLoss]) -> None:
        for loss in losses:
            if self._keep(loss):
                log.warning("shard %s lost %d of its %d samples (%d read): %s", loss.shard, loss.lost, loss.expected,
                            loss.read, loss.reason)

    def check(self, url: str, read: int, expected: Mapping[str, int], error: str | None = None) -> ShardLoss | None:
        """:func:`shard_loss` for a reader in this process (captioning), recorded here."""
        loss = shard_loss(url, read, expected, error)
        self.add([loss] if loss else [])
        return loss

    def gather(self) -> None:
        """Merge every rank's losses into each rank's (a collective call under torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, list(self.by_shard.values()))
            for part in parts:
                for loss in part:
                    self._keep(loss)  # the rank that read the shard has warned about it

    @property
    def total(self) -> int:
        return sum(loss.lost for loss in self.by_shard.values())

    def summary(self) -> dict:
        """What a stage reports: ``lost_samples`` (all shards) and ``lost_by_shard`` (shard file name -> lost)."""
        return {"lost_samples": self.total,
                "lost_by_shard": {Path(url).name: loss.lost for url, loss in sorted(self.by_shard.items())}}


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

    def __init__(self, seed: int, expected: dict[str, int]):
        self.seed = seed
        self.expected = expected
        self.passes = 0
        self.shared: list[int] = [seed]  # the same on every rank and worker within a pass
        self.local: list[int] = [seed]  # distinct per rank and worker
        self.errors: list[Record] = []
        self.bad_shards: set[str] = set()
        self.read_errors: list[Exception] = []

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
        """webdataset handler: note the error (the shard being read is judged when it ends) and carry on."""
        self.read_errors.append(exn)
        return True

    def shard_read(self, url: str, read: int) -> None:
        """One shard read to its end: record what it lost (once per pass, for the next batch to carry)."""
        errors, self.read_errors = self.read_errors, []
        reason = None
        if errors:
            exn = errors[0]
            detail = re.sub(r" @ <.*", "", str(exn.args[0])) if exn.args else str(exn)  # webdataset appends the stream
            reason = f"shard read error: {type(exn).__name__}: {detail}"
        if url in self.bad_shards:
            return
        loss = shard_loss(url, read, self.expected, reason)
        if loss is None and reason and url not in self.expected:  # no marker to count by: the shard counts once
            log.warning("skipped %s: %s", url, reason)
            loss = Skipped(url, reason)
        if loss is not None:
            self.bad_shards.add(url)
            self.errors.append(loss)

    def drain(self) -> list[Record]:
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
class _TarSamples:
    """Tar samples, one shard at a time, so each complete read of a shard is checked against its marker."""

    ctx: _Context

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for shard in src:
            read = 0
            for sample in wds.tarfile_samples(iter([shard]), handler=self.ctx.tar_error):
                read += 1
                yield sample
            self.ctx.shard_read(shard["url"], read)


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


def _lazy_batches(skip_batches: int) -> int:
    """Of the first ``skip_batches`` batches of a DataLoader's stream, how many this worker made.

    The DataLoader takes batches from its workers in turn; a worker that ends early only makes the
    others' share larger, so this worker's first ceil((N - w) / W) batches are always among them.
    """
    _rank, _world, worker, workers = pytorch_worker_info()
    return max(0, math.ceil((skip_batches - worker) / max(workers, 1)))


@dataclass
class _ViewDecode:
    """View samples to raw windows (bytes and the window's fbank, see :func:`~vaemo.data.view.raw_window`).

    ``skip_batches``: batches the caller discards unread (a resumed run's position): their samples only
    make the rng draws they would make, and become items without bytes.
    """

    cfg: DataConfig
    train: bool
    ctx: _Context
    batch_size: int
    skip_batches: int = 0

    def __call__(self, src: Iterator[dict]) -> Iterator[dict | Record]:
        from vaemo.data.view import draw_window, raw_window

        rng = self.ctx.rng(2)
        lazy = _lazy_batches(self.skip_batches) * self.batch_size
        for sample in src:
            yield from self.ctx.drain()
            clip_id = str(sample.get("__key__") or sample.get("__url__") or "?")
            try:
                if lazy > 0:
                    item = {"clip_id": clip_id, "window": draw_window(sample, self.cfg, rng if self.train else None),
                            "jpeg": None}
                    lazy -= 1
                else:
                    item = raw_window(sample, self.cfg, rng if self.train else None)
                item["seed"] = int(rng.integers(2**63)) if self.train else 0
                yield item
            except SampleError as exc:
                log.warning("skipped %s: %s", clip_id, exc)
                yield Skipped(clip_id, str(exc))
        yield from self.ctx.drain()


def collate_raw(samples: list[dict], records: list[Record], cfg: DataConfig) -> dict:
    """Raw view batch: "jpeg" (B lists of T encoded frames), "fbank" (B,F,M) not normalised, "seed" (B,), and
    the clip ids, windows and records as :func:`collate` gives them. Items without bytes (skipped on resume)
    give a batch with "jpeg" None."""
    lazy = any(s["jpeg"] is None for s in samples)
    return {
        "jpeg": None if lazy else FrameLists(s["jpeg"] for s in samples),
        "fbank": None if lazy else torch.stack([s["fbank"] for s in samples]) if samples else
        torch.empty(0, cfg.audio_frames, cfg.mel_bins),
        "seed": torch.tensor([s["seed"] for s in samples], dtype=torch.int64),
        **_common(samples, records),
    }


class FrameLists(list):
    """A batch's encoded frames, a list (clips) of lists (frames) of 1-D uint8 tensors, all views of one buffer.

    It pickles as that one tensor and the frame sizes: a DataLoader worker hands a tensor over through
    shared memory at a cost of its own, which for 16 frames x B clips was more than everything else a
    view worker does.
    """

    @classmethod
    def of(cls, flat: torch.Tensor, sizes: list[list[int]]) -> FrameLists:
        frames = iter(flat.split([n for clip in sizes for n in clip]))
        return cls([next(frames) for _ in clip] for clip in sizes)

    def __reduce__(self):
        sizes = [[len(frame) for frame in clip] for clip in self]
        frames = [frame for clip in self for frame in clip]
        flat = torch.cat(frames) if frames else torch.empty(0, dtype=torch.uint8)
        return FrameLists.of, (flat, sizes)


@dataclass
class _Materialise:
    """Raw view batches to model batches inside the worker (CPU training: decoding stays parallel)."""

    cfg: DataConfig
    train: bool

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        from vaemo.data.augment import materialise

        cpu, repeat = torch.device("cpu"), self.cfg.repeat_aug if self.train else 1
        for raw in src:
            yield raw if raw["jpeg"] is None else materialise(raw, self.cfg, device=cpu, train=self.train,
                                                              repeat_aug=repeat)


@dataclass
class _Decode:
    """Bytes to tensors, in the worker. Bad samples become Skipped records; bugs propagate."""

    cfg: DataConfig
    train: bool
    ctx: _Context
    video_only: bool = False

    def __call__(self, src: Iterator[dict]) -> Iterator[dict | Record]:
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


def collate(samples: list[dict], records: list[Record], cfg: DataConfig) -> dict:
    """Stack decoded samples; ``records`` are the skips and shard losses this batch reports."""
    if samples:
        video = torch.stack([s["video"] for s in samples])
        audio = torch.stack([s["audio"] for s in samples])
    else:
        video = torch.empty(0, 3, cfg.frames, cfg.image_size, cfg.image_size)
        audio = torch.empty(0, cfg.audio_frames, cfg.mel_bins)
    return {"video": video, "audio": audio, **_common(samples, records)}


def _common(samples: list[dict], records: list[Record]) -> dict:
    """The keys every batch has: clip ids, windows (B,2) in seconds, and the records it reports."""
    return {
        "clip_id": [s["clip_id"] for s in samples],
        "window": torch.tensor([[s["window"].start, s["window"].end] for s in samples], dtype=torch.float64).reshape(
            -1, 2
        ),
        **_records({"skipped": 0, "skipped_clips": [], "shard_losses": []}, records),
    }


def _records(batch: dict, records: list[Record]) -> dict:
    skipped = [r.clip_id for r in records if isinstance(r, Skipped)]
    batch["skipped"] += len(skipped)
    batch["skipped_clips"] = batch["skipped_clips"] + skipped
    batch["shard_losses"] = batch["shard_losses"] + [r for r in records if isinstance(r, ShardLoss)]
    return batch


@dataclass
class _Batches:
    """Batches made in the worker, carrying the records (skips, shard losses) met since the previous batch.

    ``partial``: keep the last partial batch (evaluation). Training keeps it only when the pass made no
    full batch, and then emits a batch even without clips: a pass always yields one.
    """

    cfg: DataConfig
    size: int
    partial: bool
    collate: Callable[[list[dict], list[Record], DataConfig], dict] = collate

    def __call__(self, src: Iterator[dict | Record]) -> Iterator[dict]:
        collate = self.collate
        held, samples, records = None, [], []
        for item in src:
            if isinstance(item, (Skipped, ShardLoss)):
                records.append(item)
                continue
            samples.append(item)
            if len(samples) == self.size:
                batch, samples, records = collate(samples, records, self.cfg), [], []
                if held is not None:
                    yield held
                held = batch
        if samples and (self.partial or held is None):
            batch, records = collate(samples, records, self.cfg), []
            if held is not None:
                yield held
            held = batch
        if records or (held is None and not self.partial):
            held = _records(held, records) if held is not None else collate([], records, self.cfg)
        if held is not None:
            yield held


def make_dataset(shard_urls: list[str], cfg: DataConfig, *, train: bool, seed: int = 0,
                 epoch_samples: int | None = None, batch_size: int | None = None, num_workers: int = 0,
                 clip_ids: Collection[str] | None = None, video_only: bool = False, view: bool = False,
                 raw: bool = False, skip_batches: int = 0) -> wds.DataPipeline:
    """A webdataset pipeline of decoded windows (batch_size=None) or of batches.

    Without batch_size the items are sample dicts ({"video", "audio", "clip_id", "window"}),
    :class:`Skipped` records in place of bad samples and :class:`ShardLoss` records. ``num_workers``
    is the DataLoader's, used to see whether every reader gets a shard. ``epoch_samples``: clips per
    epoch over all ranks and workers (training only); by default the natural pass over the shards,
    or, when the epoch must be fixed (resampled shards, DDP), the number of samples in the shards.
    ``clip_ids``: only these clips (e.g. one fold's training part); the others are passed over
    before decoding, and a fixed epoch then counts only these. ``video_only``: frames only, see
    :func:`~vaemo.data.samples.load_sample`.

    ``view``: the urls are training view shards (:mod:`vaemo.data.view`); batches are decoded in the
    worker on the CPU, or, with ``raw``, left raw (:func:`collate_raw`) for the caller to decode on its
    device. ``skip_batches`` (view only): the first batches of the stream, which the caller discards,
    are made without reading their bytes.
    """
    if (raw or skip_batches) and not (view and batch_size):
        raise ValueError("raw batches and skip_batches need view=True and a batch_size")
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
    expected = expected_samples(urls)
    clips = len(clip_ids) if clip_ids is not None else sum(expected.values()) if len(expected) == len(urls) else None
    if train and epoch_samples is None and (resample or world > 1):
        epoch_samples = clips if clips is not None else count_samples(urls)
    if train and batch_size and clips is not None and clips < readers * batch_size:
        _warn_once(
            f"{clips} clip(s) for {readers} reader(s) ({world} rank(s) x {max(num_workers, 1)} worker(s)) with "
            f"batch_size {batch_size}: fewer than one batch per reader; "
            + ("resampled shards fill each batch by drawing clips again, so batches repeat clips" if resample else
               "a reader short of a full batch trains on a partial batch of the clips it holds, once per epoch")
        )

    ctx = _Context(seed, expected)
    stages: list = [_Shards(urls, ctx, train, resample)]
    if not resample:  # resampled readers each draw from the whole list
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(_TarSamples(ctx))
    if clip_ids is not None:
        stages.append(_Select(frozenset(clip_ids)))
    if train and cfg.shuffle_buffer > 1:
        stages.append(_Shuffle(ctx, cfg.shuffle_buffer))
    if view:
        stages += [_ViewDecode(cfg, train, ctx, batch_size or 1, skip_batches),
                   _Batches(cfg, batch_size, partial=not train, collate=collate_raw)]
        if not raw:
            stages.append(_Materialise(cfg, train))
    else:
        stages.append(_Decode(cfg, train, ctx, video_only))
        if batch_size:
            stages.append(_Batches(cfg, batch_size, partial=not train))
    dataset = wds.DataPipeline(*stages)
    if train and epoch_samples:
        per_reader = cfg.per_reader(epoch_samples, world, num_workers)
        dataset = dataset.with_epoch(math.ceil(per_reader / batch_size) if batch_size else per_reader)
    return dataset


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A training stage makes one loader per epoch: say a setting's consequence once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


class ShardLoader(DataLoader):
    """A DataLoader whose batches' shard losses are folded into ``losses`` as the batches arrive."""

    def __init__(self, dataset, *, losses: ShardLosses, **kwargs):
        super().__init__(dataset, **kwargs)
        self.losses = losses

    def __iter__(self) -> Iterator[dict]:
        for batch in super().__iter__():
            self.losses.add(batch["shard_losses"])
            yield batch


def make_loader(shard_urls: list[str], cfg: DataConfig, *, train: bool, seed: int = 0, epoch_samples: int | None = None,
                batch_size: int, num_workers: int = 0, clip_ids: Collection[str] | None = None,
                losses: ShardLosses | None = None, video_only: bool = False, view: bool = False, raw: bool = False,
                skip_batches: int = 0, **loader_kwargs) -> ShardLoader:
    """A DataLoader of batches {"video": (B,3,T,S,S), "audio": (B,F,M), "clip_id": [str], "window": (B,2) s,
    "skipped": int, "skipped_clips": [str], "shard_losses": [ShardLoss]}, batched inside the workers.

    Training drops a last partial batch (unless a reader has no full one); evaluation (train=False)
    yields every clip exactly once with a centred window and no augmentation. ``losses``: where the
    shard losses go (pass one to every loader of a run to count and warn about each shard once).
    ``view``, ``raw``, ``skip_batches``: see :func:`make_dataset`.
    Extra keyword arguments go to the DataLoader (timeout, pin_memory, prefetch_factor, ...).
    """
    dataset = make_dataset(shard_urls, cfg, train=train, seed=seed, epoch_samples=epoch_samples, batch_size=batch_size,
                           num_workers=num_workers, clip_ids=clip_ids, video_only=video_only, view=view, raw=raw,
                           skip_batches=skip_batches)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return ShardLoader(dataset, losses=losses if losses is not None else ShardLosses(), batch_size=None,
                       num_workers=num_workers, generator=generator, **loader_kwargs)
