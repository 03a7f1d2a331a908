"""Generated talking-face media for the demo and the tests, made from real parts.

The face is scikit-image's bundled astronaut photo (a real face that MTCNN detects), the voice is
espeak-ng speech and the real ffmpeg binary encodes the result. The ingest code is therefore
exercised on files that behave like a corpus' files: real codecs and containers, rotation
metadata, variable frame rates, missing streams and broken files. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vaemo.errors import ToolError

LABELS_FILE = "labels.csv"  # beside a generated labelled corpus: path,label,speaker
__all__ = ["bad_inputs", "demo_corpus", "demo_inputs", "labelled_corpus", "require_tools", "speak",
           "talking_face_video"]

DEFAULT_TEXT = "I honestly did not expect this, but it turned out to be a wonderful day."
DEFAULT_SECONDS = 3.0  # length of a clip with neither `seconds` nor `text` to time it by
SPEECH_RATE = 22050  # espeak-ng's native sample rate; kept so speech is never resampled twice
_TIMEOUT = 120.0

# Head-and-shoulders crop of skimage.data.astronaut(); MTCNN's box in the full photo is about
# [181, 62, 268, 172], i.e. roughly centred in this crop with shoulders below it.
_CROP_ROWS = slice(20, 260)
_CROP_COLS = slice(120, 330)

# Odd frames come this fraction of a frame period early, so intervals alternate 0.6 / 1.4 periods:
# the average rate is unchanged while packet durations and ffprobe's r_frame_rate are not.
_VFR_JITTER = 0.4
_VFR_TIMEBASE = 90000

_APT_PACKAGE = {"ffmpeg": "ffmpeg", "ffprobe": "ffmpeg", "espeak-ng": "espeak-ng", "sox": "sox"}

# Default (video encoder, audio encoder) per container, chosen like the corpora we ingest:
# FLV + MP3 is CREMA-D's Flash video, MPEG-4 part 2 in AVI is common in older datasets.
_CONTAINER_CODECS = {
    ".mp4": ("libx264", "aac"),
    ".m4v": ("libx264", "aac"),
    ".mov": ("libx264", "aac"),
    ".flv": ("flv", "libmp3lame"),
    ".avi": ("mpeg4", "libmp3lame"),
    ".mkv": ("libx264", "libvorbis"),
    ".webm": ("libvpx-vp9", "libopus"),
}
# Only the QuickTime family stores a display matrix that ffmpeg 5.1 writes and honours.
_ROTATABLE = {".mp4", ".m4v", ".mov"}
# AVI has one fixed frame rate and no per-frame timestamps.
_VFR_CONTAINERS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".flv"}

# Speed-first settings: the clips are test fixtures, quality only has to keep the face detectable.
_VIDEO_OPTIONS = {
    "libx264": ["-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p"],
    "libvpx-vp9": ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "0", "-crf", "36", "-pix_fmt", "yuv420p"],
    "libvpx": ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "500k", "-pix_fmt", "yuv420p"],
    "flv": ["-q:v", "4", "-pix_fmt", "yuv420p"],
    "mpeg4": ["-q:v", "4", "-pix_fmt", "yuv420p"],
}
_AUDIO_OPTIONS = {
    "aac": ["-b:a", "64k", "-aac_coder", "fast"],
    "libmp3lame": ["-b:a", "64k"],
    "libvorbis": ["-q:a", "3"],
    "libopus": ["-b:a", "48k", "-ar", "48000"],  # libopus refuses 22.05 kHz
}

AUDIO_MODES = ("speech", "silent", "none", "tone")

_SENTENCES = (
    "I can't believe you did that again, after everything we talked about.",
    "This is the best news I have heard all year, thank you so much.",
    "Please leave the papers on my desk and close the door behind you.",
    "I am really worried that something terrible has happened to them.",
    "Wait, what? You are telling me the whole thing was a surprise party?",
    "Honestly, I feel a little tired today, but I will be fine tomorrow.",
)
_VOICES = ("en", "en-us", "en+f3", "en+m3", "en-gb-x-rp", "en+f2")


def require_tools(*names: str) -> None:
    """Raise a ToolError naming each missing command-line tool and how to install it."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise ToolError(
            "; ".join(
                f"{name} not found on PATH: install it with 'apt-get install {_APT_PACKAGE.get(name, name)}' "
                "(Debian/Ubuntu) or your platform's package manager"
                for name in missing
            )
        )


