"""ffmpeg / ffprobe calls, each with a timeout: probing, decoding to arrays, encoding clips.

Command lines are built with ffmpeg-python and run with ``subprocess.run(timeout=...)``, because
ffmpeg-python's own ``run()`` cannot time out and a hung decoder must fail one video, not a run.

With ``backend="pyav"`` everything but probing a video and decoding its frames (probing a separate
audio file, decoding the audio track, encoding the voice and the face crops) runs in-process with
PyAV instead: each ffmpeg process start costs about 0.1 s, and a short labelled file needs several.
Its timeout is PyAV's interrupt callback on the file's I/O plus a deadline checked between
packets and frames, so a stuck read still fails with ``timeout``.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
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


@contextmanager
def _pyav(timeout: float, what: str, failed: str = "decode_error"):
    """PyAV errors as MediaError: an interrupted read is a ``timeout``, anything else ``failed``."""
    try:
        yield
    except av.error.ExitError:
        raise MediaError("timeout", f"{what} did not finish within {timeout:.0f} s") from None
    except (av.FFmpegError, ValueError) as exc:
        raise MediaError(failed, f"{what} failed: {exc}") from None


def _check_deadline(deadline: float, timeout: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise MediaError("timeout", f"{what} did not finish within {timeout:.0f} s")


def _frame_rates(r_rate: float, avg_rate: float) -> dict:
    """``fps`` and ``variable_fps`` from a stream's base and average frame rates (both probes)."""
    variable = bool(r_rate and avg_rate and abs(r_rate - avg_rate) > 0.01 * r_rate)
    return {"fps": avg_rate or r_rate, "variable_fps": variable}


def _probe_pyav(path: Path, timeout: float, require_video: bool) -> ProbeInfo:
    """What ffprobe reports, read in-process; the rotation is the first video frame's (FFmpeg hands the display
    matrix to decoded frames), so a video costs one decoded frame more than its header."""
    deadline = time.monotonic() + timeout
    with _pyav(timeout, "probe", failed="not_a_video"), av.open(str(path), timeout=timeout) as container:
        video = next((s for s in container.streams.video
                      if not s.disposition & av.stream.Disposition.attached_pic), None)
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and require_video:
            raise MediaError("no_video_stream", "the file has no video stream")
        duration = container.duration / av.time_base if container.duration else 0.0
        if not duration and video is not None and video.duration:
            duration = float(video.duration * video.time_base)
        if not duration and audio is not None and audio.duration:
            duration = float(audio.duration * audio.time_base)
        rotation = 0
        if video is not None and require_video:
            with _pyav(timeout, "decoding the first video frame"):
                first = next(container.decode(video.index), None)
            rotation = int(round(first.rotation)) % 360 if first is not None else 0
    _check_deadline(deadline, timeout, "probe")
    if duration <= 0:
        raise MediaError("not_a_video", "the duration is unknown or zero")
    r_rate, avg_rate = (float(video.base_rate or 0), float(video.average_rate or 0)) if video else (0.0, 0.0)
    return ProbeInfo(
        duration=duration,
        width=video.codec_context.width if video else 0,
        height=video.codec_context.height if video else 0,
        **_frame_rates(r_rate, avg_rate),
        vcodec=video.codec_context.name if video else "unknown",
        rotation=rotation,
        acodec=audio.codec_context.name if audio is not None else None,
        audio_channels=audio.codec_context.channels if audio is not None else 0,
    )


def probe(path: Path, timeout: float, require_video: bool = True, backend: str = "ffmpeg") -> ProbeInfo:
    """Describe a media file; raise MediaError with a precise status when it is unusable.

    ``backend="pyav"`` reads it in-process, ``"ffmpeg"`` with an ffprobe process (tens of milliseconds
    each, as much as decoding a short clip)."""
    if path.stat().st_size == 0:
        raise MediaError("empty_file", "the file is empty (0 bytes)")
    if backend == "pyav":
        return _probe_pyav(path, timeout, require_video)
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
        **_frame_rates(r_rate, avg_rate),
        vcodec=video.get("codec_name", "unknown"),
        rotation=_rotation(video),
        acodec=audio.get("codec_name", "unknown") if audio else None,
        audio_channels=int(audio.get("channels") or 0) if audio else 0,
    )


