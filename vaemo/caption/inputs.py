"""What the captioning model watches and hears: sampled face frames and the voice of one stored clip."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from vaemo.data.loader import ShardLoss, ShardLosses, expected_samples
from vaemo.data.samples import SampleError, Window, audio_bytes, decode_audio, decode_video, read_meta

SAMPLE_RATE = 16000  # what the Omni audio encoder expects


@dataclass(frozen=True)
class ClipMedia:
    clip_id: str
    frames: np.ndarray  # uint8 (T, H, W, 3), evenly sampled over the whole clip
    frame_indices: tuple[int, ...]
    fps: float  # the sampled frames' rate, so the model's timestamps match the audio
    duration: float
    wave: np.ndarray  # float32 mono at SAMPLE_RATE, the whole clip

    def video_metadata(self) -> dict:
        """The metadata Qwen's video processor needs for frames that are already sampled."""
        return {
            "total_num_frames": len(self.frame_indices), "fps": self.fps, "duration": self.duration,
            "frames_indices": list(range(len(self.frame_indices))),
        }


def clip_media(sample: dict, frames: int) -> ClipMedia:
    """Decode one shard sample; a bad sample raises SampleError (the caller records it, nothing is filled in)."""
    clip_id, meta = read_meta(sample)
    if "mp4" not in sample:
        raise SampleError("missing mp4")
    video, fps, count, window = decode_video(sample["mp4"], lambda n, rate: _whole_clip(n, rate, frames))
    wave = decode_audio(audio_bytes(sample), SAMPLE_RATE)
    duration = count / fps
    margin = int(meta.get("crop_margin") or 0)  # ingest stores a margin for random crops; the model sees the face
    if margin and min(video.shape[1:3]) > 2 * margin:
        video = video[:, margin:-margin, margin:-margin]
    return ClipMedia(
        clip_id=clip_id, frames=np.ascontiguousarray(video), frame_indices=window.frame_indices,
        fps=frames / duration, duration=duration, wave=wave,
    )


def _whole_clip(count: int, fps: float, frames: int) -> Window:
    """``frames`` frames evenly over the whole clip (only these are converted to RGB: most of decoding's cost)."""
    picks = tuple(int(i) for i in np.linspace(0, count - 1, num=frames).round().astype(int))
    return Window(start_frame=0, frame_indices=picks, audio_start=0, audio_samples=round(count / fps * SAMPLE_RATE),
                  start=0.0, end=count / fps, looped=False)


@dataclass
class ShardRead:
    """What one read of a shard gave: the samples it read, and what its marker says it lost."""

    read: int = 0
    loss: ShardLoss | None = None


def shard_samples(shard: Path, wanted: set[str], losses: ShardLosses | None = None,
                  result: ShardRead | None = None) -> Iterator[tuple[str, dict]]:
    """The raw samples of the wanted clips in one tar shard, in shard order (members of a key are adjacent).

    A tar structure that breaks ends the read; once the shard is read, ``result`` and ``losses`` hold
    what it lost by its commit marker (the check the training loader makes, and its warning).
    """
    losses, result = losses if losses is not None else ShardLosses(), result if result is not None else ShardRead()
    current, sample, keys, error = None, {}, set(), None
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                keys.add(key)
                if key not in wanted:
                    continue
                if key != current:
                    if sample:
                        yield current, sample
                    current, sample = key, {"__key__": key}
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as exc:
        error = f"shard read error: {type(exc).__name__}: {exc}"
    if sample:  # a sample the break cut short still goes to the decoder, which rejects it
        yield current, sample
    result.read = len(keys)
    result.loss = losses.check(str(shard), len(keys), expected_samples([str(shard)]), error)