def _run(args: list[str], *, stdin: bytes | None = None, timeout: float = _TIMEOUT) -> None:
    """Run a tool; on failure raise with its stderr, which CalledProcessError alone hides."""
    try:
        subprocess.run(args, input=stdin, capture_output=True, check=True, timeout=timeout)
    except subprocess.CalledProcessError as error:
        detail = error.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise ToolError(f"{args[0]} failed (exit {error.returncode}): {detail}") from error


def _read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path), "rb") as reader:
        rate, frames = reader.getframerate(), reader.readframes(reader.getnframes())
    return rate, np.frombuffer(frames, dtype="<i2")


def _write_wav(path: Path, rate: int, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.astype("<i2").tobytes())


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as reader:
        return reader.getnframes() / reader.getframerate()


def speak(
    text: str, path: Path, *, voice: str = "en", speed: int = 160, pitch: int = 50, pad_seconds: float = 0.0
) -> Path:
    """Synthesise ``text`` with espeak-ng into a 22.05 kHz mono 16-bit WAV at ``path``.

    ``pad_seconds`` of digital silence is added before and after the speech.
    """
    require_tools("espeak-ng")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Text goes through stdin so words starting with '-' are never read as options.
    _run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path.resolve()), "--stdin"],
        stdin=text.encode("utf-8"),
    )
    if pad_seconds > 0:
        rate, samples = _read_wav(path)
        pad = np.zeros(round(pad_seconds * rate), dtype=np.int16)
        _write_wav(path, rate, np.concatenate([pad, samples, pad]))
    return path


@functools.lru_cache(maxsize=1)
def _face_crop() -> np.ndarray:
    try:
        from skimage import data
    except ImportError as error:  # scikit-image is a test extra, not a runtime dependency
        raise ToolError("vaemo.synth needs scikit-image for its face photo: pip install 'vaemo[test]'") from error
    return np.ascontiguousarray(data.astronaut()[_CROP_ROWS, _CROP_COLS])


@dataclass(frozen=True)
class _Scene:
    """Everything a frame depends on besides its time, prepared once per video."""

    width: int
    height: int
    faces: int
    background: Image.Image
    face: Image.Image
    phases: tuple[float, ...]
    colours: tuple[tuple[int, int, int], ...]


def _scene(size: tuple[int, int], faces: int, seed: int, face_tint: tuple[float, float, float] | None) -> _Scene:
    width, height = size
    rng = np.random.default_rng(seed)
    # A vertical gradient with grain: real texture for the encoder, nothing face-like for MTCNN.
    base = rng.uniform(50, 190, size=3)
    ramp = np.linspace(-30, 30, height)[:, None, None]
    grain = rng.normal(0, 5, size=(height, width, 3))
    background = Image.fromarray(np.clip(base + ramp + grain, 0, 255).astype(np.uint8))
    crop = _face_crop()
    if face_tint is not None:
        crop = np.clip(crop * np.asarray(face_tint, dtype=np.float32), 0, 255).astype(np.uint8)
    count = max(faces, 3)  # faces=0 still needs phases for its moving shapes
    return _Scene(
        width=width,
        height=height,
        faces=faces,
        background=background,
        face=Image.fromarray(crop),
        phases=tuple(rng.uniform(0, 2 * math.pi, size=count)),
        colours=tuple(tuple(int(c) for c in rng.integers(0, 256, size=3)) for _ in range(count)),
    )