def decode_timeout(seconds: float, per_second: float) -> float:
    return 30.0 + per_second * seconds


def decode_audio(path: Path, sample_rate: int, timeout: float, backend: str = "ffmpeg") -> np.ndarray:
    """The whole audio track as float32 mono at ``sample_rate``, in [-1, 1]."""
    if backend == "pyav":
        return _decode_audio_pyav(path, sample_rate, timeout)
    args = (
        ffmpeg.input(str(path))
        .output("pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate, vn=None)
        .global_args("-nostdin", "-v", "error")
        .compile()
    )
    raw = _run(args, timeout, "audio decode")
    return np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0


def _decode_audio_pyav(path: Path, sample_rate: int, timeout: float) -> np.ndarray:
    """As ffmpeg does: resampled to s16 mono, a damaged packet skipped, a damaged tail ends the track."""
    deadline, chunks = time.monotonic() + timeout, []
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    with _pyav(timeout, "audio decode"), av.open(str(path), timeout=timeout) as container:
        if not container.streams.audio:
            raise MediaError("decode_error", "audio decode failed: the file has no audio stream")
        stream = container.streams.audio[0]
        packets = container.demux(stream)
        while True:
            _check_deadline(deadline, timeout, "audio decode")
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.InvalidDataError:
                if not chunks:
                    raise
                break  # a truncated file: keep what decoded
            try:
                frames = packet.decode()
            except av.InvalidDataError:
                continue
            chunks += [out.to_ndarray().reshape(-1) for frame in frames for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return pcm.astype(np.float32) / 32768.0


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


def encode_video(
    frames: np.ndarray, fps: float, crf: int, preset: str, out: Path, timeout: float, backend: str = "ffmpeg"
) -> None:
    """Encode uint8 (T, S, S, 3) frames to an H.264 mp4 that any decoder can read."""
    if backend == "pyav":
        return _encode_video_pyav(frames, fps, crf, preset, out, timeout)
    count, height, width, _ = frames.shape
    args = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        .output(str(out), vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset=preset, movflags="+faststart")
        .global_args("-v", "error", "-y")
        .compile()
    )
    _run(args, timeout, "video encode", stdin=np.ascontiguousarray(frames).tobytes())


@lru_cache(maxsize=1)
def _x264_options() -> dict[str, str]:
    """PyAV's own libx264 encodes the same frames to different streams on a CPU with AVX-512 (its AVX-512 code;
    the AVX2 code and the ffmpeg command line give one stream), so there it runs the AVX2 code: clips are
    reproducible, at the same size and speed."""
    import torch

    return {"x264-params": "asm=AVX2"} if torch.backends.cpu.get_cpu_capability() == "AVX512" else {}


def _encode_video_pyav(frames: np.ndarray, fps: float, crf: int, preset: str, out: Path, timeout: float) -> None:
    """libx264 in-process (PyAV's own FFmpeg), the same settings as the ffmpeg command line."""
    deadline = time.monotonic() + timeout
    with _pyav(timeout, "video encode"), av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"}) as c:
        stream = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, **_x264_options()}
        for image in frames:
            _check_deadline(deadline, timeout, "video encode")
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str, timeout: float, backend: str = "ffmpeg") -> bytes:
    """Encode float32 mono samples to FLAC or WAV bytes."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    if backend == "pyav":
        return _encode_audio_pyav(pcm, sample_rate, fmt, timeout)
    pcm = pcm.tobytes()
    args = (
        ffmpeg.input("pipe:", format="s16le", ac=1, ar=sample_rate)
        .output("pipe:", format=fmt, acodec="flac" if fmt == "flac" else "pcm_s16le")
        .global_args("-v", "error")
        .compile()
    )
    return _run(args, timeout, "audio encode", stdin=pcm)


def _encode_audio_pyav(pcm: np.ndarray, sample_rate: int, fmt: str, timeout: float) -> bytes:
    out = io.BytesIO()
    with _pyav(timeout, "audio encode"), av.open(out, "w", format=fmt) as container:
        stream = container.add_stream("flac" if fmt == "flac" else "pcm_s16le", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()
