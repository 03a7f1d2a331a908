"""The training view: an ingest folder's clips re-packed for reading at GPU rate.

Training decodes a 16-frame window at stride 4 from each clip; from the mp4 shards that means
decoding every H.264 frame up to the window's end and resampling nothing but still reading the
flac (``benchmarks/train_bench.py``: 14-18 clips/s per worker core). The view stores, per clip, only
the frames at the model's stride, each one a JPEG (decoded in batches later, by nvJPEG on a GPU),
and the whole clip's log-mel filterbank (float16), of which a window is a slice. The mp4
shards stay the source of truth; the view is derived from their committed shards and rebuilt from
them at will. Format choice: README, "Stage 1".

Layout (the ingest folder's shard/marker layout, so every shard reader's checks apply to it)::

    <ingest>/views/<settings key>/
        shards/<group>-NNN.tar   view shards (visible only once complete)
        batches/<group>.json     commit marker of one build task: the ingest shards (name, sha256) it
                                 covers and the view shards it wrote (name, samples, sha256)
        view.json                the digest of the last complete build (ingest digest + settings)
        .tmp/<group>/            work in progress; removed by every build
        .lock                    held by the one process that builds the view (others wait, then find it current)

A view sample holds ``json`` (clip id, the stored clip's frame count and rate, audio samples, the
stored frame index of each view frame, the byte length of each JPEG), ``jpg`` (the JPEGs one after
the other) and ``fbank`` (float16, fbank frames x mel bins, row-major). A window starts on a view
frame, i.e. on a stride step, which is a whole number of fbank shifts (16 x 10 ms by default), so
its fbank is the clip's rows from there: the window's own frames, except that its first and last
frames see the clip's neighbouring samples instead of Kaldi's reflection at the window's edge.
With ``snip_edges`` (the AudioMAE framing) the slice has all audio_frames real rows where the mp4
path repeats its last one or two. A clip that cannot give a window (bad media, durations that
differ) is kept as a sample with only ``skip.txt``, its reason, so every pass counts it like the mp4
path's skips.

Builds are incremental: ingest shards that no marker covers (with the same sha256) are grouped into
new tasks; a marker whose ingest shards changed or vanished is dropped with its view shards.
Nothing already built is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torchvision.io import encode_jpeg
from webdataset.tariterators import base_plus_ext

from vaemo import locks
from vaemo.artifacts import IngestFolder, file_sha256, shard_set_digest, write_json_atomic
from vaemo.data.config import DataConfig, ViewConfig
from vaemo.data.samples import (
    SampleError,
    Window,
    audio_bytes,
    check_durations,
    choose_window,
    conform_audio,
    decode_audio,
    decode_video,
    kaldi_fbank,
    read_meta,
)

log = logging.getLogger(__name__)

FORMAT = 2  # bumped when the sample layout changes: part of the digest
FBANK_FIELDS = ("mel_bins", "fbank_window_ms", "fbank_shift_ms", "fbank_window_type", "htk_compat", "dither",
                "snip_edges")


def view_settings(data: DataConfig, view: ViewConfig) -> dict:
    """What the view's bytes depend on (its layout, the stride, the audio rate): the digest's settings part."""
    return {"format": FORMAT, "frame_stride": data.frame_stride, "fps": data.fps, "sample_rate": data.sample_rate,
            "max_av_mismatch_s": data.max_av_mismatch_s, "jpeg_quality": view.jpeg_quality,
            "fbank": {name: getattr(data, name) for name in FBANK_FIELDS},
            "samples_per_shard": view.samples_per_shard, "max_shard_bytes": view.max_shard_bytes}


def _sha(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class TrainingView(IngestFolder):
    """A training view folder (layout in the module docstring); shard_urls(), markers() read as for ingest."""

    VIEWS, RECORD = "views", "view.json"

    def __init__(self, ingest: IngestFolder, data: DataConfig, view: ViewConfig):
        self.ingest, self.settings = ingest, view_settings(data, view)
        super().__init__(ingest.path / self.VIEWS / _sha(self.settings)[:16])

    def expected_digest(self) -> str:
        """The digest a complete view of the ingest folder's committed shards has."""
        return _sha({"ingest": self.ingest.digest(), "settings": self.settings})

    def built_digest(self) -> str | None:
        record = self.path / self.RECORD
        return json.loads(record.read_text())["digest"] if record.is_file() else None

    def _complete(self, marker: dict) -> bool:
        return all((self.shards_dir / s["name"]).is_file() for s in marker["shards"])

    def is_current(self) -> bool:
        """Built from the ingest folder's current shards with these settings, and no view shard missing."""
        return self.built_digest() == self.expected_digest() and all(map(self._complete, self.markers()))

    @contextmanager
    def building(self):
        """Be the view's only builder (planning removes what it finds unfinished): wait for another one to end."""
        try:
            handle = locks.acquire(self.path / self.LOCK)
        except locks.Busy as busy:
            log.info("training view %s is being built by %s; waiting for it", self.path, busy.holder)
            handle = locks.acquire(self.path / self.LOCK, wait=True)
        try:
            yield self
        finally:
            locks.release(handle)

    def sources(self) -> dict[str, str]:
        """The committed ingest shards, name -> sha256."""
        return {s["name"]: s["sha256"] for m in self.ingest.markers() for s in m["shards"]}

    def plan(self, shards_per_task: int) -> list[list[str]]:
        """Drop leftovers and stale groups; the ingest shard names still to re-pack, in tasks."""
        shutil.rmtree(self.path / self.TMP, ignore_errors=True)
        sources = self.sources()
        covered: set[str] = set()
        for marker in self.markers():
            if any(sources.get(name) != sha for name, sha in marker["sources"].items()) or not self._complete(marker):
                log.info("view group %s: its ingest shards changed or a view shard is missing; rebuilt",
                         marker["batch_id"])
                (self.path / self.BATCHES / f"{marker['batch_id']}.json").unlink()
            else:
                covered |= set(marker["sources"])
        listed = {s["name"] for m in self.markers() for s in m["shards"]}
        for orphan in self.shards_dir.glob("*.tar") if self.shards_dir.is_dir() else []:
            if orphan.name not in listed:  # an interrupted commit, or a dropped group's shard
                orphan.unlink()
        todo = sorted(set(sources) - covered)
        return [todo[i : i + shards_per_task] for i in range(0, len(todo), shards_per_task)]

    def finish(self) -> dict:
        """Record the digest once every committed ingest shard is covered; the view's summary."""
        markers = self.markers()
        covered = {name: sha for m in markers for name, sha in m["sources"].items()}
        if covered != self.sources():
            raise RuntimeError(f"view {self.path} does not cover the ingest shards yet: build its missing groups")
        digest = self.expected_digest()
        summary = {"digest": digest, "ingest_digest": self.ingest.digest(), "settings": self.settings,
                   "view_shard_set_digest": shard_set_digest(markers), "shards": sum(len(m["shards"]) for m in markers),
                   "clips": sum(s["samples"] for m in markers for s in m["shards"]),
                   "skipped": sum(m["skipped"] for m in markers), "bytes": sum(s["bytes"] for m in markers
                                                                               for s in m["shards"]),
                   "source_seconds": round(sum(m["source_seconds"] for m in markers), 3)}
        write_json_atomic(self.path / self.RECORD, summary, "view record")
        return summary