def _render(scene: _Scene, t: float) -> Image.Image:
    """The upright frame at time ``t``: faces sway and breathe in scale so trackers see motion."""
    frame = scene.background.copy()
    if scene.faces == 0:
        draw = ImageDraw.Draw(frame)
        for i, (phase, colour) in enumerate(zip(scene.phases, scene.colours, strict=True)):
            cx = scene.width * (0.5 + 0.35 * math.sin(0.9 * t + phase))
            cy = scene.height * (0.5 + 0.3 * math.cos(1.3 * t + phase * (i + 1)))
            r = min(scene.width, scene.height) * (0.12 + 0.04 * math.sin(2.0 * t + phase))
            box = (cx - r, cy - r, cx + r, cy + r)
            (draw.ellipse if i % 2 == 0 else draw.rectangle)(box, fill=colour)
        return frame
    slot = scene.width / scene.faces
    crop_w, crop_h = scene.face.size
    fit = min(0.72 * scene.height / crop_h, 0.82 * slot / crop_w)
    for i in range(scene.faces):
        phase = scene.phases[i]
        scale = fit * (1.0 + 0.06 * math.sin(2 * math.pi * t / 3.1 + phase))
        w, h = max(1, round(crop_w * scale)), max(1, round(crop_h * scale))
        cx = (i + 0.5) * slot + 0.07 * slot * math.sin(2 * math.pi * t / 2.3 + phase)
        cy = 0.55 * scene.height + 0.04 * scene.height * math.sin(2 * math.pi * t / 1.7 + phase)
        frame.paste(scene.face.resize((w, h), Image.Resampling.BILINEAR), (round(cx - w / 2), round(cy - h / 2)))
    return frame


def _frame_times(seconds: float, fps: float, variable_fps: bool) -> np.ndarray:
    times = np.arange(max(1, round(seconds * fps))) / fps
    if variable_fps:
        times[1::2] -= _VFR_JITTER / fps
    return times


# ffprobe reports `rotate` as the side data's rotation and players (ffmpeg's autorotate too) turn
# the picture that many degrees counter-clockwise; stored frames are turned clockwise by as much
# (PIL's ROTATE_n turns counter-clockwise), so the displayed picture is upright.
_STORE_TRANSPOSE = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def _audio_input(audio: str, speech: Path | None) -> list[str]:
    if audio == "speech":
        assert speech is not None
        return ["-i", str(speech)]
    if audio == "silent":
        return ["-f", "lavfi", "-i", f"anullsrc=r={SPEECH_RATE}:cl=mono"]
    if audio == "tone":
        return ["-f", "lavfi", "-i", f"sine=frequency=220:sample_rate={SPEECH_RATE}"]
    return []


def _encode(
    out: Path,
    frames: bytes,
    *,
    stored_size: tuple[int, int],
    fps: float,
    seconds: float,
    audio_input: list[str],
    vcodec: str,
    acodec: str,
    variable_fps: bool,
) -> None:
    """Encode rgb24 ``frames`` (piped on stdin) plus an optional audio input into ``out``."""
    width, height = stored_size
    args = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
    args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", f"{fps:g}", "-i", "pipe:0"]
    args += audio_input
    args += ["-map", "0:v:0"]
    if variable_fps:
        jitter = _VFR_JITTER / fps
        # A fine time base end to end: the encoder's default (1/fps) would round the jitter away.
        # No B-frames, as in phone recordings, which keeps decode order equal to display order.
        args += ["-vf", f"settb=1/{_VFR_TIMEBASE},setpts='round((N/{fps:g}-{jitter:.9g}*mod(N,2))/TB)'"]
        args += ["-fps_mode", "vfr", "-enc_time_base", f"1:{_VFR_TIMEBASE}", "-bf", "0"]
    args += ["-c:v", vcodec, *_VIDEO_OPTIONS.get(vcodec, [])]
    if audio_input:
        # apad extends speech with silence to the clip length; -t then ends audio and video together
        # (ffmpeg 5.1's -shortest overshoots when the video arrives through a pipe).
        args += ["-map", "1:a:0", "-af", "apad", "-ac", "1", "-ar", str(SPEECH_RATE)]
        args += ["-c:a", acodec, *_AUDIO_OPTIONS.get(acodec, [])]
    args += ["-t", f"{seconds:.6f}"]
    if out.suffix.lower() in _ROTATABLE:
        args += ["-movflags", "+faststart"]
    args.append(str(out.resolve()))  # absolute, so a name starting with '-' is never an option
    _run(args, stdin=frames)


def _set_rotation(source: Path, out: Path, rotate: int) -> None:
    # ffmpeg 5.1 turns the 'rotate' tag into a display matrix only when stream copying, so the
    # rotation is added by a lossless remux of the encoded file.
    args = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source.resolve()), "-map", "0"]
    args += ["-c", "copy", "-metadata:s:v:0", f"rotate={rotate}", "-movflags", "+faststart", str(out.resolve())]
    _run(args)


