"""One shard sample (mp4 + flac + json bytes) to one training window: face frames and the voice of the same span.

Everything random about a sample (window start, crop, flip, spectrogram masks) is drawn inside
:func:`load_sample` from the one generator it is given, after both modalities of that sample are in
hand. There is no retry path that could redraw one modality and keep the other (HiCMAE's loader
paired a new video with the old clip's audio this way): a sample either decodes completely or
raises :class:`SampleError`, and the caller skips and counts it. Nothing is ever zero-filled.

Decoder choice: PyAV (bundled FFmpeg 8), reading the bytes from a BytesIO. torchcodec 0.17
decodes a window in about two thirds of the time but takes seconds to load in each fresh worker
process and gains about 12 % per loader clip (``benchmarks/decode_bench.py``, README).
Measured on a 4.28 s, 192x192, 107-frame ingest clip on the 2-core development CPU: decoding
every frame and converting each to RGB took 109-261 ms; decoding only up to the last frame the
window needs and converting just its 16 frames took 35-57 ms (default threading;
thread_type="AUTO" saved little and would oversubscribe DataLoader workers). The flac track
decodes in about 5 ms.

Clips shorter than the window are looped: frame i of the clip repeats as frame i + n, and the
audio repeats with the same period (n / fps seconds, conformed to exactly that many samples), so
both modalities stay aligned through the repeat. No frame or sample is padded with zeros.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from torchaudio.compliance import kaldi

from vaemo.data.config import DataConfig
from vaemo.errors import MediaError

AUDIO_KEYS = ("flac", "wav")


class SampleError(MediaError):
    """The sample's bytes cannot give a window (undecodable media, bad json, mismatched parts)."""

    def __init__(self, reason: str):
        super().__init__("bad_sample", reason)


@dataclass(frozen=True)
class Window:
    """The span one sample shows, in the stored clip's own frames and samples."""

    start_frame: int  # first stored frame of the window
    frame_indices: tuple[int, ...]  # stored frames that are shown, already wrapped for looped clips
    audio_start: int  # first audio sample (before wrapping)
    audio_samples: int  # samples in the window: exactly window_seconds x sample_rate
    start: float  # seconds from the clip's start; the audio starts at the same instant
    end: float  # start + window_seconds; past the clip's end only when looped
    looped: bool  # the clip is shorter than the window and repeats


@contextmanager
def _bad(part: str):
    """Errors raised while reading a sample's bytes mean a bad sample, not a bug: re-raise as SampleError."""
    try:
        yield
    except SampleError:
        raise
    except Exception as exc:  # PyAV raises FFmpegError subclasses, IndexError for a missing stream, ...
        raise SampleError(f"{part}: {type(exc).__name__}: {exc}") from exc


def read_meta(sample: dict) -> tuple[str, dict]:
    """The clip id and its metadata; the json's clip_id must name the sample it came with."""
    clip_id = sample.get("__key__")
    if not clip_id:
        raise SampleError("sample without __key__")
    if "json" not in sample:
        raise SampleError("missing json")
    with _bad("json"):
        meta = json.loads(sample["json"])
    if not isinstance(meta, dict):
        raise SampleError(f"json: expected an object, got {type(meta).__name__}")
    if meta.get("clip_id", clip_id) != clip_id:
        raise SampleError(f"json clip_id {meta.get('clip_id')!r} does not match the sample key {clip_id!r}")
    return clip_id, meta