def _view_frames(n_frames: int, clip_fps: float, data: DataConfig) -> list[int]:
    """Stored frames at the model's stride from frame 0: the frames every window of the view is drawn from."""
    step = data.frame_stride * clip_fps / data.fps
    return [round(j * step) for j in range(max(1, int(n_frames / step)))]


def _view_sample(sample: dict, data: DataConfig, quality: int) -> dict:
    """One ingest sample as a view sample; bad bytes become a skip sample with the reason."""
    clip_id = str(sample.get("__key__") or "?")
    try:
        clip_id, meta = read_meta(sample)
        if meta.get("video_only"):
            raise SampleError(f"a video-only clip ({meta['video_only']}): it has no audio to use")
        if "mp4" not in sample:
            raise SampleError("missing mp4")
        audio = decode_audio(audio_bytes(sample), data.sample_rate)
        frames, clip_fps, n_frames, _ = decode_video(sample["mp4"])
        check_durations(n_frames, clip_fps, len(audio), data)
    except SampleError as exc:
        return {"__key__": clip_id, "skip.txt": str(exc).encode()}
    picked = _view_frames(n_frames, clip_fps, data)
    clip_fbank = kaldi_fbank(conform_audio(audio, len(picked), view_rate(data), data.sample_rate), data)
    jpegs = [encode_jpeg(torch.from_numpy(frames[i]).permute(2, 0, 1).contiguous(), quality=quality).numpy().tobytes()
             for i in picked]
    info = {"clip_id": clip_id, "n_frames": n_frames, "fps": clip_fps, "samples": len(audio), "frames": picked,
            "jpeg_bytes": [len(j) for j in jpegs], "fbank_frames": clip_fbank.shape[0]}
    fbank_bytes = clip_fbank.to(torch.float16).numpy().astype("<f2").tobytes()
    return {"__key__": clip_id, "json": json.dumps(info).encode(), "jpg": b"".join(jpegs), "fbank": fbank_bytes}


def fbank_rows_per_view_frame(data: DataConfig) -> int:
    """fbank frames per stride step; a ValueError when the step is not a whole number of fbank shifts."""
    rows = data.frame_stride / data.fps * 1000 / data.fbank_shift_ms
    if abs(rows - round(rows)) > 1e-6 or round(rows) < 1:
        raise ValueError(f"the training view needs a frame step ({data.frame_stride} / {data.fps} s) that is a whole "
                         f"number of fbank shifts ({data.fbank_shift_ms} ms); set view.enabled false for this data")
    return round(rows)


