"""One source video in, face + voice clips (or a status with a reason) out."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vaemo.config import IngestConfig
from vaemo.ingest import media, voice
from vaemo.ingest.face import FaceDetector, NoFace, face_crop
from vaemo.ingest.files import open_regular, regular_file
from vaemo.ingest.records import SourceRecord

HASH_CHUNK = 1 << 20
MIN_FRAMES_SLACK = 0.95
# Outcomes of a labelled file whose face may still be usable: with video_only_clips it becomes a video-only clip.
# (no_speech cannot happen to a labelled file: it is one clip whatever its speech.)
NO_USABLE_AUDIO = ("no_audio_stream", "silent_audio")
# Audio that decodes this much shorter than the container claims marks a truncated or damaged file
# (an audio track a little shorter than the video is normal).
TRUNCATED_SECONDS, TRUNCATED_SHARE = 1.0, 0.9


@contextmanager
def _source_file(record: SourceRecord, rel: str):
    """Name the separate audio file in the reason when it, not the video, is the bad entry."""
    try:
        yield
    except media.MediaError as exc:
        if rel == record.path:
            raise
        raise media.MediaError(exc.status, f"the audio file {rel}: {exc.reason}") from None


def _files(record: SourceRecord) -> list[str]:
    return [rel for rel in (record.path, record.audio_path) if rel is not None]


def stat_key(root: Path, record: SourceRecord) -> str:
    """What re-runs compare to skip hashing an unchanged file: size and mtime, which tools like ``cp -p`` and
    rsync restore, and ctime and inode, which no write can keep. A MediaError when an entry is not a regular file."""
    parts = []
    for rel in _files(record):
        with _source_file(record, rel):
            st = regular_file(root / rel)
        parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    return "|".join(parts)


def content_hash(root: Path, record: SourceRecord) -> str:
    """sha256 of the video bytes, followed by the separate audio file's bytes when there is one.

    Hashing both means a replaced audio file gives a new id, so a clip can never pair a new
    video with old audio (or the reverse). Only regular files are read (a MediaError otherwise).
    """
    digest = hashlib.sha256()
    for rel in _files(record):
        with _source_file(record, rel), open_regular(root / rel) as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def video_id_of(sha256: str) -> str:
    return sha256[:16]


def clip_id_of(video_id: str, start: float, end: float) -> str:
    return f"{video_id}_{round(start * 1000):08d}_{round(end * 1000):08d}"


@dataclass
class Clip:
    clip_id: str
    video: bytes  # mp4
    audio: bytes | None  # flac or wav; None for a video-only clip (meta "video_only" says why)
    meta: dict


@dataclass
class VideoOutcome:
    status: str
    reason: str
    clips: list[Clip] = field(default_factory=list)
    duration: float | None = None
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    begin = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] += time.perf_counter() - begin


def plan_windows(
    record: SourceRecord, duration: float, segments: list[tuple[float, float]], cfg: IngestConfig
) -> list[tuple[float, float]]:
    """Labelled files are one clip each; unlabelled recordings are cut into speech windows."""
    if record.whole_file:
        return [(0.0, round(min(duration, cfg.max_clip_seconds), 3))]
    shortest = min(cfg.min_clip_seconds, duration)  # a short recording can still be one clip
    windows = voice.speech_windows(
        segments, duration, cfg.speech_merge_gap, cfg.max_cut_seconds, shortest, cfg.min_speech_ratio
    )
    return [(s, min(e, duration)) for s, e in windows if min(e, duration) - s >= shortest - 1e-3]


def process_video(
    root: Path, record: SourceRecord, video_id: str, cfg: IngestConfig, detector: FaceDetector | None = None
) -> VideoOutcome:
    """Probe, decode, find speech and the speaker's face (through ``detector``, default one of its own), and cut
    clips. Never raises for bad media."""
    timings: dict[str, float] = defaultdict(float)
    detector = detector or FaceDetector.for_config(cfg)
    try:
        outcome = _process(root, record, video_id, cfg, timings, detector)
        if cfg.video_only_clips and record.whole_file and outcome.status in NO_USABLE_AUDIO:
            return _video_only(root, record, video_id, cfg, timings, outcome, detector)
        return outcome
    except media.MediaError as exc:
        return VideoOutcome(exc.status, exc.reason, timings=timings)


def _video_only(
    root: Path, record: SourceRecord, video_id: str, cfg: IngestConfig, timings: dict[str, float], audio: VideoOutcome,
    detector: FaceDetector,
) -> VideoOutcome:
    """A labelled file without usable audio as face-only clips, each flagged ``video_only`` with why.

    Only labelled files (one clip each): they are what a benchmark's test set counts, and an
    unlabelled recording serves only training, which needs the voice.
    """
    path = root / record.path
    info = media.probe(path, cfg.probe_timeout, backend=cfg.media_io)
    timeout = media.decode_timeout(info.duration, cfg.decode_timeout_per_second)
    windows = plan_windows(record, info.duration, [], cfg)
    status, reason, clips = _face_clips(path, record, video_id, info, windows, None, cfg, timings, timeout, detector)
    if status == "ok":
        why = f"{audio.status}: {audio.reason}"
        for clip in clips:
            clip.meta["video_only"] = why
        reason = "; ".join(filter(None, [f"video-only clips, no usable audio ({why})", reason]))
    # Without a face either, the face path's status says so, as without the option.
    return VideoOutcome(status, reason, clips=clips, duration=info.duration, timings=timings)


def _process(
    root: Path, record: SourceRecord, video_id: str, cfg: IngestConfig, timings: dict[str, float],
    detector: FaceDetector,
) -> VideoOutcome:
    path = root / record.path
    for rel in _files(record):  # still a regular file: a pipe swapped in after the scan must not reach ffmpeg
        with _source_file(record, rel):
            regular_file(root / rel)
    with _timed(timings, "probe"):
        info = media.probe(path, cfg.probe_timeout, backend=cfg.media_io)
        audio_info = (
            media.probe(root / record.audio_path, cfg.probe_timeout, require_video=False, backend=cfg.media_io)
            if record.audio_path
            else info
        )
    if info.duration > cfg.max_duration_seconds:
        return VideoOutcome("too_long",
                            f"{info.duration:.0f} s is over max_duration_seconds={cfg.max_duration_seconds:.0f}",
                            duration=info.duration, timings=timings)
    if not audio_info.has_audio:
        return VideoOutcome("no_audio_stream", "the file has no audio stream", duration=info.duration, timings=timings)

    timeout = media.decode_timeout(info.duration, cfg.decode_timeout_per_second)
    with _timed(timings, "decode"):
        samples = media.decode_audio(
            root / (record.audio_path or record.path), cfg.sample_rate, timeout, backend=cfg.media_io
        )
    # Work with what decodes, and say so: a reason about faces or speech would hide a truncated file.
    duration, truncated = info.duration, ""
    decoded = len(samples) / cfg.sample_rate
    if decoded < min(info.duration - TRUNCATED_SECONDS, info.duration * TRUNCATED_SHARE):
        duration = decoded
        truncated = f"the container claims {info.duration:.2f} s but its audio decodes {decoded:.2f} s"

    def outcome(status: str, reason: str, clips: list[Clip] | None = None) -> VideoOutcome:
        if truncated and clips:
            reason = "; ".join(filter(None, (truncated, reason)))
        elif truncated:
            status, reason = "truncated", f"{truncated}; what decodes gives {status}: {reason}"
        return VideoOutcome(status, reason, clips=clips or [], duration=duration, timings=timings)

    if duration < cfg.min_source_seconds:
        return outcome("too_short", f"{duration:.2f} s is under min_source_seconds={cfg.min_source_seconds}")
    level = voice.peak_dbfs(samples)
    if level < cfg.silence_dbfs:
        return outcome("silent_audio", f"the audio track is silent (peak {level:.0f} dBFS)")
    with _timed(timings, "vad"):
        segments = voice.speech_segments(samples, cfg.sample_rate, cfg.vad_threshold)
    windows = plan_windows(record, duration, segments, cfg)
    if not windows:
        return outcome("no_speech", f"no speech span of at least {min(cfg.min_clip_seconds, duration):.2f} s")

    voice_track = (samples, segments)
    return outcome(*_face_clips(path, record, video_id, info, windows, voice_track, cfg, timings, timeout, detector))


def _face_clips(
    path, record, video_id, info, windows, voice_track, cfg, timings, timeout, detector
) -> tuple[str, str, list]:
    """The speaker's face over each window, cut and encoded: (status, reason, clips).

    ``voice_track``: (samples, segments), or None for clips without audio."""
    samples, segments = voice_track or (None, None)
    size = media.frame_size(info.width, info.height, info.rotation, cfg.decode_short_side)
    clips, skipped = [], defaultdict(list)
    for start, end in windows:
        with _timed(timings, "decode"):
            frames = media.decode_frames(path, start, end - start, cfg.fps, size, timeout)
        frames = frames[: int((end - start) * cfg.fps + 1e-6)]  # whole frames only: clips never overlap
        # Frame counts round at the ends, so allow a frame or two under the shortest clip.
        min_frames = int(min(cfg.min_clip_seconds, end - start) * cfg.fps * MIN_FRAMES_SLACK)
        if len(frames) == 0:
            skipped["no_frames"].append("the decoder returned no frames")
            continue
        if len(frames) < min_frames:  # no face could cover the clip: the video stream ends early
            skipped["truncated"].append(f"the video of {start:.2f}-{end:.2f} s decodes {len(frames) / cfg.fps:.2f} s")
            continue
        with _timed(timings, "detect"):
            try:
                face = face_crop(frames, cfg, min_frames, detector)
            except NoFace as exc:
                skipped[exc.status].append(exc.reason)
                continue
        start, end = start + face.span[0] / cfg.fps, start + face.span[1] / cfg.fps
        a, b = round(start * cfg.sample_rate), round(end * cfg.sample_rate)
        voice_span = None if samples is None else samples[a:b]
        with _timed(timings, "encode"):
            clips.append(_encode_clip(record, video_id, info, start, end, face, voice_span, segments, cfg, timeout))

    if not clips:
        status = next(iter(skipped))
        return status, "; ".join(sorted(set(skipped[status]))), []
    dropped = sum(len(v) for v in skipped.values())
    reason = (
        ""
        if not dropped
        else f"{dropped} of {len(windows)} windows dropped: " + ", ".join(f"{k} x{len(v)}" for k, v in skipped.items())
    )
    return "ok", reason, clips


def _encode_clip(record, video_id, info, start, end, face, samples, segments, cfg, timeout) -> Clip:
    with tempfile.TemporaryDirectory(prefix="vaemo-clip-") as tmp:
        out = Path(tmp) / "clip.mp4"
        media.encode_video(face.frames, cfg.fps, cfg.video_crf, cfg.video_preset, out, timeout, backend=cfg.media_io)
        video_bytes = out.read_bytes()
    audio_bytes = (
        None
        if samples is None
        else media.encode_audio(samples, cfg.sample_rate, cfg.audio_format, timeout, backend=cfg.media_io)
    )
    clip_id = clip_id_of(video_id, start, end)
    meta = {
        "clip_id": clip_id,
        "video_id": video_id,
        "dataset": record.dataset,
        "source": record.path,
        "audio_source": None if samples is None else record.audio_path,
        "start": round(start, 3),
        "end": round(end, 3),
        "fps": cfg.fps,
        "frames": int(len(face.frames)),
        "sample_rate": cfg.sample_rate,
        "crop_size": cfg.crop_size,
        "crop_margin": cfg.crop_margin,
        "face_coverage": round(face.coverage, 4),
        "face_prob_mean": round(face.prob_mean, 4),
        "face_prob_min": round(face.prob_min, 4),
        "faces_max": face.faces_max,
        "face_tracks": face.tracks,
        "speech_ratio": None if segments is None else round(voice.speech_ratio(segments, start, end), 4),
        "label": record.label,
        "speaker": record.speaker,
        "fold": record.fold,
        "source_fps": round(info.fps, 3),
        "source_rotation": info.rotation,
        "source_variable_fps": info.variable_fps,
        "processing": cfg.processing_digest(),
    }
    return Clip(clip_id, video_bytes, audio_bytes, meta)