def audio_bytes(sample: dict) -> bytes:
    for key in AUDIO_KEYS:
        if key in sample:
            return sample[key]
    raise SampleError(f"missing audio (none of {', '.join(AUDIO_KEYS)})")


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """flac/wav bytes to float32 mono at sample_rate (downmixed and resampled by FFmpeg if needed)."""
    with _bad("audio"):
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            chunks = []
            if stream.rate == sample_rate and stream.channels == 1 and stream.format.name == "s16":
                # What ingest writes: plain int16 mono, converted here (4x faster than the resampler).
                for frame in container.decode(stream):
                    chunks.append(frame.to_ndarray().reshape(-1).astype(np.float32) / 32768.0)
            else:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                for frame in container.decode(stream):
                    chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise SampleError("audio: no samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def decode_video(data: bytes, pick=None) -> tuple[np.ndarray, float, int, Window | None]:
    """mp4 bytes to uint8 RGB frames (T, H, W, 3), the frame rate and the clip's frame count.

    ``pick(n_frames, fps) -> Window`` chooses the frames once the count is known (from the stream
    header, so decoding can stop at the last frame needed); without it every frame is returned.
    """
    with _bad("mp4"):
        container = av.open(io.BytesIO(data))
    try:
        with _bad("mp4"):
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            count = int(stream.frames or 0)
            decoded = container.decode(stream)
            if count <= 0:  # no count in the header: hold every (small, still YUV) frame
                held = list(decoded)
                count, decoded = len(held), iter(held)
        if fps <= 0 or count == 0:
            raise SampleError(f"mp4: {count} frames at {fps} fps")
        window = pick(count, fps) if pick else None  # outside _bad: a bug here must not pass for bad data
        wanted = list(window.frame_indices) if window else list(range(count))
        needed, last, got, seen = set(wanted), max(wanted), {}, 0
        with _bad("mp4"):
            for index, frame in enumerate(decoded):
                seen = index + 1
                if index in needed:
                    got[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    finally:
        container.close()
    if len(got) < len(needed):
        raise SampleError(f"mp4: only {seen} frames decode, the header says {count}")
    return np.stack([got[i] for i in wanted]), fps, count, window


def choose_window(n_frames: int, clip_fps: float, cfg: DataConfig, rng: np.random.Generator | None) -> Window:
    """A window of cfg.frames frames, cfg.frame_stride apart: random start with rng, centred without.

    The centred window starts on a stride step (frames 0, step, 2 step, ...: the frames the training
    view stores), the one nearest the centre, so evaluation's window is one the view trains on and
    both paths cut the same frames. A clip shorter than the window loops; with rng its start is drawn anywhere
    in the clip, without rng it starts at frame 0.
    """
    step = cfg.frame_stride * clip_fps / cfg.fps  # stored frames per sampled frame
    offsets = [round(i * step) for i in range(cfg.frames)]
    span = round(cfg.frames * step)
    looped = n_frames < span
    if looped:
        start = int(rng.integers(0, n_frames)) if rng is not None else 0
    else:
        start = int(rng.integers(0, n_frames - span + 1)) if rng is not None else _centred_start(n_frames, step, cfg)
    begin = start / clip_fps
    return Window(
        start_frame=start,
        frame_indices=tuple((start + o) % n_frames for o in offsets),
        audio_start=round(begin * cfg.sample_rate),
        audio_samples=cfg.window_samples,
        start=begin,
        end=begin + cfg.window_seconds,
        looped=looped,
    )


def _centred_start(n_frames: int, step: float, cfg: DataConfig) -> int:
    """The stride step nearest the centre, counted in the clip's whole steps, as the view stores them."""
    steps = int(n_frames / step)
    k = max(0, math.floor((steps - cfg.frames) / 2 + 0.5))
    return min(round(k * step), n_frames - round(cfg.frames * step))


def conform_audio(audio: np.ndarray, n_frames: int, clip_fps: float, sample_rate: int) -> np.ndarray:
    """The audio cut or repeated to exactly the video's duration: the period a looped clip repeats with."""
    period = round(n_frames * sample_rate / clip_fps)
    return audio if len(audio) == period else audio[np.arange(period) % len(audio)]  # a rounding difference


def window_waveform(audio: np.ndarray, window: Window, n_frames: int, clip_fps: float, sample_rate: int) -> np.ndarray:
    """The window's audio: the same instants as its frames, looping with the video's period."""
    audio = conform_audio(audio, n_frames, clip_fps, sample_rate)
    return audio[(window.audio_start + np.arange(window.audio_samples)) % len(audio)]


def check_durations(n_frames: int, clip_fps: float, n_samples: int, cfg: DataConfig) -> None:
    video_s, audio_s = n_frames / clip_fps, n_samples / cfg.sample_rate
    if abs(video_s - audio_s) > cfg.max_av_mismatch_s:
        raise SampleError(f"audio lasts {audio_s:.3f} s but video {video_s:.3f} s")


def fbank(waveform: np.ndarray | torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Kaldi log-mel filterbank (frames, mel_bins), fitted to cfg.audio_frames, not normalised.

    With snip_edges=False the window's samples give exactly audio_frames frames. Otherwise any
    shortfall (254 of 256 with the AudioMAE framing) repeats the last frame, and a surplus is cut.
    """
    feats = kaldi_fbank(waveform, cfg)
    short = cfg.audio_frames - feats.shape[0]
    if short > 0:
        feats = torch.cat([feats, feats[-1:].expand(short, -1)])
    return feats[: cfg.audio_frames]


def kaldi_fbank(waveform: np.ndarray | torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """The log-mel filterbank of any length of audio, with cfg's framing (not fitted, not normalised)."""
    wave = torch.as_tensor(waveform, dtype=torch.float32).reshape(1, -1)
    return kaldi.fbank(
        wave,
        htk_compat=cfg.htk_compat,
        sample_frequency=cfg.sample_rate,
        use_energy=False,
        window_type=cfg.fbank_window_type,
        num_mel_bins=cfg.mel_bins,
        dither=cfg.dither,
        frame_length=cfg.fbank_window_ms,
        frame_shift=cfg.fbank_shift_ms,
        snip_edges=cfg.snip_edges,
    )


def normalise_fbank(feats: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(x - mean) / std, or / (2 x std) when cfg.audio_double_std (the model's convention)."""
    return (feats - cfg.audio_mean) / cfg.audio_norm_divisor


MaskBands = tuple[tuple[int, int], tuple[int, int]]  # (first, width) of the frequency band, then of the time band


def draw_masks(frames: int, bins: int, cfg: DataConfig, rng: np.random.Generator) -> MaskBands:
    """One frequency and one time band (SpecAugment), widths uniform in [0, max]; width 0 when a mask is off."""
    bands = []
    for size, widest in ((bins, cfg.freq_mask), (frames, cfg.time_mask)):
        if widest:
            width = int(rng.integers(0, min(widest, size) + 1))
            bands.append((int(rng.integers(0, size - width + 1)), width))
        else:
            bands.append((0, 0))
    return bands[0], bands[1]


def spec_mask(feats: torch.Tensor, cfg: DataConfig, rng: np.random.Generator) -> torch.Tensor:
    """The masks of :func:`draw_masks`, in place.

    Applied after normalisation with value 0, i.e. the dataset's mean level: the masked band reads
    as "average", not as silence.
    """
    (freq_first, freq_width), (time_first, time_width) = draw_masks(*feats.shape, cfg, rng)
    feats[:, freq_first : freq_first + freq_width] = 0.0
    feats[time_first : time_first + time_width, :] = 0.0
    return feats


def _crop_box(height: int, width: int, cfg: DataConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random resized crop (top, left, h, w): area fraction from crop_scale, log-uniform aspect from crop_ratio."""
    area = height * width
    low, high = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_scale)
        ratio = math.exp(rng.uniform(low, high))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)  # no fit in ten tries: the largest centred square
    return (height - side) // 2, (width - side) // 2, side, side


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


@dataclass(frozen=True)
class VideoAug:
    """One clip's crop and flip, the same for all its frames: a random box (top, left, h, w), or None for
    the centre crop."""

    box: tuple[int, int, int, int] | None
    flip: bool


def draw_video_aug(height: int, width: int, cfg: DataConfig, rng: np.random.Generator | None) -> VideoAug:
    """The crop box, then the flip, from rng (in that order); without rng the centre crop and no flip."""
    if rng is None:
        return VideoAug(None, False)
    box = _crop_box(height, width, cfg, rng) if cfg.crop_scale is not None else None
    return VideoAug(box, cfg.flip_p > 0 and rng.random() < cfg.flip_p)


def crop_frames(x: torch.Tensor, aug: VideoAug, size: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) on any device to float32 (T, 3, size, size), cropped, resized and flipped by ``aug``.

    The centre crop resizes the short side up to size first when it is smaller.
    """
    height, width = x.shape[-2:]
    if aug.box is not None:
        top, left, h, w = aug.box
        x = _resize(x[..., top : top + h, left : left + w].float(), size, size)
    else:
        if min(height, width) < size:
            scale = size / min(height, width)
            x = _resize(x.float(), max(size, round(height * scale)), max(size, round(width * scale)))
            height, width = x.shape[-2:]
        top, left = (height - size) // 2, (width - size) // 2
        x = x[..., top : top + size, left : left + size].float()  # crop before converting
    return x.flip(-1) if aug.flip else x


def normalise_video(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Float pixel values (..., 3, T', S, S) with 0-255 range, channels at dim -4, to cfg's mean/std."""
    shape = (3, 1, 1, 1)
    mean = torch.tensor(cfg.video_mean, device=x.device).view(shape) * 255.0
    std = torch.tensor(cfg.video_std, device=x.device).view(shape) * 255.0
    return (x - mean) / std


def video_tensor(frames: np.ndarray, cfg: DataConfig, rng: np.random.Generator | None) -> torch.Tensor:
    """uint8 (T, H, W, 3) to normalised float32 (3, T, S, S); the same crop and flip for every frame.

    Without rng: the centre S x S crop (after resizing the short side up to S if it is smaller).
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # T, 3, H, W, uint8
    aug = draw_video_aug(*x.shape[-2:], cfg, rng)
    return normalise_video(crop_frames(x, aug, cfg.image_size).permute(1, 0, 2, 3), cfg).contiguous()


def load_sample(
    sample: dict, cfg: DataConfig, *, train: bool, rng: np.random.Generator | None = None, video_only: bool = False
) -> dict:
    """Decode one shard sample into {"video": (3,T,S,S), "audio": (F,M), "clip_id", "window": Window}.

    train=True draws the window start, crop, flip and masks from ``rng`` (in that order, all here);
    train=False is deterministic: centred window, centre crop, no flip, no masks. Bad bytes raise
    SampleError; anything else is a bug and propagates.

    ``video_only``: the audio is not read, and "audio" is an empty (0, M) tensor. A clip that ingest
    stored without audio (meta ``video_only``) decodes only this way; otherwise it raises SampleError,
    so nothing that needs the voice (training, AV or audio embeddings) ever uses it.
    """
    if train and rng is None:
        rng = np.random.default_rng()
    draw = rng if train else None
    clip_id, meta = read_meta(sample)
    if "mp4" not in sample:
        raise SampleError("missing mp4")
    if video_only:
        frames, _fps, _count, window = decode_video(sample["mp4"], lambda n, fps: choose_window(n, fps, cfg, draw))
        return {"video": video_tensor(frames, cfg, draw), "audio": torch.empty(0, cfg.mel_bins), "clip_id": clip_id,
                "window": window}
    if meta.get("video_only"):
        raise SampleError(f"a video-only clip ({meta['video_only']}): it has no audio to use")
    audio = decode_audio(audio_bytes(sample), cfg.sample_rate)

    def pick(n_frames: int, clip_fps: float) -> Window:
        check_durations(n_frames, clip_fps, len(audio), cfg)
        return choose_window(n_frames, clip_fps, cfg, draw)

    frames, clip_fps, n_frames, window = decode_video(sample["mp4"], pick)
    waveform = window_waveform(audio, window, n_frames, clip_fps, cfg.sample_rate)
    video = video_tensor(frames, cfg, draw)
    feats = normalise_fbank(fbank(waveform, cfg), cfg)
    if draw is not None:
        feats = spec_mask(feats, cfg, draw)
    return {"video": video, "audio": feats.contiguous(), "clip_id": clip_id, "window": window}


def window_frames(frames: np.ndarray, window: Window) -> np.ndarray:
    """The window's frames from a fully decoded clip (for checks; load_sample decodes only these)."""
    return frames[list(window.frame_indices)]
