"""ffmpeg / ffprobe calls, each with a timeout: probing, decoding to arrays, encoding clips.

Command lines are built with ffmpeg-python and run with ``subprocess.run(timeout=...)``, because
ffmpeg-python's own ``run()`` cannot time out and a hung decoder must fail one video, not a run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from vaemo.errors import MediaError, ToolError


def require_ffmpeg() -> None:
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise ToolError(
            f"{' and '.join(missing)} not found on PATH. Install FFmpeg (Debian/Ubuntu: "
            "'apt-get install ffmpeg'; conda: 'conda install ffmpeg') and run again."
        )


def _run(args: list[str], timeout: float, what: str, stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise MediaError("timeout", f"{what} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise MediaError("decode_error", f"{what} failed: {' | '.join(tail) or 'exit ' + str(done.returncode)}")
    return done.stdout


@dataclass(frozen=True)
class ProbeInfo:
    duration: float
    width: int
    height: int
    fps: float
    vcodec: str
    rotation: int
    variable_fps: bool
    acodec: str | None
    audio_channels: int

    @property
    def has_audio(self) -> bool:
        return self.acodec is not None


def _ratio(text: str | None) -> float:
    if not text or text in ("0/0", "N/A"):
        return 0.0
    num, _, den = text.partition("/")
    return float(num) / float(den or 1) if float(den or 1) else 0.0


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return int(round(float(side["rotation"]))) % 360
    return int(stream.get("tags", {}).get("rotate", 0)) % 360


def probe(path: Path, timeout: float, require_video: bool = True) -> ProbeInfo:
    """Describe a media file; raise MediaError with a precise status when it is unusable."""
    if path.stat().st_size == 0:
        raise MediaError("empty_file", "the file is empty (0 bytes)")
    args = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)]
    try:
        info = json.loads(_run(args, timeout, "ffprobe"))
    except MediaError as exc:
        if exc.status == "timeout":
            raise
        raise MediaError("not_a_video", f"not a readable media file ({exc.reason})") from None
    streams = info.get("streams", [])
    video = next(
                 (s for s in streams if s.get("codec_type") == "video" and s.get("disposition",
                                                                                 {}).get("attached_pic") != 1),
                 None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None and require_video:
        raise MediaError("no_video_stream", "the file has no video stream")
    video = video or {}
    duration = float(info.get("format", {}).get("duration") or video.get("duration") or 0.0)
    if duration <= 0:
        raise MediaError("not_a_video", "the duration is unknown or zero")
    r_rate, avg_rate = _ratio(video.get("r_frame_rate")), _ratio(video.get("avg_frame_rate"))
    return ProbeInfo(
        duration=duration,
        width=int(video.get("width") or 0),
        height=int(video.get("height") or 0),
        fps=avg_rate or r_rate,
        vcodec=video.get("codec_name", "unknown"),
        rotation=_rotation(video),
        variable_fps=bool(r_rate and avg_rate and abs(r_rate - avg_rate) > 0.01 * r_rate),
        acodec=audio.get("codec_name", "unknown") if audio else None,
        audio_channels=int(audio.get("channels") or 0) if audio else 0,
    )


def decode_timeout(seconds: float, per_second: float) -> float:
    return 30.0 + per_second * seconds


def decode_audio(path: Path, sample_rate: int, timeout: float) -> np.ndarray:
    """The whole audio track as float32 mono at ``sample_rate``, in [-1, 1]."""
    args = (
        ffmpeg.input(str(path))
        .output("pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate, vn=None)
        .global_args("-nostdin", "-v", "error")
        .compile()
    )
    raw = _run(args, timeout, "audio decode")
    return np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0


def frame_size(width: int, height: int, rotation: int, short_side: int) -> tuple[int, int]:
    """Output (width, height) after autorotation and downscaling to ``short_side`` (even numbers)."""
    if rotation in (90, 270):
        width, height = height, width
    scale = min(1.0, short_side / max(1, min(width, height)))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def decode_frames(
    path: Path, start: float, duration: float, fps: float, size: tuple[int, int], timeout: float
) -> np.ndarray:
    """Frames of ``[start, start+duration)`` at a constant ``fps`` as uint8 (T, H, W, 3).

    ffmpeg resamples variable frame rates, applies rotation metadata and downscales, so the
    Python side never holds full-resolution frames. Seeking happens on the input (fast); some
    Flash files refuse an input seek, and those are decoded from the start instead.
    """
    try:
        return _decode_frames(path, start, duration, fps, size, timeout, seek_input=True)
    except MediaError as exc:
        if exc.status != "decode_error":
            raise
        return _decode_frames(path, start, duration, fps, size, timeout, seek_input=False)


def _decode_frames(path, start, duration, fps, size, timeout, seek_input: bool) -> np.ndarray:
    width, height = size
    window = {"t": f"{duration:.3f}"}
    if start > 0.0005:  # an explicit zero seek breaks some FLV demuxing
        window["ss"] = f"{start:.3f}"
    stream = ffmpeg.input(str(path), **(window if seek_input else {}))
    args = (
        stream.video.filter("fps", fps=fps)
        .filter("scale", width, height)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", **({} if seek_input else window))
        .global_args("-nostdin", "-v", "error")
        .compile()
    )
    raw = _run(args, timeout, "video decode")
    return np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(-1, height, width, 3)


def encode_video(frames: np.ndarray, fps: float, crf: int, preset: str, out: Path, timeout: float) -> None:
    """Encode uint8 (T, S, S, 3) frames to an H.264 mp4 that any decoder can read."""
    count, height, width, _ = frames.shape
    args = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        .output(str(out), vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset=preset, movflags="+faststart")
        .global_args("-v", "error", "-y")
        .compile()
    )
    _run(args, timeout, "video encode", stdin=np.ascontiguousarray(frames).tobytes())


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str, timeout: float) -> bytes:
    """Encode float32 mono samples to FLAC or WAV bytes."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16).tobytes()
    args = (
        ffmpeg.input("pipe:", format="s16le", ac=1, ar=sample_rate)
        .output("pipe:", format=fmt, acodec="flac" if fmt == "flac" else "pcm_s16le")
        .global_args("-v", "error")
        .compile()
    )
    return _run(args, timeout, "audio encode", stdin=pcm)