def talking_face_video(
    path: Path,
    *,
    text: str | None = DEFAULT_TEXT,
    seconds: float | None = None,
    size: tuple[int, int] = (320, 240),
    fps: float = 25,
    faces: int = 1,
    audio: str = "speech",
    vcodec: str | None = None,
    acodec: str | None = None,
    rotate: int = 0,
    variable_fps: bool = False,
    seed: int = 0,
    face_tint: tuple[float, float, float] | None = None,
) -> Path:
    """Write a clip of ``faces`` swaying astronaut heads over a textured background, with a voice.

    ``size`` is the displayed (width, height). Without ``seconds`` the clip lasts as long as the
    espeak-ng reading of ``text`` (``DEFAULT_SECONDS`` when there is no text), whatever ``audio``
    is, and the video always ends with the audio. ``audio``: "speech" (``text`` read aloud, then
    silence up to ``seconds``), "silent" (an all-zero audio stream), "none" (no audio stream) or
    "tone" (a 220 Hz sine). Codecs default by container (see ``_CONTAINER_CODECS``). ``rotate``
    stores the frames turned and writes display-matrix metadata (mp4/mov only; ffprobe's side data
    then reports that rotation, 270 as -90), so the file displays upright at ``size``.
    ``variable_fps`` gives frames uneven timestamps (same average ``fps``; not for .avi).
    ``face_tint`` multiplies the face region's RGB.
    """
    if audio == "speech" and not text:
        raise ValueError("audio='speech' needs a text to speak")
    return _speaking_clip(
        Path(path), text, seconds=seconds, size=size, fps=fps, faces=faces, audio=audio, vcodec=vcodec,
        acodec=acodec, rotate=rotate, variable_fps=variable_fps, seed=seed, face_tint=face_tint,
    )


def _speaking_clip(
    path: Path,
    text: str | None,
    *,
    voice: str = "en",
    speed: int = 160,
    pitch: int = 50,
    clamp_seconds: tuple[float, float] | None = None,
    **options: Any,
) -> Path:
    """Speak ``text`` (if any), then make the clip; ``clamp_seconds`` bounds a speech-timed length."""
    with tempfile.TemporaryDirectory(prefix="vaemo-synth-") as tmp:
        speech = speak(text, Path(tmp) / "speech.wav", voice=voice, speed=speed, pitch=pitch) if text else None
        if clamp_seconds is not None and speech is not None and options.get("seconds") is None:
            shortest, longest = clamp_seconds
            options["seconds"] = min(max(_wav_seconds(speech), shortest), longest)
        return _clip(path, speech=speech, **options)


def _clip(
    path: Path,
    *,
    speech: Path | None,
    seconds: float | None = None,
    size: tuple[int, int] = (320, 240),
    fps: float = 25,
    faces: int = 1,
    audio: str = "speech",
    vcodec: str | None = None,
    acodec: str | None = None,
    rotate: int = 0,
    variable_fps: bool = False,
    seed: int = 0,
    face_tint: tuple[float, float, float] | None = None,
) -> Path:
    """talking_face_video() once the speech WAV (if any) exists; see there for the options."""
    suffix = path.suffix.lower()
    width, height = size
    if audio not in AUDIO_MODES:
        raise ValueError(f"audio must be one of {AUDIO_MODES}, got {audio!r}")
    if audio == "speech" and speech is None:
        raise ValueError("audio='speech' needs speech")
    if width % 2 or height % 2 or width < 16 or height < 16:
        raise ValueError(f"size must be even and at least 16x16 (yuv420p), got {size}")
    if rotate % 90:
        raise ValueError(f"rotate must be a multiple of 90, got {rotate}")
    rotate %= 360
    if rotate and suffix not in _ROTATABLE:
        raise ValueError(f"rotation metadata needs an mp4/mov container, not {suffix!r}")
    if variable_fps and suffix not in _VFR_CONTAINERS:
        raise ValueError(f"variable frame rate needs one of {sorted(_VFR_CONTAINERS)}, not {suffix!r}")
    if faces < 0:
        raise ValueError(f"faces must be >= 0, got {faces}")
    if seconds is None:
        seconds = _wav_seconds(speech) if speech is not None else DEFAULT_SECONDS
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    require_tools("ffmpeg")
    default_vcodec, default_acodec = _CONTAINER_CODECS.get(suffix, ("libx264", "aac"))
    path.parent.mkdir(parents=True, exist_ok=True)

    scene = _scene((width, height), faces, seed, face_tint)
    transpose = _STORE_TRANSPOSE.get(rotate)
    frames = bytearray()
    for t in _frame_times(seconds, fps, variable_fps):
        image = _render(scene, float(t))
        frames += (image.transpose(transpose) if transpose is not None else image).tobytes()

    with tempfile.TemporaryDirectory(prefix="vaemo-synth-") as tmp:
        encoded = Path(tmp) / f"encoded{suffix}" if rotate else path
        _encode(
            encoded,
            bytes(frames),
            stored_size=(height, width) if rotate in (90, 270) else (width, height),
            fps=fps,
            seconds=seconds,
            audio_input=_audio_input(audio, speech),
            vcodec=vcodec or default_vcodec,
            acodec=acodec or default_acodec,
            variable_fps=variable_fps,
        )
        if rotate:
            _set_rotation(encoded, path, rotate)
    return path