def build_group(view: TrainingView, sources: list[str], data: DataConfig, cfg: ViewConfig) -> dict:
    """Re-pack these ingest shards into view shards and commit them with their marker (one build task)."""
    fbank_rows_per_view_frame(data)
    begin = time.perf_counter()
    group = Path(sources[0]).stem
    tmp = view.path / view.TMP / group
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skipped, seconds = 0, 0.0
    with wds.ShardWriter(str(tmp / f"{group}-%03d.tar"), maxcount=cfg.samples_per_shard, maxsize=cfg.max_shard_bytes,
                         verbose=0) as writer:
        for url in (str(view.ingest.shards_dir / name) for name in sources):
            for sample in wds.tarfile_samples(iter([{"url": url}]), handler=wds.warn_and_continue):
                out = _view_sample(sample, data, cfg.jpeg_quality)
                if "skip.txt" in out:
                    skipped += 1
                else:
                    info = json.loads(out["json"])
                    seconds += info["n_frames"] / info["fps"]
                writer.write(out)
    view.shards_dir.mkdir(parents=True, exist_ok=True)
    written = sorted(tmp.glob("*.tar"))
    stats = []
    for path in written:
        with tarfile.open(path) as tar:
            samples = len({base_plus_ext(m.name)[0] for m in tar if m.isfile()} - {None})
        stats.append({"name": path.name, "samples": samples, "sha256": file_sha256(path), "bytes": path.stat().st_size})
        path.replace(view.shards_dir / path.name)
    sha = view.sources()
    marker = {"batch_id": group, "committed_at": time.time(), "sources": {name: sha[name] for name in sources},
              "shards": stats, "skipped": skipped, "source_seconds": seconds,
              "seconds": round(time.perf_counter() - begin, 3)}
    (view.path / view.BATCHES).mkdir(parents=True, exist_ok=True)
    write_json_atomic(view.path / view.BATCHES / f"{group}.json", marker, "view marker")  # the commit
    shutil.rmtree(tmp, ignore_errors=True)
    return marker


def build(ingest: IngestFolder, data: DataConfig, cfg: ViewConfig) -> dict:
    """Build (or complete) the view in this process; its summary. The pretrain flow runs the groups as tasks."""
    with TrainingView(ingest, data, cfg).building() as view:
        if not view.is_current():
            for sources in view.plan(cfg.ingest_shards_per_task):
                build_group(view, sources, data, cfg)
        return view.finish()


# Reading: the raw window of one view sample (bytes only, no decoding).

def view_rate(data: DataConfig) -> float:
    """View frames per second of the clip: one per stride, whatever the stored clip's rate."""
    return data.fps / data.frame_stride


def view_data(data: DataConfig) -> DataConfig:
    """The window rules in view frames: consecutive frames (stride 1) at the view's rate, the same seconds."""
    return data.model_copy(update={"frame_stride": 1, "fps": view_rate(data)})


def _parts(sample: dict, data: DataConfig) -> tuple[np.ndarray, bytes, np.ndarray]:
    """A view sample's JPEG sizes, JPEG bytes and clip fbank (rows, mel_bins), checked; SampleError if unusable."""
    clip_id = str(sample.get("__key__") or "?")
    if "skip.txt" in sample:
        raise SampleError(sample["skip.txt"].decode(errors="replace"))
    try:
        info = json.loads(sample["json"])
        lengths = np.asarray(info["jpeg_bytes"], dtype=np.int64)
        feats = np.frombuffer(sample["fbank"], dtype="<f2").reshape(info["fbank_frames"], data.mel_bins)
        if int(lengths.sum()) != len(sample["jpg"]) or not len(lengths) or not len(feats):
            raise ValueError("member sizes do not match the json")
    except (KeyError, ValueError, TypeError) as exc:
        raise SampleError(f"view sample {clip_id}: {type(exc).__name__}: {exc}") from exc
    return lengths, sample["jpg"], feats


def raw_window(sample: dict, data: DataConfig, rng: np.random.Generator | None) -> dict:
    """{"jpeg": [T encoded frames], "fbank": (F, M) not normalised, "clip_id", "window"} of one view sample.

    The window follows :func:`~vaemo.data.samples.choose_window` on the view's frames (its start falls
    on a stored frame of the stride), and looping repeats the view frames and the fbank rows with the
    same period. A skip sample, or unreadable bytes, raise SampleError.
    """
    lengths, blob, feats = _parts(sample, data)
    window = choose_window(len(lengths), view_rate(data), view_data(data), rng)
    first = window.start_frame * fbank_rows_per_view_frame(data)
    rows = (first + np.arange(data.audio_frames)) % len(feats)
    whole, ends = torch.frombuffer(bytearray(blob), dtype=torch.uint8), np.cumsum(lengths).tolist()
    jpeg = [whole[ends[i] - int(lengths[i]) : ends[i]] for i in window.frame_indices]
    return {"jpeg": jpeg, "fbank": torch.from_numpy(feats[rows].astype(np.float32)), "clip_id": sample["__key__"],
            "window": window}


def draw_window(sample: dict, data: DataConfig, rng: np.random.Generator | None) -> Window:
    """The window :func:`raw_window` draws for this sample, without copying its bytes (resume's skip)."""
    return choose_window(len(_parts(sample, data)[0]), view_rate(data), view_data(data), rng)