def _in_parallel(jobs: list[Callable[[], Path]]) -> list[Path]:
    """Run clip jobs side by side: each is mostly an ffmpeg process, so threads overlap well."""
    if not jobs:
        return []
    _face_crop()  # load the photo once, before the threads ask for it
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1, 4))) as pool:
        return list(pool.map(lambda job: job(), jobs))


def bad_inputs(folder: Path) -> dict[str, Path]:
    """One file per awkward input the ingest stage must survive; returns case -> path.

    Cases that are odd but usable still hold a detectable face and speech, unless lacking one of
    them is their point (no_face, no_audio_stream, silent_audio).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Path] = {}

    cases["zero_byte"] = folder / "zero_byte.mp4"
    cases["zero_byte"].write_bytes(b"")
    cases["not_a_video"] = folder / "not_a_video.mp4"
    cases["not_a_video"].write_text("This is a text file that only pretends to be a video.\n", encoding="utf-8")

    variants: dict[str, tuple[str, dict]] = {
        "truncated": ("truncated_source.mp4", {}),  # cut below
        "no_audio_stream": ("no_audio_stream.mp4", {"audio": "none"}),
        "silent_audio": ("silent_audio.mp4", {"audio": "silent"}),
        "no_face": ("no_face.mp4", {"faces": 0}),
        "several_faces": ("several_faces.mp4", {"faces": 2}),
        "rotated": ("rotated.mp4", {"rotate": 90}),
        "variable_fps": ("variable_fps.mp4", {"variable_fps": True}),
        "flv_mp3": ("flv_mp3.flv", {}),
        "non_ascii_name": ("vidéo_über_中文.mp4", {}),
        "spaces_and_quotes": ("clip with 'single' and \"double\" quotes.mp4", {}),
        # Long but cheap: a tiny frame at a low rate, speech running to the very end.
        "long": ("long.mp4", {"text": " ".join(_SENTENCES * 2), "seconds": 40.0, "size": (160, 120), "fps": 10}),
    }
    jobs = [
        functools.partial(talking_face_video, folder / name, seed=seed, **options)
        for seed, (name, options) in enumerate(variants.values(), start=1)
    ]
    cases.update(zip(variants, _in_parallel(jobs), strict=True))

    # faststart put the index first, so the cut file still probes but its media data stops early.
    whole = cases["truncated"]
    cases["truncated"] = folder / "truncated.mp4"
    data = whole.read_bytes()
    cases["truncated"].write_bytes(data[: int(len(data) * 0.3)])
    whole.unlink()
    return cases


def demo_corpus(folder: Path, *, n_videos: int = 4, seed: int = 0) -> list[Path]:
    """A few 3-5 s talking-face clips, each a different sentence, voice and look, for the demo."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(_SENTENCES))
    jobs = [
        functools.partial(
            _speaking_clip,
            folder / f"demo_{i:02d}.mp4",
            _SENTENCES[order[i % len(_SENTENCES)]],
            voice=_VOICES[i % len(_VOICES)],
            speed=int(rng.integers(150, 175)),
            pitch=int(rng.integers(35, 70)),
            clamp_seconds=(3.0, 5.0),  # speech fills the clip, or is cut at 5 s
            seed=seed * 1000 + i,
            face_tint=tuple(rng.uniform(0.85, 1.15, size=3).tolist()),
        )
        for i in range(n_videos)
    ]
    return _in_parallel(jobs)


# Made-up "emotions" for evaluation tests: each changes the face (an RGB tint of the face region)
# and the voice (espeak-ng pitch 0-99 and speed in words per minute), so a label is truly visible
# and audible, while speakers differ by voice, background and a small tint of their own.
LABELLED_STYLES: dict[str, dict] = {
    "warm": {"face_tint": (1.35, 0.95, 0.6), "pitch": 15, "speed": 120},
    "cold": {"face_tint": (0.6, 0.95, 1.35), "pitch": 90, "speed": 210},
    "pale": {"face_tint": (1.0, 1.25, 1.0), "pitch": 50, "speed": 165},
}
_SPEAKER_VOICES = ("en", "en-us", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-gb-x-gbclan")


def labelled_corpus(
    folder: Path, *, classes: int = 3, speakers: int = 4, clips_per_class: int = 2, seed: int = 0
) -> Path:
    """Talking-face clips whose label changes both face and voice; returns the labels CSV.

    Videos are ``<folder>/spkNN/<label>_<i>.mp4``; ``<folder>/labels.csv`` (LABELS_FILE) has the columns
    ``path,label,speaker`` that the generic ingest adapter reads. Labels come from
    ``LABELLED_STYLES`` (at most three); speakers differ by espeak-ng voice, background and tint.
    """
    if not 2 <= classes <= len(LABELLED_STYLES):
        raise ValueError(f"classes must be 2..{len(LABELLED_STYLES)}, got {classes}")
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    rows, jobs = [], []
    for s in range(speakers):
        own_tint = rng.uniform(0.92, 1.08, size=3)
        for label, style in list(LABELLED_STYLES.items())[:classes]:
            for i in range(clips_per_class):
                relative = f"spk{s:02d}/{label}_{i}.mp4"
                rows.append((relative, label, f"spk{s:02d}"))
                jobs.append(
                    functools.partial(
                        _speaking_clip,
                        folder / relative,
                        _SENTENCES[int(rng.integers(len(_SENTENCES)))],
                        voice=_SPEAKER_VOICES[s % len(_SPEAKER_VOICES)],
                        speed=style["speed"] + int(rng.integers(-10, 11)),
                        pitch=int(np.clip(style["pitch"] + rng.integers(-5, 6), 0, 99)),
                        clamp_seconds=(2.7, 3.0),
                        seed=seed * 10_000 + s * 100 + len(rows),
                        face_tint=tuple((np.asarray(style["face_tint"]) * own_tint).tolist()),
                    )
                )
    _in_parallel(jobs)
    labels = folder / LABELS_FILE
    labels.write_text("path,label,speaker\n" + "".join(f"{path},{label},{speaker}\n" for path, label, speaker in rows),
                      encoding="utf-8")
    return labels


def demo_inputs(settings, source: str) -> Iterator[str]:
    """The demo pipeline's inputs, made once: a labelled talking-face corpus and the tiny captioning model.

    ``settings`` is the pipelines file's (``source``), whose ``demo`` pipeline names them; yields what it does.
    """
    from vaemo.caption.tiny import WARNING, build_tiny_mllm
    from vaemo.errors import ConfigError

    if "demo" not in settings.pipelines:
        raise ConfigError(f"{source}: no `demo` pipeline")
    spec = settings.pipelines["demo"]
    corpus = settings.corpora[spec.corpora[0]]
    if corpus.labels != corpus.path / LABELS_FILE:
        raise ConfigError(
            f"{source}: the demo corpus needs `labels: {corpus.path / LABELS_FILE}` (the generated labels)"
        )
    if not corpus.labels.is_file():
        yield f"generating a labelled demo corpus in {corpus.path} (3 speakers x 3 emotions x 2 clips)"
        labelled_corpus(corpus.path, classes=3, speakers=3, clips_per_class=2, seed=0)
    model = Path(spec.settings_for(settings.stages, "caption").model)
    if not (model / "config.json").is_file():  # a Hugging Face model folder
        build_tiny_mllm(model)
        yield f"tiny captioning model written to {model} ({WARNING})"
    yield f"demo inputs ready; next: vaemo run --config {source} --pipeline demo"
